"""Run a list of configurations, each isolated if asked, appending one row per config.

Isolation = one fresh process per config, so allocator state, cudnn autotuning caches and a
crashed CUDA context cannot leak into the next measurement. By default a fork server
(`python -m bench.measure.worker --serve`, started once per sweep or per GPU) imports torch and
the models once and forks one child per config: the interpreter start and imports (~3-5 s a
config) are paid once; `start="spawn"` runs a fresh interpreter per config instead (also the
fallback where fork is missing or a forked child cannot use CUDA). Params and FLOPs do not depend
on dtype, mode or batch: the parent counts them once per (model, task, scale, res, overrides) and
hands them to the children. A child that dies without answering still yields a row
(status=error, with its exit code and stderr tail). Rows are appended as soon as they exist: a
killed sweep keeps everything finished so far, and its children die with it
(bench.measure.worker.die_with_parent).

Sharded over GPUs (`bench run --gpus 0,1 | all`): one worker thread per GPU pulls configs from a
shared queue (most expensive first, so the tail is short) and runs each in a fresh child process
that sees only its GPU (CUDA_VISIBLE_DEVICES). The parent alone appends rows, one locked write
each, so lines never interleave; every row records the physical GPU index and UUID it ran on.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

from bench.measure.config import RunConfig
from bench.measure.row import counted_row, measure_config
from bench.measure.worker import PARENT_ENV, ROW_MARKER
from bench.results import append_rows, config_key, read_rows

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this `bench`
# A forked child that cannot use CUDA says one of these: the sweep then spawns instead.
_FORK_CUDA_ERRORS = ("forked subprocess", "CUDA driver initialization failed",
                     "initialization error")
STARTUP_TIMEOUT_S = 600  # a worker server importing torch and the models on a busy machine
_COUNT_LOCK = threading.Lock()  # sharded sweeps: one thread counts, the cache serves the rest


def done_keys(path) -> set[tuple]:
    """Configs already measured in `path` (errors are retried, other statuses count as done)."""
    return {config_key(r) for r in read_rows(path) if r.get("status") != "error"}


def _worker_env(gpu: int | None) -> dict:
    """The child's environment: this process's `bench` first on its path when it runs from a
    source tree (a child started from another folder must not import an installed copy), its
    pid to die with, its GPU."""
    import site

    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
    if _PACKAGE_ROOT not in {*site.getsitepackages(), site.getusersitepackages()}:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH"))
                                            if p)
    if gpu is not None:
        env.update(CUDA_VISIBLE_DEVICES=str(gpu), BENCH_PHYSICAL_GPU=str(gpu))
    return env


def _request(cfg: RunConfig, counted: dict | None) -> str:
    return json.dumps({"config": cfg.to_json(), "counted": counted, "sent": time.time()})


def parent_counts(cfg: RunConfig) -> dict | None:
    """The params/FLOPs columns for a child (`counted_row`, cached), with the seconds they took
    here the first time (`flops_s`); None when they cannot be counted here: the child then
    counts and reports the error in its row."""
    if not {"params", "flops"} & set(cfg.measure):
        return None
    with _COUNT_LOCK:
        t0 = time.perf_counter()
        try:
            counted = counted_row(cfg)
        except Exception:  # noqa: BLE001 - the child's row says what went wrong
            return None
        return {**counted, "flops_s": time.perf_counter() - t0}


def run_isolated(cfg: RunConfig, timeout_s: float, gpu: int | None = None,
                 counted: dict | None = None) -> dict:
    """Measure `cfg` in a fresh interpreter (seeing only GPU `gpu` if given); always a row."""
    cmd = [sys.executable, "-m", "bench.measure.worker"]
    try:
        proc = subprocess.run(cmd, input=_request(cfg, counted), capture_output=True, text=True,
                              timeout=timeout_s, env=_worker_env(gpu))
    except subprocess.TimeoutExpired:
        return _failure_row(cfg, f"timeout: config took longer than {timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROW_MARKER):
            return json.loads(line[len(ROW_MARKER):])
    return _failure_row(cfg, f"worker exited with code {proc.returncode} without a row: "
                             f"{_tail(proc.stderr)}")


def _tail(text: str) -> str:
    return " | ".join(text.strip().splitlines()[-3:])[:400]


class ForkServer:
    """One `python -m bench.measure.worker --serve` process (seeing only GPU `gpu` if given),
    started at once so its imports overlap the parent's work, restarted after a timeout or a
    crash. `measure` always returns a row."""

    def __init__(self, gpu: int | None = None, *, fork: bool = True):
        self.gpu = gpu
        self.proc: subprocess.Popen | None = None
        self.spawn_only = not (fork and hasattr(os, "fork"))
        self.ready: float | None = None
        self._buf = b""
        self._err = tempfile.TemporaryFile(mode="a+b")  # append mode: truncating it is safe
        if not self.spawn_only:
            self._start()

    def _start(self) -> None:
        self._buf = b""
        self.ready = None  # seconds the server took to start, once it said so
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.measure.worker", "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._err, env=_worker_env(self.gpu))

    def _wait_ready(self) -> str | None:
        """None once the server has imported everything, else why it did not start. Its start
        is not part of any config's --timeout (imports can take long on a busy machine)."""
        line = self._readline(STARTUP_TIMEOUT_S)
        try:
            reply = json.loads(line) if line else {}
        except json.JSONDecodeError:
            reply = {}
        if "ready" in reply:
            self.ready = time.perf_counter() - self.started
            return None
        self._err.seek(0)
        tail = _tail(self._err.read().decode(errors="replace"))
        self.close()
        return f"the worker server did not start: {tail or 'no message'}"

    def measure(self, cfg: RunConfig, timeout_s: float, counted: dict | None = None) -> dict:
        if self.spawn_only:
            return run_isolated(cfg, timeout_s, self.gpu, counted)
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        server_start = None
        if self.ready is None:
            problem = self._wait_ready()
            if problem:
                return _failure_row(cfg, problem[:500])
            server_start = self.ready  # reported once, in the first row it serves
        self._err.truncate(0)
        try:
            self.proc.stdin.write((_request(cfg, counted) + "\n").encode())
            self.proc.stdin.flush()
            line = self._readline(timeout_s)
        except (BrokenPipeError, OSError):
            line = b""
        if line is None:
            self.close()
            return _failure_row(cfg, f"timeout: config took longer than {timeout_s:.0f} s")
        reply = json.loads(line) if line.strip() else {"failed": "fork server exited"}
        if "row" in reply:
            row = reply["row"]
            if server_start is not None and isinstance(row.get("phase_s"), dict):
                row["phase_s"]["server_start"] = server_start
            if row.get("status") == "error" and any(
                    e in (row.get("message") or "") for e in _FORK_CUDA_ERRORS):
                sys.stderr.write("bench run: a forked worker cannot use CUDA here; starting a "
                                 "fresh interpreter per config instead\n")
                self.close()
                self.spawn_only = True
                return run_isolated(cfg, timeout_s, self.gpu, counted)
            return row
        self._err.seek(0)
        tail = _tail(self._err.read().decode(errors="replace"))
        if not line:  # the server itself died: the next config gets a new one
            self.close()
        return _failure_row(cfg, f"{reply['failed']} without a row: {tail}"[:500])

    def _readline(self, timeout_s: float) -> bytes | None:
        """One reply line; b'' when the server died, None on timeout."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return b""
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close(self) -> None:
        """Stop the server; a child still measuring dies with it (die_with_parent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _failure_row(cfg: RunConfig, message: str) -> dict:
    from bench.environment import environment
    from bench.measure.row import base_row

    import torch
    return {**base_row(cfg), **environment(torch.device(cfg.device)), "status": "error",
            "message": message}


def _report(bar, row: dict) -> None:
    where = f"  {row['model']} {row['res']}px {row['mode']} {row['dtype']}"
    if row["status"] != "ok":
        bar.write(f"{where}: {row['status']}: {(row.get('message') or '')[:160]}")
    elif row.get("noisy"):
        bar.write(f"{where}: warning: noisy timing: IQR {row['latency_ms_iqr']:.3g} ms is "
                  f"{row['latency_ms_iqr'] / row['latency_ms_median']:.0%} of the median "
                  f"{row['latency_ms_median']:.3g} ms ({row['iters']} calls); rerun on a quiet "
                  "machine or raise --budget")


def _measure_one(cfg: RunConfig, server: ForkServer | None, timeout_s: float,
                 precount: bool) -> dict:
    """One row: in `server`'s child (isolated) or here; `phase_s.wall` = its seconds here."""
    t0 = time.perf_counter()
    counted = parent_counts(cfg) if precount else None
    if server is None:
        row = measure_config(cfg, counted)
    else:
        row = server.measure(cfg, timeout_s, counted)
    phases = row.get("phase_s")
    if isinstance(phases, dict):
        phases["wall"] = time.perf_counter() - t0
    return row


def run_sweep(configs: Iterable[RunConfig], out, *, isolate: bool, timeout_s: float = 900,
              progress: bool = True, gpus: list[int] | None = None,
              workers: int = 1, start: str = "fork", precount: bool = True) -> list[dict]:
    """Measure every config, appending each row to `out` as soon as it exists.

    `gpus`: one worker per listed GPU; else `workers` > 1: that many CPU worker processes.
    `start`: "fork" (a fork server per worker) or "spawn" (a fresh interpreter per config).
    `precount`: count params/FLOPs here, once per network and resolution, instead of in
    every child.
    """
    from tqdm import tqdm

    if start not in ("fork", "spawn"):
        raise ValueError(f"start must be 'fork' or 'spawn', got {start!r}")
    configs = list(configs)
    if gpus:
        return _run_sharded(configs, out, list(gpus), timeout_s, progress, start, precount)
    if workers > 1:
        return _run_sharded(configs, out, [None] * workers, timeout_s, progress, start, precount)
    rows = []
    server = ForkServer(fork=start == "fork") if isolate and configs else None
    bar = tqdm(configs, desc="bench run", unit="config", disable=not progress, file=sys.stderr)
    try:
        for cfg in bar:
            bar.set_postfix_str(f"{cfg.model} {cfg.res}px {cfg.mode} {cfg.dtype}")
            row = _measure_one(cfg, server, timeout_s, precount)
            append_rows(out, [row])
            rows.append(row)
            _report(bar, row)
    finally:
        if server is not None:
            server.close()
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
                 progress: bool, start: str, precount: bool) -> list[dict]:
    """One thread per slot (a GPU index, or None for a CPU worker), each running isolated
    children; only this process writes the results file."""
    import queue

    from tqdm import tqdm

    servers = [ForkServer(g, fork=start == "fork") for g in slots]  # importing while we sort
    order = sorted(configs, key=estimated_cost, reverse=True)
    todo: queue.Queue = queue.Queue()
    for cfg in order:
        todo.put(cfg)
    rows: list[dict] = []
    lock = threading.Lock()
    what = f"{len(slots)} GPUs" if slots[0] is not None else f"{len(slots)} workers"
    bar = tqdm(total=len(order), desc=f"bench run ({what})", unit="config",
               disable=not progress, file=sys.stderr)

    def worker(gpu: int | None, server: ForkServer) -> None:
        try:
            while True:
                try:
                    cfg = todo.get_nowait()
                except queue.Empty:
                    return
                row = _measure_one(cfg, server, timeout_s, precount)
                if gpu is not None:
                    row.setdefault("gpu_index", gpu)
                with lock:
                    append_rows(out, [row])
                    rows.append(row)
                    bar.update(1)
                    _report(bar, row)
        finally:
            server.close()

    threads = [threading.Thread(target=worker, args=(g, srv), daemon=True)
               for g, srv in zip(slots, servers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    return rows
