"""mamba-ssm's CUDA kernel vs our chunked PyTorch scan on one GPU: agreement and speed.

    python -m benchmarks.scan_gpu --out results/scan_gpu.jsonl

For the selective-scan calls Serpent (serpent_s, batch 1) makes at 256, 512 and 1024 px (its
largest call, level 0 at full scale, and its widest, the bottleneck), both backends run through
the custom op `torch.ops.serpent.selective_scan` on the same fp32 inputs:
- agreement: relative L2 error of the output and of every input gradient, mamba vs chunked
  (required < 1e-4), with each also against the chunked scan in float64 for context;
- speed: forward and forward+backward, CUDA events after warm-up, median/IQR/min of many runs.
Exits 1 if any error exceeds the tolerance. Without mamba-ssm it says so, times the chunked
backend only, and exits 0; without CUDA it exits 2 (use --device cpu --res 32 as a smoke test).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.scan_cpu import scan_inputs
from bench.environment import environment
from bench.results import append_rows
from serpent.model import CONFIGS
from serpent.scan import mamba_available, selective_scan

TOL = 1e-4
INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def serpent_calls(res: int, variant: str = "serpent_s", patch: int = 4) -> list[dict]:
    """(d, l) of Serpent's largest-l and largest-d scan calls at an res x res input."""
    cfg = CONFIGS[variant]
    levels, inner = len(cfg["depths"]), int(2 * cfg["embed_dim"])  # expand 2, 4 directions
    side = lambda lvl: -(-res // (patch * 2 ** lvl))  # noqa: E731
    return [dict(where="level0", d=4 * inner, l=side(0) ** 2),
            dict(where="bottleneck", d=4 * inner * 2 ** (levels - 1), l=side(levels - 1) ** 2)]


def run(inp: dict, backend: str, grad_out: torch.Tensor):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    y = selective_scan(**leaves, delta_softplus=True, backend=backend)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out.to(y.dtype))
    return y.detach(), dict(zip(leaves, grads))


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def time_ms(fn, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def stats(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return dict(median_ms=statistics.median(ts), iqr_ms=q[2] - q[0], min_ms=min(ts), iters=len(ts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--res", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("scan_gpu: no CUDA device here; run it on the GPU machine "
              "(or smoke-test with --device cpu --res 32)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the comparison is about fp32 numerics
    have_mamba = device.type == "cuda" and mamba_available()
    if not have_mamba:
        print("scan_gpu: mamba_ssm is not importable on this machine (or no CUDA): skipping the "
              "mamba kernel; timing the chunked backend only")
    backends = ["mamba", "chunked"] if have_mamba else ["chunked"]
    env = environment(device)
    rows, ok = [], True
    print(f"device: {env['device_name']}  torch {env['torch']}  mamba_ssm {env['mamba_ssm']}")
    for res in args.res:
        for call in serpent_calls(res):
            shape = dict(b=args.batch, d=call["d"], l=call["l"], n=16, g=4)
            # Serpent's call: 4 directions as groups, D, delta_bias, softplus, no z
            inp = scan_inputs(shape['b'], shape['d'], shape['l'], shape['n'], groups=shape['g'],
                              z=False, device=device)
            gy = torch.randn(args.batch, call["d"], call["l"], device=device)
            base = {"kind": "scan_gpu", "res": res, "call": call["where"], **shape,
                    "dtype": "float32", **env}
            # agreement
            ref64 = run({k: v.double() for k, v in inp.items()}, "chunked", gy.double())
            outs = {bk: run(inp, bk, gy) for bk in backends}
            err = {bk: {"out": rel(y, ref64[0]), **{k: rel(g[k], ref64[1][k]) for k in INPUTS}}
                   for bk, (y, g) in outs.items()}
            pair, passed = None, None
            if have_mamba:
                (ym, gm), (yc, gc) = outs["mamba"], outs["chunked"]
                pair = {"out": rel(ym, yc), **{k: rel(gm[k], gc[k]) for k in INPUTS}}
                passed = max(pair.values()) < TOL
                ok &= passed
            rows.append({**base, "backend": "+".join(backends), "pass": "agreement",
                         "rel_err": pair, "rel_err_vs_fp64": err, "tolerance": TOL,
                         "passed": passed})
            worst = {bk: max(e.values()) for bk, e in err.items()}
            print(f"res {res:5d} {call['where']:10s} d={call['d']:5d} l={call['l']:6d}  "
                  + (f"max rel.err mamba vs chunked {max(pair.values()):.1e} "
                     f"({'ok' if passed else 'FAIL'}, worst: {max(pair, key=pair.get)}); "
                     if pair else "")
                  + "vs fp64: " + ", ".join(f"{bk} {w:.1e}" for bk, w in worst.items()))
            del outs, ref64
            # speed
            for bk in backends:
                leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}

                def fwd():
                    with torch.no_grad():
                        selective_scan(**inp, delta_softplus=True, backend=bk)

                def train():
                    selective_scan(**leaves, delta_softplus=True, backend=bk).backward(gy)

                for mode, fn in (("forward", fwd), ("forward+backward", train)):
                    st = stats(time_ms(fn, device, args.warmup, args.iters))
                    rows.append({**base, "backend": bk, "pass": mode, **st, "scan_backend": bk})
                    print(f"res {res:5d} {call['where']:10s} d={call['d']:5d} l={call['l']:6d}  "
                          f"{bk:8s} {mode:17s} median {st['median_ms']:9.3f} ms  "
                          f"iqr {st['iqr_ms']:7.3f}  min {st['min_ms']:9.3f}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    append_rows(args.out, rows)
    if have_mamba:
        print("agreement: " + ("all within" if ok else "SOME EXCEED") + f" tolerance {TOL:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
