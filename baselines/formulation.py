"""Named formulations: how a baseline computes its (unchanged) function.

A formulation is a preset of a model's computation switches (norm implementation, attention
implementation, memory format, ...). Every preset computes the official function with the
official parameters; they differ in kernels, copies and memory. Each model module defines
``FORMULATIONS`` (name -> switches) and ``DEFAULT_FORMULATION``; its constructor takes
``formulation=`` plus any single switch as an override (``--set norm_impl=triton`` on the
command line), and ``model.set_formulation(...)`` switches in place, keeping the weights.

Memory formats: ``"preserve"`` runs in the caller's format (NCHW unless the caller converts, as
``bench run --channels-last`` does) with contiguous weights; ``"channels_last"`` converts the
input and the convolution weights to NHWC and returns the output in the caller's format.
"""
from __future__ import annotations

import torch
import torch.nn as nn

MEMORY_FORMATS = ("preserve", "channels_last")


def resolve_formulation(presets: dict[str, dict], name: str, **overrides) -> dict:
    """The switches of preset `name`, with every override that is not None applied."""
    if name not in presets:
        raise ValueError(f"formulation must be one of {tuple(presets)}, got {name!r}")
    settings = dict(presets[name])
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"unknown formulation switches {sorted(unknown)}; "
                         f"known: {sorted(settings)}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings.get("memory_format", "preserve") not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, "
                         f"got {settings['memory_format']!r}")
    return settings


def apply_memory_format(module: nn.Module, memory_format: str) -> None:
    """Lay out the 4-D weights for `memory_format` (cuDNN picks NHWC kernels when the input or
    the weight is channels_last)."""
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    module.to(memory_format=fmt)


def enter_format(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    if memory_format == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def leave_format(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`y` in the memory format of the caller's input `like` (a no-op when they agree)."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()
