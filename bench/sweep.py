"""Run a list of configurations, each isolated if asked, appending one row per config.

Isolation = one fresh Python process per config (`python -m bench.worker`), so allocator state,
cudnn autotuning caches and a crashed CUDA context cannot leak into the next measurement. A child
that dies without answering still yields a row (status=error, with its exit code and stderr tail).
Rows are appended as soon as they exist: a killed sweep keeps everything finished so far.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Iterable

from bench.measure import RunConfig, measure_config, row_key
from bench.results import append_rows, read_rows

ROW_MARKER = "BENCH_ROW "


def done_keys(path) -> set[tuple]:
    """Configs already measured in `path` (errors are retried, other statuses count as done)."""
    return {row_key(r) for r in read_rows(path) if r.get("status") != "error"}


def run_isolated(cfg: RunConfig, timeout_s: float) -> dict:
    """Measure `cfg` in a fresh interpreter; always returns a row."""
    cmd = [sys.executable, "-m", "bench.worker"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(cfg.to_json()), capture_output=True,
                              text=True, timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return _failure_row(cfg, f"timeout: config took longer than {timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROW_MARKER):
            return json.loads(line[len(ROW_MARKER):])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return _failure_row(cfg, f"worker exited with code {proc.returncode} without a row: {tail}"[:500])


def _failure_row(cfg: RunConfig, message: str) -> dict:
    from bench.environment import environment
    from bench.measure import _base_row

    import torch
    return {**_base_row(cfg), **environment(torch.device(cfg.device)), "status": "error",
            "message": message}


def run_sweep(configs: Iterable[RunConfig], out, *, isolate: bool, timeout_s: float = 900,
              progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    configs = list(configs)
    rows = []
    bar = tqdm(configs, desc="bench run", unit="config", disable=not progress, file=sys.stderr)
    for cfg in bar:
        bar.set_postfix_str(f"{cfg.model} {cfg.res}px {cfg.mode} {cfg.dtype}")
        row = run_isolated(cfg, timeout_s) if isolate else measure_config(cfg)
        append_rows(out, [row])
        rows.append(row)
        if row["status"] != "ok":
            bar.write(f"  {cfg.model} {cfg.res}px {cfg.mode} {cfg.dtype}: {row['status']}: "
                      f"{row.get('message', '')[:160]}")
    return rows
