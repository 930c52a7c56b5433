"""Harness view of the model registry: build a model for a task, and the input it expects."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from bench.errors import UsageError
from bench.options import TASKS, default_scale
from serpent.registry import ModelInfo, registered

import baselines  # noqa: F401  (importing registers the models)
import serpent  # noqa: F401


def _models() -> dict[str, ModelInfo]:
    return registered()


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, sorted."""
    return sorted(n for n in _models() if fnmatch.fnmatchcase(n, pattern))


def resolve_models(spec: str | list[str]) -> list[str]:
    """Expand a comma list of names or globs (or 'all') into model names, in the given order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        # 'all' = every distinct network: aliases (e.g. serpent = serpent_s) are skipped
        found = ([n for n in list_models() if not _models()[n].alias_of] if item == "all"
                 else list_models(item))
        if not found:
            raise UsageError(f"unknown model {item!r}; known models: {', '.join(list_models())}")
        names += [n for n in found if n not in names]
    if not names:
        raise UsageError(f"no model given; known models: {', '.join(list_models())}")
    return names


def network_name(name: str) -> str:
    """The network a registered name builds: an alias's target (`serpent` -> `serpent_s`), else
    the name itself (also for names that are not registered)."""
    info = _models().get(name)
    return (info.alias_of or name) if info else name


def model_info(name: str) -> ModelInfo:
    try:
        return _models()[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def check_task(info: ModelInfo, task: str, scale: int) -> None:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task not in info.tasks:
        raise UsageError(f"model {info.name} has no configuration for task {task!r} "
                         f"(it supports {', '.join(info.tasks)})")
    if task == "sr" and scale not in info.scales:
        raise UsageError(f"model {info.name} supports SR scales {info.scales}, not x{scale}")
    if task != "sr" and scale != 1:
        raise UsageError(f"--scale applies to task 'sr' only; task {task!r} is x1")


def create_model(name: str, *, task: str = "deblur", scale: int | None = None, **overrides):
    """Build registered model `name` for `task` (scale defaults to 1, or 8 for 'sr')."""
    info = model_info(name)
    scale = default_scale(task) if scale is None else int(scale)
    check_task(info, task, scale)
    return info.fn(task=task, scale=scale, **{**info.defaults, **overrides})


def create_meta_model(name: str, *, task: str = "deblur", scale: int | None = None, **overrides):
    """The model with meta parameters (shapes only, no memory, no init cost) for params/FLOPs.

    Built directly on the meta device; a constructor that cannot run there (one that needs real
    values at init) is built on the CPU and moved, which is slow: the registered models all
    build on meta (tests check), skipping value initialisation there (see serpent.layers).
    """
    import torch

    try:
        with torch.device("meta"):
            return create_model(name, task=task, scale=scale, **overrides)
    except (RuntimeError, NotImplementedError, TypeError):
        return create_model(name, task=task, scale=scale, **overrides).to("meta")


def count_params(model) -> int:
    """Number of parameter elements (works on meta models)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class InputSpec:
    """What a model is fed for an R x R output: the harness never guesses this per model."""

    size: int  # input height = width
    bicubic: bool  # SR with an x1 model: the input is the bicubic upsample of the low-res image
    skip_reason: str = ""  # non-empty: this (model, res) cannot be measured as asked


def input_spec(info: ModelInfo, task: str, res: int, scale: int) -> InputSpec:
    """Input size for an R x R output (docs/design.md: x1 tasks and x1 models get R x R)."""
    own_upsampler = task == "sr" and info.upsampler
    if own_upsampler and res % scale:
        return InputSpec(res // scale, False, f"res {res} is not divisible by scale {scale}")
    size = res // scale if own_upsampler else res
    if size % info.multiple:
        return InputSpec(size, task == "sr" and not own_upsampler,
                         f"{info.name} needs input sides divisible by {info.multiple}; got {size}")
    return InputSpec(size, task == "sr" and not own_upsampler)
