"""Does our timer tell the truth? Compare bench.timing.measure with triton.testing.do_bench on the
same workloads (median of each), and our timer with itself on a second run.

    python -m bench.benchmarks.timer_check --out results/timer_check.jsonl

Acceptance (issue 2): |ours / do_bench - 1| < 3%, and two runs of ours within 2%.
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench import registry
from bench.environment import environment
from bench.results import append_rows
from bench.timing import measure

WORKLOADS = [  # (model, res, dtype): one conv, one attention, one SSM model
    ("nafnet_w32", 1024, torch.bfloat16),
    ("swinir", 256, torch.bfloat16),
    ("serpent_s", 1024, torch.bfloat16),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("timer_check needs CUDA", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    device = torch.device("cuda")
    ok = True
    rows = []
    for name, res, dtype in WORKLOADS:
        if name not in registry.list_models():
            print(f"skip {name}: not registered")
            continue
        model = registry.create_model(name, task="deblur", scale=1).to(device).eval()
        x = torch.rand(1, 3, res, res, device=device)

        def fn():
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                model(x)

        first = measure(fn, device=device, warmup=10, iters=args.iters)
        second = measure(fn, device=device, warmup=10, iters=args.iters)
        ref_ms = do_bench(fn, warmup=100, rep=max(200, int(first.median_ms * args.iters)),
                          return_mode="median")
        vs_triton = first.median_ms / ref_ms - 1
        run_to_run = second.median_ms / first.median_ms - 1
        passed = abs(vs_triton) < 0.03 and abs(run_to_run) < 0.02
        ok &= passed
        row = {"kind": "timer_check", "model": name, "res": res, "dtype": str(dtype).split(".")[-1],
               "ours_ms_median": first.median_ms, "ours_ms_median_rerun": second.median_ms,
               "ours_ms_iqr": first.iqr_ms, "iters": first.iters, "do_bench_ms_median": ref_ms,
               "rel_diff_vs_do_bench": vs_triton, "rel_diff_rerun": run_to_run,
               "passed": passed, **environment(device)}
        rows.append(row)
        print(f"{name:12s} {res:5d}px ours {first.median_ms:8.3f} ms  rerun {second.median_ms:8.3f} ms"
              f"  do_bench {ref_ms:8.3f} ms  diff {vs_triton:+.2%}  rerun {run_to_run:+.2%}"
              f"  {'PASS' if passed else 'FAIL'}")
        del model
        torch.cuda.empty_cache()
    append_rows(args.out, rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
