"""Model registry shared by serpent/ and baselines/.

It lives here, not in bench/, because model packages must never import the harness (bench ->
models is the only direction). `baselines` already depends on `serpent` for the selective-scan
op, so this is the one place both model packages can reach. The harness (bench.registry) reads
it; model files only fill it with `@register_model`, as timm's model files do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

TASKS = ("deblur", "denoise", "sr")
FAMILIES = ("ssm", "attention", "conv")


@dataclass(frozen=True)
class ModelInfo:
    """What the harness may rely on without building the model.

    Every constructor is called as ``fn(task=..., scale=..., **overrides)`` and returns an
    nn.Module mapping an image batch (B, 3, h, w) in [0, 1] to (B, 3, h*s, w*s) where s is
    ``scale`` if ``upsampler`` is true and the task is "sr", else 1.
    """

    name: str
    fn: Callable[..., nn.Module]
    family: str
    multiple: int  # input height/width must be a multiple of this (1: the model pads itself)
    upsampler: bool  # True: for SR the model takes the low-res image and upsamples itself
    reference: str  # paper and official code
    tasks: tuple[str, ...] = TASKS
    scales: tuple[int, ...] = (2, 3, 4, 8)  # SR factors the constructor accepts
    notes: str = ""
    defaults: dict = field(default_factory=dict)  # constructor overrides that define this entry
    alias_of: str = ""  # same network as another entry: 'all' sweeps skip it


_MODELS: dict[str, ModelInfo] = {}


def register_model(
    *,
    family: str,
    multiple: int,
    upsampler: bool,
    reference: str,
    tasks: tuple[str, ...] = TASKS,
    scales: tuple[int, ...] = (2, 3, 4, 8),
    name: str | None = None,
    notes: str = "",
    alias_of: str = "",
    **defaults,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a constructor under ``name`` (default: the function's name)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} registered twice")
        _MODELS[key] = ModelInfo(key, fn, family, multiple, upsampler, reference, tuple(tasks),
                                 tuple(scales), notes, dict(defaults), alias_of)
        return fn

    return wrap


def registered() -> dict[str, ModelInfo]:
    """The registry as filled so far (import the model modules first)."""
    return dict(_MODELS)
