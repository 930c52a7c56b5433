"""Where the seconds of an isolated `bench run` go, per config and phase, before and after issue 15.

    python -m benchmarks.sweep_overhead --out DIR        # one GPU, about 2-3 minutes

Part 1 (phases): a few configs measured in isolated processes two ways, each row keeping the
worker's `phase_s` (start, import, flops, device_init, build, warmup, timed; `wall` = the
parent's seconds for the config, `server_start` = a fork server's one-time start):
- "before": what `bench run` did before issue 15 -- a fresh interpreter per config
  (start="spawn"), FLOPs counted in the worker (precount=False), 10 warm-up calls and at least
  50 timed calls and 1 s (budget 0);
- "after": the defaults now -- children forked from a server that imported everything once,
  FLOPs counted once by the parent, adaptive call counts within a 2 s budget.
Overhead = wall - warm-up - timed (the issue's goal: <= 3 s per config in isolated mode; the
first config of a fork server also waits for the server's one-time start, `server_start`). The
two paths must agree on GFLOPs exactly, and their medians are printed side by side.

Part 2 (command): the wall time of `bench run --models serpent,swinir --res 256,512,1024` as a
user types it (issue 15: 208 s on one H200; goal <= 60 s), with each row's phases.

Every part runs in its own try/except; rows go to DIR/sweep_overhead.jsonl (kind
"sweep_overhead", with the card's name and the environment), the command's results to
DIR/command.jsonl, progress to stdout.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from pathlib import Path

PHASE_CONFIGS = [  # (model, res, dtype, mode): a launch-bound SSM, an attention model, a train step
    ("serpent_s", 256, "fp32", "infer"),
    ("swinir", 256, "fp32", "infer"),
    ("serpent_s", 512, "bf16", "train"),
]
BEFORE = dict(warmup=10, iters=50, min_time=1.0, budget=0.0)  # TIMING_DEFAULTS["cuda"] before
COMMAND = ["run", "--models", "serpent,swinir", "--res", "256,512,1024", "--no-progress"]
PHASES = ("start", "import", "flops", "device_init", "build", "warmup", "timed", "wall")


def say(msg: str) -> None:
    print(msg, flush=True)


def overhead(row: dict) -> float | None:
    p = row.get("phase_s") or {}
    if p.get("wall") is None:
        return None
    return p["wall"] - (p.get("warmup") or 0.0) - (p.get("timed") or 0.0)


def _summary(path: str, row: dict, env: dict) -> dict:
    keep = ("model", "res", "dtype", "mode", "status", "message", "gflops", "latency_ms_median",
            "latency_ms_iqr", "iters", "warmup", "timing_stop", "noisy", "phase_s")
    return {"kind": "sweep_overhead", "part": "phases", "path": path,
            **{k: row.get(k) for k in keep}, "overhead_s": overhead(row), **env}


PATHS = {"before": (BEFORE, "spawn", False), "after": ({}, "fork", True)}


def phases(out: Path, device: str, env: dict, paths: list[str], res: int | None) -> list[dict]:
    from bench.measure.config import plan_sweep
    from bench.measure.sweep import run_sweep
    from bench.results import append_rows

    rows = []
    for path in paths:
        timing, start, precount = PATHS[path]
        configs = [plan_sweep(models=m, res=[res or r], dtype=d if device == "cuda" else "fp32",
                              mode=md, device=device, **timing)[0]
                   for m, r, d, md in PHASE_CONFIGS]
        t0 = time.perf_counter()
        measured = run_sweep(configs, out / f"phases_{path}.jsonl", isolate=True,
                             progress=False, start=start, precount=precount)
        say(f"[phases] {path}: {len(configs)} configs in {time.perf_counter() - t0:.1f} s")
        for row in measured:
            rows.append(_summary(path, row, env))
            p = row.get("phase_s") or {}
            say(f"  {row['model']:10s} {row['res']:5d}px {row['dtype']} {row['mode']:5s} "
                f"{row['status']:5s} median {row.get('latency_ms_median') or 0:9.3f} ms "
                f"({row.get('iters')} calls, {row.get('warmup')} warm-up) overhead "
                f"{overhead(row) or 0:6.2f} s | " + " ".join(
                    f"{k} {p[k]:.2f}" for k in (*PHASES, "server_start") if p.get(k) is not None))
    append_rows(out / "sweep_overhead.jsonl", rows)
    by = {(r["path"], r["model"], r["res"], r["dtype"], r["mode"]): r for r in rows}
    for key in sorted({k[1:] for k in by}):
        a, b = by.get(("before", *key)), by.get(("after", *key))
        if not (a and b and a["status"] == b["status"] == "ok"):
            continue
        same = a["gflops"] == b["gflops"]
        change = b["latency_ms_median"] / a["latency_ms_median"] - 1
        say(f"[check] {' '.join(map(str, key))}: GFLOPs {'equal' if same else 'DIFFER'} "
            f"({a['gflops']} / {b['gflops']}); median before {a['latency_ms_median']:.3f} ms, "
            f"after {b['latency_ms_median']:.3f} ms ({change:+.1%}); "
            f"overhead {a['overhead_s']:.2f} s -> {b['overhead_s']:.2f} s")
    return rows


def command(out: Path, env: dict, res: int | None) -> dict:
    from bench.results import append_rows, read_rows

    results = out / "command.jsonl"
    args = COMMAND if res is None else [*COMMAND[:3], "--res", str(res), *COMMAND[5:]]
    cmd = [sys.executable, "-m", "bench", *args, "--out", str(results)]
    say(f"[command] bench {' '.join(args)}")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - t0
    rows = read_rows(results)
    say(p.stdout[-4000:])
    if p.returncode:
        say(f"[command] exit code {p.returncode}: {p.stderr[-2000:]}")
    summary = {"kind": "sweep_overhead", "part": "command", "command": "bench " + " ".join(args),
               "wall_s": wall, "returncode": p.returncode, "rows": len(rows),
               "statuses": [r.get("status") for r in rows],
               "overhead_s": [overhead(r) for r in rows],
               "phase_s": [r.get("phase_s") for r in rows],
               "configs": [f"{r.get('model')} {r.get('res')} {r.get('dtype')} {r.get('mode')}"
                           for r in rows], "goal_s": 60, **env}
    append_rows(out / "sweep_overhead.jsonl", [summary])
    per_config = [o for o in summary["overhead_s"] if o is not None]
    first = per_config[0] if per_config else float("nan")
    worst = max(per_config[1:], default=float("nan"))
    say(f"[command] {len(rows)} rows in {wall:.1f} s (goal <= 60 s); overhead of the first "
        f"config {first:.2f} s (includes the worker server's one-time start), worst of the "
        f"others {worst:.2f} s (goal <= 3 s)")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSONL results")
    ap.add_argument("--skip-before", action="store_true",
                    help="phases of the current defaults only (saves about a minute)")
    ap.add_argument("--res", type=int, default=None,
                    help="one resolution for every config (a CPU smoke test: --res 32)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from bench.environment import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(torch.device(device))  # the card's name goes in every row
    say(f"device: {env.get('device_name')}, torch {env.get('torch')}, "
        f"commit {env.get('git_commit')}")
    paths = ["after"] if args.skip_before else ["before", "after"]
    ok = True
    for part in (lambda: phases(out, device, env, paths, args.res),
                 lambda: command(out, env, args.res)):
        try:
            part()
        except Exception:  # noqa: BLE001 - one part failing must not lose the other
            ok = False
            say(traceback.format_exc())
    say(f"results: {out / 'sweep_overhead.jsonl'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
