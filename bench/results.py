"""Append-only JSONL results store, and the one loader that `report` and `compare` share.

Each row is one JSON object on one line, written with a single `write` under an exclusive lock
and fsynced, so concurrent writers never interleave and a killed sweep leaves every complete
line readable. A torn last line (power loss, kill -9 mid-write) is skipped with a warning.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable

# The public columns of an efficiency row, in display order (users script against these).
EFFICIENCY_COLUMNS = [
    "model", "family", "task", "scale", "res", "batch", "dtype", "mode", "params", "gflops",
    "gmacs", "gflops_torch", "unsupported_ops", "latency_ms_median", "latency_ms_iqr",
    "latency_ms_min", "iters", "throughput_img_s", "throughput_mpix_s", "mem_peak_alloc_mb",
    "mem_peak_reserved_mb", "mem_static_mb", "status", "message", "scan_backend", "device_name",
    "torch", "cuda", "mamba_ssm", "git_commit", "host", "time", "noisy",
]
# A configuration is identified by these; `--resume` and `compare` join on them.
CONFIG_KEYS = ["model", "task", "scale", "res", "batch", "dtype", "mode"]
# Run variants that change the numbers (booleans, False when absent), plus `overrides`.
VARIANT_FLAGS = ("compile", "channels_last", "cuda_graph")
STATUSES = ("ok", "oom", "error", "skipped")


def json_safe(value):
    """JSON has no NaN/inf: store them as null so every reader agrees."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows atomically (one write per batch under flock, then fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(json_safe(r), sort_keys=False, allow_nan=False) + "\n" for r in rows)
    if not payload:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A previous writer killed mid-line left no newline: start on a fresh line.
        if os.fstat(fd).st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    payload = "\n" + payload
        data = payload.encode()
        while data:
            n = os.write(fd, data)
            data = data[n:]
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def scan_rows(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[int]]:
    """([(line number, row)], [line numbers that hold no JSON object]) of one file."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(row, dict):
                rows.append((lineno, row))
            else:
                bad.append(lineno)
    return rows, bad


def is_bench_row(row: dict) -> bool:
    """A row the suite wrote: a model, and a kind (efficiency rows, the default kind, also a
    resolution). Anything else in a results file is not a measurement and must not become one
    (e.g. an "unknown device" row in a report)."""
    if not isinstance(row.get("model"), str):
        return False
    kind = row.get("kind", "efficiency")
    return isinstance(kind, str) and (kind != "efficiency" or row.get("res") is not None)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All complete rows of one file; malformed lines are skipped with a warning naming them."""
    path = Path(path)
    if not path.exists():
        return []
    numbered, bad = scan_rows(path)
    rows = [row for _, row in numbered]
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) {bad[:5]} (torn write?)",
                      stacklevel=2)
    return rows


def load_results(paths, kind: str | None = None):
    """Rows of one or more JSONL files as a pandas DataFrame (column `source` = file).

    `kind` filters on the row kind ("efficiency" or "quality"); rows without a kind are
    efficiency rows.
    """
    import pandas as pd

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames = []
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"results file not found: {p}")
        rows = read_rows(p)
        for r in rows:
            r.setdefault("kind", "efficiency")
            r["source"] = str(p)
        frames.append(pd.DataFrame(rows))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if kind is not None and not df.empty:
        df = df[df["kind"] == kind].reset_index(drop=True)
    return df


def config_key(row: dict) -> tuple:
    """Identity of a measured configuration, shared by `bench run --resume` and `bench compare`:
    the public config keys, the variant flags and the overrides (absent variants = defaults)."""
    return (*(row.get(k) for k in CONFIG_KEYS), *(bool(row.get(f, False)) for f in VARIANT_FLAGS),
            json.dumps(row.get("overrides") or {}, sort_keys=True))


def config_dict(key: tuple) -> dict:
    """`config_key` back into named fields."""
    n = len(CONFIG_KEYS)
    return {**dict(zip(CONFIG_KEYS, key)), **dict(zip(VARIANT_FLAGS, key[n:-1])),
            "overrides": json.loads(key[-1])}
