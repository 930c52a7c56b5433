"""The `bench train` checkpoint: its format, atomic save and load, and how a `--weights`
argument (a checkpoint, official weights or a run folder) resolves to a file and its training
configuration.

A checkpoint holds model, optimizer, scheduler, iteration, best validation PSNR and every RNG
state (torch, CUDA, numpy, python) as tensors and plain types, so it loads with
``torch.load(weights_only=True)``; it is written through a temporary file and os.replace, so a
crash never leaves half a checkpoint where the last good one was.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from bench.errors import UsageError
from bench.files import atomic_write

CKPT_FORMAT = "serpent-bench-train-v1"
TRAIN_CONFIG = "train_config.json"
TRAIN_IMAGES = "train_images.json"


# What a run writes into its folder: what --overwrite replaces and what a new run must not.
RUN_FILES = ("last.pt", "best.pt", "train_log.csv", TRAIN_CONFIG, TRAIN_IMAGES)


def check_run_dir(out_dir: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse, before any work, a run folder that cannot be used as asked: a file, or a folder
    that already holds a run when neither --resume (continue it) nor --overwrite (replace it)
    says what to do with it; a new run would silently replace its checkpoints and log."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file; give a folder (it receives checkpoints, "
                         "train_log.csv and train_config.json)")
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out-dir and --overwrite replaces it: "
                         "pick one")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume and not overwrite:
        raise UsageError(f"--out-dir {out} already holds a training run ({', '.join(found)}); "
                         "continue it with --resume, replace it with --overwrite, or give "
                         "another folder")


def clear_run_dir(out_dir: str | Path) -> list[str]:
    """Remove an earlier run's files (--overwrite), so no stale best.pt outlives it; returns
    the names removed. Other files in the folder are left alone."""
    out = Path(out_dir)
    removed = [name for name in RUN_FILES if (out / name).is_file()]
    for name in removed:
        (out / name).unlink()
    return removed


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save, atomically (bench.files.atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint to resume from not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UsageError(f"{path} is not a `bench train` checkpoint")
    return ckpt


def rng_state(device: torch.device) -> dict:
    """Every RNG state as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this process's GPU only: under torchrun the others belong to other ranks
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if device.type == "cuda" and cuda:  # one state, or (older files) one per visible GPU
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[device.index or 0], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))


def resolve_weights(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, training run dir or None). A run dir means its best.pt, else last.pt."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name, p
        raise UsageError(f"{p} holds neither best.pt nor last.pt")
    if not p.is_file():
        raise UsageError(f"weights file not found: {p}")
    return p, (p.parent if (p.parent / TRAIN_CONFIG).is_file() else None)


def budget_of(config: dict) -> dict:
    """The training budget fields a quality row carries."""
    keys = ("iters", "crop", "batch", "lr", "min_lr", "warmup", "weight_decay", "loss",
            "grad_clip", "dtype", "seed", "train_sets", "n_train_images", "recipe", "optimizer",
            "betas", "time_budget_s")
    out = {k: config.get(k) for k in keys}
    out["degradation"] = (config.get("task_config") or {}).get("key")
    result = config.get("result") or {}
    out.update({"trained_iters": result.get("iteration"), "train_wall_s": result.get("wall_s"),
                "train_step_s": result.get("mean_step_time"),
                "train_data_wait_fraction": result.get("data_wait_fraction"),
                "train_s": result.get("train_s"), "val_s": result.get("val_s"),
                "ckpt_s": result.get("ckpt_s"),
                "train_device": (config.get("environment") or {}).get("device_name")})
    return out


def load_weights_into(module: torch.nn.Module, path: Path) -> dict | None:
    """Load a `bench train` checkpoint (returns its config) or official weights (via
    bench.quality.weights.load_weights: wrapper keys, prefixes, strict shape checks; returns None)."""
    from bench.quality.weights import load_weights

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (bench.quality.weights explains unreadable files)
        state = None
    if isinstance(state, dict) and state.get("format") == CKPT_FORMAT:
        try:
            module.load_state_dict(state["model"], strict=True)
        except RuntimeError as e:
            raise UsageError(f"{path} does not fit {type(module).__name__} as built (task, "
                             f"scale, --set overrides): {str(e).splitlines()[0]}") from None
        return state.get("config")
    load_weights(module, path)
    return None
