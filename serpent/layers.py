"""The few timm layers our models use (timm 1.0 code, same names, numerics and RNG draws).

Why not `from timm.layers import ...`: importing timm costs ~2 s, more than the rest of `bench
models`. timm/__init__ imports timm.models (with timm.data and huggingface_hub), and timm.layers
imports torchvision unconditionally (create_norm, norm_act: `from torchvision.ops.misc import
FrozenBatchNorm2d`), whose ops.roi_align imports torch._dynamo (~1.1 s); hiding torchvision's
feature_extraction from timm.layers._fx (timm's one guarded torchvision import) does not avoid
it. tests/test_layers.py checks these against timm value for value.

Meta builds (bench.registry.create_meta_model, for parameter and FLOP counts) skip value
initialisation, as torch.nn.init does: meta tensors have no values, and arithmetic on them runs
Python reference kernels, the first of which imports torch._dynamo (~1 s) and each ms-slow.
"""
from __future__ import annotations

import collections.abc
import math

import torch
import torch.nn as nn


def to_2tuple(x):
    """timm.layers.to_2tuple: an iterable (not a string) as a tuple, anything else repeated."""
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return (x, x)


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """timm.layers.trunc_normal_: inverse-CDF sampling of N(mean, std) clamped to [a, b].

    Not torch.nn.init.trunc_normal_, which now rejection-samples (other values for one seed).
    A no-op on meta tensors (module docstring).
    """
    if tensor.is_meta:
        return tensor

    def norm_cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        lo, hi = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
        tensor.uniform_(2 * lo - 1, 2 * hi - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
    return tensor


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> torch.Tensor:
    """timm.layers.drop_path: stochastic depth, one keep/drop draw per sample."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm.layers.DropPath: `drop_path` as a module (identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def init_transformer_weights(m: nn.Module) -> None:
    """The Swin/ViT initialisation the official SwinIR and MambaIR code apply with `model.apply`
    (and Serpent with them): truncated-normal Linear weights (std 0.02), zero biases, LayerNorms
    at weight 1 and bias 0. Conv layers keep PyTorch's defaults."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
