"""serpent-bench: measure and compare image-restoration models (quality, FLOPs, speed, memory).

Python API: ``bench.create_model(name, task=..., scale=...)``, ``bench.list_models("*")`` and
``bench.load_results(paths)`` (results files as a pandas DataFrame). Imports are lazy so that
``bench --help`` stays fast.
"""
from __future__ import annotations

__all__ = ["create_model", "list_models", "load_results"]


def create_model(name: str, *, task: str = "deblur", scale: int | None = None, **overrides):
    """Build a registered model (see ``bench models``) as a plain nn.Module."""
    from bench.registry import create_model as _create
    return _create(name, task=task, scale=scale, **overrides)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern."""
    from bench.registry import list_models as _list
    return _list(pattern)


def load_results(paths, kind: str | None = None):
    """Rows of one or more results JSONL files as a pandas DataFrame (see bench.results)."""
    from bench.results import load_results as _load
    return _load(paths, kind=kind)
