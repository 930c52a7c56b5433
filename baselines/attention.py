"""Attention implementation switch shared by the attention baselines (SwinIR, Restormer).

Each attention module keeps an ``attn_impl`` attribute and lists what it accepts in
``attn_impls``:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where the
  backend has them: how a fair benchmark runs these models);
- ``"math"``: the official code's explicit ``softmax(q k^T) v``, kept to show the two equal and
  to measure what the fused kernels buy;
- ``"gram"`` (Restormer only): the official transposed attention with the normalisation of q
  and k folded into the small C x C matrix (see `baselines.restormer.Attention`).
"""
from __future__ import annotations

import torch.nn as nn

ATTN_IMPLS = ("sdpa", "math")


def check_attn_impl(impl: str, allowed: tuple[str, ...] = ATTN_IMPLS) -> str:
    if impl not in allowed:
        raise ValueError(f"attn_impl must be one of {allowed}, got {impl!r}")
    return impl


def set_attn_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every attention module of `model` to `impl` in place (same weights); returns model."""
    modules = [m for m in model.modules() if hasattr(m, "attn_impl")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with an attn_impl")
    for module in modules:
        check_attn_impl(impl, getattr(module, "attn_impls", ATTN_IMPLS))
    for module in modules:
        module.attn_impl = impl
    return model
