"""Attention implementation switch shared by the attention baselines (SwinIR, Restormer).

Each attention module keeps an ``attn_impl`` attribute:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where the
  backend has them: how a fair benchmark runs these models);
- ``"math"``: the official code's explicit ``softmax(q k^T) v``, kept to show the two equal and
  to measure what the fused kernels buy.
"""
from __future__ import annotations

import torch.nn as nn

ATTN_IMPLS = ("sdpa", "math")


def check_attn_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    return impl


def set_attn_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every attention module of `model` to `impl` in place (same weights); returns model."""
    check_attn_impl(impl)
    found = False
    for module in model.modules():
        if hasattr(module, "attn_impl"):
            module.attn_impl = impl
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module with an attn_impl")
    return model
