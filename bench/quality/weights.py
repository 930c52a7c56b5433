"""Load checkpoints (ours or the official releases) into registered models, safely and strictly.

Only ``torch.load(..., weights_only=True)``: a checkpoint that needs arbitrary unpickling (a
pickled module, optimizer classes, ...) is refused, not executed.

Wrappers: official checkpoints nest the state dict under a key. BasicSR-style releases
(SwinIR, Restormer, NAFNet, MambaIR) use ``params`` and, when trained with an EMA copy, also
``params_ema``. The official loaders read ``params`` unless told otherwise: BasicSR's
`load_network` defaults to ``param_key='params'`` (configs opt into ``params_ema``), SwinIR's
`main_test_swinir.py` reads ``params`` for its classical-SR and denoising models (the ones
registered here; ``params_ema`` only for its GAN-trained real-SR models) and falls back to the
plain dict, Restormer's test scripts read ``checkpoint['params']``. So without an explicit `key`,
the first of ``params``, ``params_ema``, ``state_dict``, ``model`` found is used (a plain state
dict is used as is); pass ``key="params_ema"`` for EMA weights. A DataParallel ``module.`` or
torch.compile ``_orig_mod.`` prefix is stripped.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from bench.errors import UsageError

WRAPPER_KEYS = ("params", "params_ema", "state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")
_SHOW = 10  # keys named per category in an error message


def read_state_dict(path: str | Path, key: str | None = None) -> tuple[dict, str | None]:
    """(state dict, wrapper key used or None) from a checkpoint file, prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickle_reason(e)
        if "global" not in reason:  # not a pickle at all
            raise UsageError(f"{path}: cannot read as a torch checkpoint ({reason})") from None
        raise UsageError(f"{path}: refused: not a plain tensor checkpoint (torch.load with "
                         f"weights_only=True: {reason}); re-save it as a state dict from a "
                         f"trusted environment") from None
    except Exception as e:  # truncated or not a torch file at all
        raise UsageError(f"{path}: cannot read as a torch checkpoint "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, Mapping):
        raise UsageError(f"{path}: expected a state dict (a mapping of tensors), "
                         f"got {type(ckpt).__name__}")
    if key is not None:
        if key not in ckpt:
            raise UsageError(f"{path}: no key {key!r} in the checkpoint (top-level keys: "
                             f"{_names(list(ckpt))})")
        used = key
    else:
        used = next((k for k in WRAPPER_KEYS if isinstance(ckpt.get(k), Mapping)), None)
    state = ckpt[used] if used is not None else ckpt
    if not isinstance(state, Mapping):
        raise UsageError(f"{path}: {used!r} holds {type(state).__name__}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UsageError(f"{path}: not a state dict: {len(not_tensors)} entries are not tensors "
                         f"({_names(not_tensors)}); pass key= to pick the nested state dict")
    return {_strip(k): v for k, v in state.items()}, used


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True,
                 key: str | None = None) -> str | None:
    """Load a checkpoint into `model` in place; returns the wrapper key used (None: plain).

    strict=True (default): every parameter and buffer must be present with the same shape, and
    nothing extra; otherwise a UsageError names the missing and unexpected keys and the shape
    mismatches. strict=False tolerates missing/unexpected keys, never shape mismatches.
    """
    state, used = read_state_dict(path, key)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing keys ({_names(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_names(mismatched)})")
    if problems:
        where = f" (under {used!r})" if used else ""
        raise UsageError(f"{path}{where} does not fit {type(model).__name__}: "
                         f"{'; '.join(problems)}. Build the model with the configuration the "
                         f"checkpoint was trained with (task, scale, overrides)")
    model.load_state_dict(state, strict=strict)
    return used


def _unpickle_reason(e: Exception) -> str:
    """The informative line of torch's weights_only error (it leads with generic advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "Unsupported" in ln),
                  lines[0] if lines else type(e).__name__)
    return reason.removeprefix("WeightsUnpickler error: ").split(". Please")[0]


def _strip(name: str) -> str:
    while name.startswith(PREFIXES):
        name = name[len(next(p for p in PREFIXES if name.startswith(p))):]
    return name


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... {len(items) - _SHOW} more" if len(items) > _SHOW else "")
