"""Run a list of configurations, each isolated if asked, appending one row per config.

Isolation = one fresh Python process per config (`python -m bench.measure.worker`), so allocator state,
cudnn autotuning caches and a crashed CUDA context cannot leak into the next measurement. A child
that dies without answering still yields a row (status=error, with its exit code and stderr tail).
Rows are appended as soon as they exist: a killed sweep keeps everything finished so far.

Sharded over GPUs (`bench run --gpus 0,1 | all`): one worker thread per GPU pulls configs from a
shared queue (most expensive first, so the tail is short) and runs each in a fresh child process
that sees only its GPU (CUDA_VISIBLE_DEVICES). The parent alone appends rows, one locked write
each, so lines never interleave; every row records the physical GPU index and UUID it ran on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Iterable

from bench.measure.config import RunConfig
from bench.measure.row import measure_config
from bench.results import append_rows, config_key, read_rows

ROW_MARKER = "BENCH_ROW "


def done_keys(path) -> set[tuple]:
    """Configs already measured in `path` (errors are retried, other statuses count as done)."""
    return {config_key(r) for r in read_rows(path) if r.get("status") != "error"}


def run_isolated(cfg: RunConfig, timeout_s: float, gpu: int | None = None) -> dict:
    """Measure `cfg` in a fresh interpreter (seeing only GPU `gpu` if given); always a row."""
    cmd = [sys.executable, "-m", "bench.measure.worker"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env.update(CUDA_VISIBLE_DEVICES=str(gpu), BENCH_PHYSICAL_GPU=str(gpu))
    try:
        proc = subprocess.run(cmd, input=json.dumps(cfg.to_json()), capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return _failure_row(cfg, f"timeout: config took longer than {timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROW_MARKER):
            return json.loads(line[len(ROW_MARKER):])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return _failure_row(cfg, f"worker exited with code {proc.returncode} without a row: {tail}"[:500])


def _failure_row(cfg: RunConfig, message: str) -> dict:
    from bench.environment import environment
    from bench.measure.row import base_row

    import torch
    return {**base_row(cfg), **environment(torch.device(cfg.device)), "status": "error",
            "message": message}


def _report(bar, row: dict) -> None:
    if row["status"] != "ok":
        bar.write(f"  {row['model']} {row['res']}px {row['mode']} {row['dtype']}: {row['status']}: "
                  f"{(row.get('message') or '')[:160]}")


def run_sweep(configs: Iterable[RunConfig], out, *, isolate: bool, timeout_s: float = 900,
              progress: bool = True, gpus: list[int] | None = None,
              workers: int = 1) -> list[dict]:
    """Measure every config, appending each row to `out` as soon as it exists.

    `gpus`: one worker per listed GPU; else `workers` > 1: that many CPU worker processes.
    """
    from tqdm import tqdm

    configs = list(configs)
    if gpus:
        return _run_sharded(configs, out, list(gpus), timeout_s, progress)
    if workers > 1:
        return _run_sharded(configs, out, [None] * workers, timeout_s, progress)
    rows = []
    bar = tqdm(configs, desc="bench run", unit="config", disable=not progress, file=sys.stderr)
    for cfg in bar:
        bar.set_postfix_str(f"{cfg.model} {cfg.res}px {cfg.mode} {cfg.dtype}")
        row = run_isolated(cfg, timeout_s) if isolate else measure_config(cfg)
        append_rows(out, [row])
        rows.append(row)
        _report(bar, row)
    return rows


def estimated_cost(cfg: RunConfig) -> float:
    """Relative cost for queue order: forward GFLOPs x (3 for a train step) x batch."""
    from bench.measure.row import count_config_flops

    try:
        gflops = count_config_flops(cfg)
    except Exception:  # noqa: BLE001 - ordering only; the measurement reports the real error
        gflops = cfg.res ** 2 / 1e4
    return gflops * cfg.batch * (3 if cfg.mode == "train" else 1) * (2 if cfg.dtype == "fp32" else 1)


def _run_sharded(configs: list[RunConfig], out, slots: list[int | None], timeout_s: float,
                 progress: bool) -> list[dict]:
    """One thread per slot (a GPU index, or None for a CPU worker), each running isolated
    children; only this process writes the results file."""
    import queue
    import threading

    from tqdm import tqdm

    order = sorted(configs, key=estimated_cost, reverse=True)
    todo: queue.Queue = queue.Queue()
    for cfg in order:
        todo.put(cfg)
    rows: list[dict] = []
    lock = threading.Lock()
    what = f"{len(slots)} GPUs" if slots[0] is not None else f"{len(slots)} workers"
    bar = tqdm(total=len(order), desc=f"bench run ({what})", unit="config",
               disable=not progress, file=sys.stderr)

    def worker(gpu: int | None) -> None:
        while True:
            try:
                cfg = todo.get_nowait()
            except queue.Empty:
                return
            row = run_isolated(cfg, timeout_s, gpu=gpu)
            if gpu is not None:
                row.setdefault("gpu_index", gpu)
            with lock:
                append_rows(out, [row])
                rows.append(row)
                bar.update(1)
                _report(bar, row)

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    return rows
