"""The command-line vocabulary, in one place: how every command (and benchmark script) names a
task, an SR scale, a precision, a measure, a loss, a device, a `--set` override and a torchrun
rank, and how each is checked. One spelling, one parser, one error message per word.

Torch-free at import (the commands import it for their `--help`); `resolve_device` imports
torch when called. The models declare which tasks they support in `serpent.registry`
(models never import the harness); `tests/test_options.py` checks that both lists agree.
"""
from __future__ import annotations

import json
import os

import click

from bench.errors import UsageError

TASKS = ("deblur", "sr", "denoise")
DEFAULT_SR_SCALE = 8  # x8 is the SR task of the Serpent paper (docs/design.md, "Tasks")
PRECISIONS = ("fp32", "bf16", "fp16")  # bf16/fp16 = autocast, weights stay fp32
MODES = ("infer", "train")
MEASURES = ("params", "flops", "latency", "memory")
LOSSES = ("l1", "l2", "charbonnier")
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."


def default_scale(task: str) -> int:
    """The SR factor when none is given: x8 for sr, 1 for the x1 tasks."""
    return DEFAULT_SR_SCALE if task == "sr" else 1


def resolve_scale(task: str, scale: int | None) -> int:
    """`--scale` checked against `--task`: only SR has a factor."""
    if scale is None:
        return default_scale(task)
    if task != "sr" and scale != 1:
        raise UsageError(f"--scale applies to --task sr only (task {task} is x1)")
    if scale < 1:
        raise UsageError(f"--scale must be a positive integer, got {scale}")
    return scale


def torch_dtype(precision: str):
    """The torch dtype of a precision name (imports torch)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def int_list(value: str, what: str) -> list[int]:
    """'256,512' -> [256, 512]; positive integers only."""
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated positive integers, got {value!r}") from None
    if not items or any(i <= 0 for i in items):
        raise UsageError(f"{what} must be comma-separated positive integers, got {value!r}")
    return items


def choice_list(value: str, choices: tuple[str, ...], what: str) -> list[str]:
    """'bf16,fp32' -> ['bf16', 'fp32'], each one of `choices`."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in choices]
    if bad or not items:
        raise UsageError(f"unknown {what} {', '.join(bad) or repr(value)}; "
                         f"choose from {', '.join(choices)}")
    return items


def split_names(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'Kodak24, Set5' -> ['Kodak24', 'Set5'] (empty entries dropped)."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else spec
    return [s.strip() for s in items if s and s.strip()]


def parse_overrides(pairs) -> dict:
    """`--set key=value` pairs -> constructor keyword arguments. The key must be a Python
    identifier (it becomes a keyword); the value is read as a JSON literal when it is one
    (numbers, true/false, lists), else as a string."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--set expects key=value with a Python identifier as key, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def resolve_device(spec: str | None) -> str:
    """'auto' (or None) -> 'cuda' when CUDA is available, else 'cpu'; explicit names checked."""
    import torch

    if spec in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec} asked for, but CUDA is not available here "
                             "(use --device cpu, or run on a machine with an NVIDIA GPU)")
        try:
            index = torch.device(spec).index
        except RuntimeError:
            raise UsageError(f"bad device {spec!r}; use {DEVICE_HELP}") from None
        if index is not None and index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has GPUs "
                             f"0..{torch.cuda.device_count() - 1}")
        return spec
    if spec != "cpu":
        raise UsageError(f"bad device {spec!r}; use {DEVICE_HELP}")
    return spec


def torchrun_ranks(environ=os.environ) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun exports them; (0, 1, 0) in a plain process.
    Malformed or inconsistent values are a usage error, never silently rank 0."""
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun "
                         "sets them)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"inconsistent torchrun environment: RANK={rank}, "
                         f"WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


# --------------------------------------------------------------------------- shared click options

def device_option(fn):
    return click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)(fn)


def progress_option(fn):
    return click.option("--progress/--no-progress", default=True, show_default=True,
                        help="Progress bar on stderr.")(fn)


def set_option(fn):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Model constructor override (repeatable), e.g. --set width=32 or "
                             "--set attn_impl=math.")(fn)
