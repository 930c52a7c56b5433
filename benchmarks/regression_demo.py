"""Does the regression gate catch a real slowdown and stay quiet on noise? (issue 7)

Runs the same small sweep three times on one GPU, each in a fresh process: A, B (unchanged) and
C, where one model is deliberately slowed by applying one of its layers twice (on real tensors
only, so its FLOP count is unchanged and the gate must catch the slowdown from the timings).
Then `bench compare A B` must pass (no false alarm) and `bench compare A C` must fail, on
latency/throughput of the slowed model only.

    python -m benchmarks.regression_demo --out-dir results/regression_demo
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench import registry
from bench.measure.config import plan_sweep
from bench.options import resolve_device
from bench.measure.sweep import run_sweep

MODELS = ("serpent_s", "nafnet_w32", "restormer")
SLOWED = "nafnet_w32"


def _apply_twice(module: torch.nn.Module) -> None:
    """Make `module` run its forward on its own output once more (shape-preserving layers).

    Meta tensors (FLOP counting) pass once: the slowdown must be found by timing, not by FLOPs.
    """
    forward = module.forward

    def twice(x, *a, **k):
        y = forward(x, *a, **k)
        return y if x.is_meta else forward(y, *a, **k)

    module.forward = twice


def slowed_constructor(fn, attr_path: str):
    def build(**kwargs):
        model = fn(**kwargs)
        layer = model
        for part in attr_path.split("."):
            layer = getattr(layer, part) if not part.isdigit() else layer[int(part)]
        _apply_twice(layer)
        return model
    return build


def _compare(a: Path, b: Path, out_dir: Path, tag: str) -> int:
    proc = subprocess.run([sys.executable, "-m", "bench", "compare", str(a), str(b),
                           "--markdown", str(out_dir / f"compare_{tag}.md"),
                           "--json", str(out_dir / f"compare_{tag}.json")],
                          capture_output=True, text=True)
    print(proc.stdout[-3000:])
    print(proc.stderr[-1000:], file=sys.stderr)
    return proc.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--slow-layer", default="encoders.3",
                    help=f"attribute path of the {SLOWED} layer applied twice (encoders.3: the "
                    "28-block stage, about 70% of its FLOPs)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time CUDA graph replays (bench run --cuda-graph): no host launch jitter")
    ap.add_argument("--sweep", choices=["A", "B", "C"], help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {tag: out_dir / f"sweep_{tag}.jsonl" for tag in "ABC"}
    if args.sweep:
        return _one_sweep(args, paths[args.sweep])
    for tag, p in paths.items():
        p.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "benchmarks.regression_demo", "--out-dir",
                        str(out_dir), "--res", str(args.res), "--slow-layer", args.slow_layer,
                        "--sweep", tag, *(["--cuda-graph"] if args.cuda_graph else [])], check=True)
    same = _compare(paths["A"], paths["B"], out_dir, "A_vs_B")
    slowed = _compare(paths["A"], paths["C"], out_dir, "A_vs_C_slowed")
    verdict = json.loads((out_dir / "compare_A_vs_C_slowed.json").read_text())
    failing = {c["config"]["model"] for c in verdict.get("configs", []) if c.get("fail")}
    ok = same == 0 and slowed == 1 and failing == {SLOWED}
    print(f"A vs B (unchanged): exit {same} (want 0); A vs C ({SLOWED} slowed): exit {slowed} "
          f"(want 1), regressions in {sorted(failing)} (want ['{SLOWED}']) -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _one_sweep(args, path: Path) -> int:
    """One sweep in this (fresh) process; sweep C builds the slowed model."""
    device = resolve_device("auto")
    cuda = device == "cuda"
    # the sweep a user would run, with GPU timing settings on either device
    configs = plan_sweep(models=list(MODELS), res=[args.res], dtype="bf16" if cuda else "fp32",
                         device=device, warmup=10, iters=50, min_time=1.0 if cuda else 0,
                         cuda_graph=args.cuda_graph)
    if args.sweep == "C":
        info = registry.model_info(SLOWED)
        object.__setattr__(info, "fn", slowed_constructor(info.fn, args.slow_layer))
    run_sweep(configs, path, isolate=False, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
