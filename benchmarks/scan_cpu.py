"""Chunked PyTorch selective scan vs the sequential loop on this CPU (forward, fp32).

    python -m benchmarks.scan_cpu --out results/scan_cpu.jsonl

The two backends run interleaved (one run of each per round) so that load from other processes
hits both alike; each row reports the median, IQR and min over the rounds, the speedup of the
median over the loop's median, the fp32 relative error against the loop, the thread count and
the 1-minute load average (on a shared machine the multi-threaded ops of the chunked scan suffer
from other processes far more than the loop, whose small ops run on one thread anyway).
Acceptance (issue 3): chunked >= 20x faster than the loop at L=4096 (b=1, d=64, n=16).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

from bench.environment import environment
from bench.results import append_rows
from serpent.scan import chunk_plan, chunked_scan, sequential_scan

TARGET_SPEEDUP = 20.0


def scan_inputs(b: int, d: int, l: int, n: int = 16, *, groups: int = 1, z: bool = True,
                device="cpu", seed: int = 0) -> dict:
    """Inputs in a trained Mamba's regime: A near the S4D-real init -(1..n), delta_bias the
    softplus-inverse of dt log-uniform in [1e-3, 1e-1], delta_softplus=True by the caller."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    dt = torch.exp(torch.empty(d).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    s4d = torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    inp = dict(u=r(b, d, l), delta=0.1 * r(b, d, l),
               A=-s4d * (1 + 0.1 * torch.rand(d, n, generator=gen)),
               B=r(b, groups, n, l), C=r(b, groups, n, l), D=1 + 0.1 * r(d),
               z=r(b, d, l) if z else None, delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {k: v.to(device) for k, v in inp.items() if v is not None}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--l", type=int, nargs="+", default=[4096])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu")
    fns = {"sequential": sequential_scan, "chunked": chunked_scan}
    rows, ok = [], True
    for l in args.l:
        inp = scan_inputs(args.b, args.d, l, args.n)
        times = {k: [] for k in fns}
        with torch.inference_mode():
            outs = {k: fn(**inp, delta_softplus=True) for k, fn in fns.items()}  # warm-up
            err = ((outs["chunked"] - outs["sequential"]).norm() / outs["sequential"].norm()).item()
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(**inp, delta_softplus=True)
                    times[name].append((time.perf_counter() - t0) * 1e3)
        loop_median = statistics.median(times["sequential"])
        for name, ts in times.items():
            q1, med, q3 = quartiles(ts)
            rows.append({
                "kind": "scan_cpu", "backend": name, "b": args.b, "d": args.d, "l": l,
                "n": args.n, "chunk": chunk_plan(args.b, args.d, args.n, l, "cpu")[0] if name == "chunked" else None,
                "dtype": "float32", "pass": "forward", "median_ms": med, "iqr_ms": q3 - q1,
                "min_ms": min(ts), "runs": len(ts), "speedup": loop_median / med,
                "rel_err_vs_sequential": err if name == "chunked" else 0.0,
                "cpu": env["device_name"], "threads": torch.get_num_threads(),
                "loadavg_1m": os.getloadavg()[0], **env})
            print(f"l={l:6d} {name:10s} median {med:9.2f} ms  iqr {q3 - q1:7.2f}  "
                  f"min {min(ts):9.2f}  speedup {loop_median / med:6.1f}x"
                  + (f"  rel.err {err:.1e}" if name == "chunked" else ""))
        ok &= err < 1e-5
    append_rows(args.out, rows)
    chunked = [r for r in rows if r["backend"] == "chunked" and r["l"] == 4096]
    for r in chunked:
        verdict = "meets" if r["speedup"] >= TARGET_SPEEDUP else "misses"
        print(f"L=4096: chunked is {r['speedup']:.1f}x the loop "
              f"({verdict} the {TARGET_SPEEDUP:.0f}x target)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
