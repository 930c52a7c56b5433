"""How well do `bench train` (DDP under torchrun) and `bench run --gpus` use several GPUs? (issue 8)

    python -m benchmarks.ddp_scaling --out results/ddp_scaling.jsonl

Training: each model is trained for --iters steps by the code `bench train` runs (bench.train.loop
under torchrun, one process per GPU) with 1, 2 and 4 GPUs (as many as the host has), and
throughput is read from the per-step times of the training log, leaving out the first --skip
steps (cuDNN autotuning, allocator warm-up, loader start). Two scalings:
- strong: the same global batch (--batch) for every GPU count; efficiency = img/s(N) /
  (N x img/s(1)). Its loss curves must also agree with the 1-GPU run (same global batch, same
  data): their largest relative difference is recorded (bf16 autocast: expect ~1e-2 or less).
- weak: the same batch per GPU (--per-gpu-batch), global batch N x that; efficiency =
  img/s(N, N*b) / (N x img/s(1, b)).
The 1-GPU baseline is a plain single process (torchrun with one process does not wrap DDP).
Data: --train-set under $SERPENT_BENCH_DATA (default: BSD100_train when there), else synthetic
multi-scale noise images; denoising crops (the cheapest degradation, so the loader keeps up).

Sharded sweep: the wall time of `bench run --models serpent_s,nafnet_w32,restormer --res 256,512
--mode infer --dtype bf16 --gpus G` for G = 0, then 0,1, then all (rows into a temporary file).

Writes one JSONL row per (model, scaling, GPU count) and per sweep, with the GPU names, as soon
as each part ends (a `timeout` around the script keeps what finished and stops the processes it
started); prints tables. Nothing new starts after --budget-s seconds (what was skipped gets a row).
Durations on 4x H200 (first run): training 1 GPU 51 s and 2 GPUs 58 s for both models; each
sweep config takes ~10-15 s in its own process. For ~3-minute commands run the parts apart:
    python -m benchmarks.ddp_scaling --out R.jsonl --parts train
    python -m benchmarks.ddp_scaling --out R.jsonl --parts sweep

CPU smoke run (gloo, worker processes instead of GPUs for the sweep), as tests/test_ddp.py does:
    python -m benchmarks.ddp_scaling --out /tmp/s.jsonl --device cpu --world-sizes 1,2 \
        --models nafnet_w32 --set width=8 --iters 4 --skip 1 --crop 32 --batch 4 --parts train
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP_MODELS = "serpent_s,nafnet_w32,restormer"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results JSONL (appended)")
    ap.add_argument("--models", default="serpent_s,nafnet_w32")
    ap.add_argument("--world-sizes", default=None,
                    help="GPU counts, comma list (default 1,2,4 capped at the GPUs present)")
    ap.add_argument("--batch", type=int, default=64, help="global batch of the strong scaling")
    ap.add_argument("--per-gpu-batch", type=int, default=16, help="batch per GPU, weak scaling")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the timing")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None, help="loader workers per process")
    ap.add_argument("--train-set", default=None, help="default BSD100_train, else synthetic")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                    help="model constructor override (tests: tiny models)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--parts", default="train,sweep",
                    help="train (DDP scaling), sweep (sharded `bench run` wall time; 2+ GPUs, "
                         "or worker processes on the CPU), or both")
    ap.add_argument("--sweep-args", default="--warmup 3 --iters 10 --min-time 0.2",
                    help="timing options added to the sweep command")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="start nothing new after this many seconds")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # a torchrun process: the plan file
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if not args.out:
        ap.error("--out is required")
    return _parent(args)


# ----------------------------------------------------------------------------- parent


def _parent(args) -> int:
    import torch

    from bench.options import parse_overrides, split_names
    from bench.environment import environment
    from bench.results import append_rows

    t_start = time.perf_counter()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    n_dev = torch.cuda.device_count() if cuda else os.cpu_count() or 1
    sizes = sorted({1, *([int(s) for s in args.world_sizes.split(",")] if args.world_sizes
                         else [n for n in (2, 4) if n <= n_dev])})
    bad = [n for n in sizes if args.batch % n or n > n_dev]
    if bad:
        sys.exit(f"world sizes {bad}: need at most {n_dev} and a divisor of --batch {args.batch}")
    models = split_names(args.models)
    parts = split_names(args.parts)
    if not parts or set(parts) - {"train", "sweep"}:
        sys.exit(f"--parts takes train, sweep or train,sweep; got {args.parts!r}")
    workers = args.workers if args.workers is not None else max(
        2, min(8, (os.cpu_count() or 2) // (2 * max(sizes))))
    env = environment(torch.device("cuda", 0) if cuda else "cpu")
    env["host_devices"] = ([torch.cuda.get_device_name(i) for i in range(n_dev)] if cuda
                           else [env["device_name"]])
    tmp = Path(tempfile.mkdtemp(prefix="ddp_scaling-"))
    if "train" in parts:
        root, train_set = _train_data(args.train_set, tmp)
        print(f"data: {train_set} (root {root}); GPU counts {sizes}; models {models}; "
              f"{args.iters} steps, first {args.skip} untimed; workers/process {workers}",
              flush=True)

    rows: list[dict] = []

    def emit(new: list[dict]) -> None:  # rows reach the file as soon as they exist
        append_rows(args.out, new)
        rows.extend(new)

    def left(what: str) -> bool:
        if time.perf_counter() - t_start < args.budget_s:
            return True
        emit([{"kind": "ddp_scaling", "benchmark": "skipped", "status": "skipped", "what": what,
               "message": f"--budget-s {args.budget_s:.0f} s reached", **env}])
        return False

    def remaining() -> float:
        return max(60.0, args.budget_s - (time.perf_counter() - t_start) + 60)

    # a `timeout` around this script stops the children too, and keeps the rows written so far
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results: dict[tuple, dict] = {}
        for n in sizes if "train" in parts else []:
            if not left(f"training on {n} GPU(s)"):
                continue
            jobs = sorted({(m, args.batch) for m in models}
                          | {(m, n * args.per_gpu_batch) for m in models})
            plan = {"device": "cuda" if cuda else "cpu", "task": "denoise", "iters": args.iters,
                    "skip": args.skip, "crop": args.crop, "workers": workers,
                    "data_root": str(root) if root else None, "train_set": train_set,
                    "overrides": parse_overrides(args.overrides),
                    "jobs": [{"model": m, "global_batch": g,
                              "out_dir": str(tmp / f"w{n}-{m}-b{g}"),
                              "result": str(tmp / f"w{n}-{m}-b{g}.json")} for m, g in jobs]}
            plan_path = tmp / f"plan-w{n}.json"
            plan_path.write_text(json.dumps(plan))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(n), "-m", "benchmarks.ddp_scaling",
                   "--worker", str(plan_path)]
            t0 = time.perf_counter()
            rc = _run(cmd, remaining())
            print(f"[{n} GPU(s)] {len(jobs)} trainings in {time.perf_counter() - t0:.0f} s "
                  f"(exit {rc})", flush=True)
            for job, (m, g) in zip(plan["jobs"], jobs):
                p = Path(job["result"])
                results[(m, n, g)] = (json.loads(p.read_text()) if p.exists() else
                                      {"status": "error",
                                       "message": f"no result (torchrun exit {rc})"})
            emit(_training_rows(results, models, n, args, env))

        if "sweep" in parts and cuda and n_dev < 2:
            print("sweep skipped: it compares 1 GPU with several, this host has one")
        elif "sweep" in parts:
            specs = (["0", "0,1"] + (["all"] if n_dev > 2 else [])) if cuda else ["1", "2"]
            base = None
            for spec in specs:
                if not left(f"sweep --gpus {spec}"):
                    continue
                sweep = _sweep(spec, cuda, n_dev, args.sweep_args, tmp, remaining())
                base = base or (sweep["wall_s"] if sweep["n_gpus"] == 1
                                and sweep["exit_code"] == 0 else None)
                emit([_sweep_row(sweep, base, env)])
    except KeyboardInterrupt:
        print("interrupted: the rows so far are written", flush=True)
        return 1
    finally:
        _print_tables(rows)
        print(f"devices: {', '.join(env['host_devices'])}; {len(rows)} rows -> {args.out}; "
              f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _print_tables(rows: list[dict]) -> None:
    from tabulate import tabulate

    train = [[r["model"], r["scaling"], r["world_size"], r["global_batch"], r["batch_per_gpu"],
              r.get("img_s"), r.get("scaling_efficiency"), r.get("data_wait_fraction"),
              r.get("loss_max_rel_diff_vs_1gpu"), r["status"]]
             for r in rows if r["benchmark"] == "ddp_train"]
    if train:
        print(tabulate(sorted(train, key=lambda t: (t[0], t[1], t[2])),
                       headers=["model", "scaling", "GPUs", "global batch", "per GPU", "img/s",
                                "efficiency", "data wait", "loss diff vs 1", "status"],
                       floatfmt=".3g", missingval="-"))
    sweeps = [[r["gpus"], r["n_gpus"], r["wall_s"], r["speedup_vs_1"], r["scaling_efficiency"],
               f"{r['n_ok']}/{r['n_rows']}"] for r in rows if r["benchmark"] == "sharded_sweep"]
    if sweeps:
        print(tabulate(sweeps, headers=["--gpus", "GPUs", "wall s", "speedup", "efficiency",
                                        "ok rows"], floatfmt=".3g", missingval="-"))
    for r in rows:
        if r["benchmark"] == "skipped":
            print(f"skipped (time budget): {r['what']}")


def _run(cmd: list[str], timeout: float) -> int:
    """Run a command in its own session; on timeout stop it and every process it started."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}
    p = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return p.wait(timeout=timeout)
    except BaseException as e:  # timeout, or this script being stopped
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)  # the launcher, its ranks and their loader workers
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        print(f"timeout after {timeout:.0f} s: {' '.join(cmd[:6])} ...", flush=True)
        return -9


def _train_data(name: str | None, tmp: Path):
    """(data root, set name): the named set, BSD100_train when the root has it, else synthetic
    photos-like images (several octaves of smooth noise: edges and texture at every scale)."""
    from bench.quality.data import data_root

    root = data_root(None)
    if name:
        return root, name
    if root is not None and (root / "BSD100_train").is_dir():
        return root, "BSD100_train"
    import numpy as np
    import torch
    from PIL import Image

    folder = tmp / "synthetic"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        img = torch.zeros(3, 320, 480)
        for k, cells in enumerate((4, 8, 16, 32, 64)):
            noise = torch.rand(1, 3, cells * 2 // 3, cells, generator=g)
            up = torch.nn.functional.interpolate(noise, size=(320, 480), mode="bicubic")
            img += up[0] / 2 ** k
        img = (img - img.min()) / (img.max() - img.min())
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"synthetic{i:02d}.png")
    return None, str(folder)


def _sweep(spec: str, cuda: bool, n_dev: int, extra: str, tmp: Path, timeout: float) -> dict:
    from bench.results import read_rows

    out = tmp / f"sweep-{spec.replace(',', '_')}.jsonl"
    cmd = [sys.executable, "-m", "bench", "run", "--models", SWEEP_MODELS, "--mode", "infer",
           "--dtype", "bf16", "--out", str(out), "--no-progress", *extra.split()]
    if cuda:
        cmd += ["--res", "256,512", "--gpus", spec]
        n = n_dev if spec == "all" else len(spec.split(","))
    else:  # CPU smoke run: worker processes stand in for GPUs
        cmd += ["--res", "32", "--device", "cpu", "--isolate", "--workers", spec]
        n = int(spec)
    t0 = time.perf_counter()
    rc = _run(cmd, timeout)
    wall = time.perf_counter() - t0
    rows = read_rows(out)
    print(f"[sweep --gpus {spec}] {len(rows)} rows in {wall:.1f} s (exit {rc})", flush=True)
    return {"gpus": spec, "n_gpus": n, "wall_s": wall, "exit_code": rc, "n_rows": len(rows),
            "n_ok": sum(r.get("status") == "ok" for r in rows),
            "gpu_indices": sorted({r["gpu_index"] for r in rows
                                   if r.get("gpu_index") is not None}),
            "row_devices": sorted({r.get("device_name") for r in rows if r.get("device_name")}),
            "command": " ".join(cmd[1:]).replace(str(out), "<tmp>.jsonl")}


def _training_rows(results: dict, models: list[str], n: int, args, env) -> list[dict]:
    """Rows of GPU count n, strong and weak, against the 1-GPU runs of the same scaling."""
    rows = []
    for m in models:
        for scaling in ("strong", "weak"):
            def gb(k: int, scaling=scaling) -> int:
                return args.batch if scaling == "strong" else k * args.per_gpu_batch

            base = results.get((m, 1, gb(1)), {})
            r = results[(m, n, gb(n))]
            row = {"kind": "ddp_scaling", "benchmark": "ddp_train", "model": m,
                   "scaling": scaling, "world_size": n, "global_batch": gb(n),
                   "batch_per_gpu": gb(n) // n, "task": "denoise", "crop": args.crop,
                   "iters": args.iters, "timed_steps": args.iters - args.skip,
                   "efficiency_formula": ("img_s(N) / (N * img_s(1)), same global batch"
                                          if scaling == "strong" else
                                          "img_s(N, N*b) / (N * img_s(1, b)), same batch b "
                                          "per GPU"),
                   **{k: v for k, v in r.items() if k != "losses"}}
            if r.get("img_s") and base.get("img_s"):
                row["scaling_efficiency"] = r["img_s"] / (n * base["img_s"])
                row["speedup_vs_1gpu"] = r["img_s"] / base["img_s"]
            if scaling == "strong" and n > 1 and r.get("losses") and base.get("losses"):
                row["loss_max_rel_diff_vs_1gpu"] = max(
                    abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
            rows.append({**row, **env})
    return rows


def _sweep_row(sweep: dict, base_wall: float | None, env) -> dict:
    ok = sweep["exit_code"] == 0
    speedup = base_wall / sweep["wall_s"] if base_wall and ok else None
    return {"kind": "ddp_scaling", "benchmark": "sharded_sweep", **sweep,
            "status": "ok" if ok else "error", "speedup_vs_1": speedup,
            "scaling_efficiency": speedup / sweep["n_gpus"] if speedup else None, **env}


# ----------------------------------------------------------------------------- torchrun worker


def _worker(plan_path: str) -> int:
    """One torchrun process: every job of the plan through bench.train.loop, one process group."""
    import torch

    from bench.train import distributed
    from bench.train.distributed import Dist
    from bench.quality.tasks import make_task
    from bench.train.loop import TrainConfig, train

    plan = json.loads(Path(plan_path).read_text())
    dist = Dist.from_env()
    device = dist.device(plan["device"])
    task = make_task(plan["task"])
    with distributed.process_group(dist, device):
        for job in plan["jobs"]:
            cfg = TrainConfig(model=job["model"], task=plan["task"], train_sets=[plan["train_set"]],
                              iters=plan["iters"], crop=plan["crop"], batch=job["global_batch"],
                              out_dir=job["out_dir"], workers=plan["workers"], log_every=1,
                              ckpt_every=plan["iters"], progress=False, device=plan["device"],
                              data_root=plan["data_root"], model_overrides=plan["overrides"])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            try:
                train(cfg, task)
                result = _job_stats(Path(job["out_dir"]), job["global_batch"], plan["skip"])
            except Exception as e:  # noqa: BLE001 - recorded; the next job still runs
                result = {"status": "error", "message": f"{type(e).__name__}: {e}"[:500]}
            result["job_wall_s"] = time.perf_counter() - t0
            if device.type == "cuda":
                result["mem_peak_alloc_mb_rank0"] = torch.cuda.max_memory_allocated(device) / 2**20
                torch.cuda.empty_cache()
            if dist.is_main:
                Path(job["result"]).write_text(json.dumps(result))
                print(f"  {job['model']} global batch {job['global_batch']} on {dist.world}: "
                      f"{result.get('img_s', 0):.1f} img/s {result['status']}", flush=True)
            distributed.barrier(dist)
    return 0


def _job_stats(run: Path, global_batch: int, skip: int) -> dict:
    """Throughput from the training log's per-step times (rank 0's clock; every step ends with
    an all-reduce, so it waits for the slowest rank)."""
    with open(run / "train_log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    timed = [r for r in log if int(r["iter"]) > skip]
    if not timed:
        return {"status": "error", "message": f"no steps after the first {skip}"}
    step = sum(float(r["step_time"]) for r in timed) / len(timed)
    wait = sum(float(r["data_wait_fraction"]) for r in timed) / len(timed)
    return {"status": "ok", "img_s": global_batch / step, "step_ms": step * 1e3,
            "data_wait_fraction": wait, "losses": [float(r["loss"]) for r in log],
            "rank_devices": json.loads((run / "train_config.json").read_text()).get("devices")}


if __name__ == "__main__":
    sys.exit(main())
