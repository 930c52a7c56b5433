"""SDPA vs the official math attention in SwinIR and Restormer, on one GPU, in one go.

    python -m benchmarks.attention_paths --out results/attention_paths.jsonl

For every (model, resolution, dtype): one set of random weights; the outputs of the two paths are
compared first (fp32 with TF32 off must agree to 1e-4, a run fails otherwise), then each path is
timed (CUDA events, warm-up, median/IQR/min; bench.measure.timing) with its peak inference memory
(reset after warm-up) and, with --train, one training step's peak memory and time. SwinIR also
runs `sdpa_uncached`: the window plans and shift masks rebuilt on the GPU before every forward,
which bounds what the cache saves (the official code instead rebuilds the mask on the CPU).
Each row records which SDPA kernels accept the model's attention calls (flash / efficient /
cudnn / math) so a slow path can be explained.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings

import torch

from baselines import swinir as swinir_module
from baselines.attention import set_attn_impl
from bench import registry
from bench.environment import environment
from bench.results import append_rows
from bench.measure.timing import measure_with_memory

# (model, task, scale): SwinIR x1 (color-DN network) and x4 SR (input R/4), Restormer x1
WORKLOADS = [("swinir", "denoise", 1), ("swinir", "sr", 4), ("restormer", "deblur", 1)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eligible_backends(model, x, amp) -> list[str]:
    """SDPA backends that run this model's attention calls (each tried alone)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ok = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:  # a refused backend warns why, once per call: keep the log readable
            with sdpa_kernel([backend]), torch.inference_mode(), amp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(x)
            ok.append(name.lower())
        except RuntimeError:
            pass
    return ok


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def run_one(model, x, dtype, train: bool, uncached: bool, iters: int, device) -> dict:
    amp = autocast(device, dtype)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6) if train else None

    def step():
        if uncached:
            swinir_module.clear_window_cache()
        if not train:
            with torch.inference_mode(), amp:
                return model(x)
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = model(x).float().abs().mean()
        loss.backward()
        opt.step()

    model.train(train)
    try:
        timing, memory = measure_with_memory(step, device=device, warmup=5 if train else 10,
                                             iters=iters)
    except torch.OutOfMemoryError:
        opt = None
        torch.cuda.empty_cache()
        return {"status": "oom"}
    except RuntimeError as e:  # e.g. no SDPA kernel for Restormer's H*W-long head dimension
        return {"status": "error", "message": str(e).splitlines()[0][:300]}
    row = {"status": "ok", **timing.as_row(x.shape[0], x.shape[-1] * x.shape[-2])}
    row.pop("latency_samples_ms")
    row.update({"mem_peak_alloc_mb": None, "mem_peak_reserved_mb": None, "mem_static_mb": None,
                **memory})
    if cuda:
        opt = None  # noqa: F841 - free the optimizer state before the next path runs
        torch.cuda.empty_cache()
    return row


def check_equal(model, x, dtype, device) -> float | None:
    """Max |sdpa - math| over the output (TF32 off in fp32 so both paths are true fp32); None
    when the SDPA path does not run (the timing rows then carry its error)."""
    amp = autocast(device, dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode(), amp:
            a = set_attn_impl(model, "sdpa")(x).float()
            b = set_attn_impl(model, "math")(x).float()
    except RuntimeError:
        return None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return (a - b).abs().max().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--res", default="256,512")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--train", action="store_true", help="also time one training step")
    ap.add_argument("--models", default=",".join(f"{m}:{t}:{s}" for m, t, s in WORKLOADS),
                    help="comma list of model:task:scale")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test)")
    ap.add_argument("--overrides", default="{}",
                    help='per-model constructor overrides, JSON: {"swinir": {"depths": [1]}}')
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("attention_paths needs CUDA (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    overrides = json.loads(args.overrides)
    torch.backends.cudnn.benchmark = True
    ok = True
    rows = []
    print(f"{'model':9s} {'task':8s} {'res':>5s} {'dtype':5s} {'mode':5s} {'impl':14s} "
          f"{'median ms':>10s} {'IQR':>7s} {'peak MB':>9s}  max|sdpa-math|  sdpa kernels")
    for spec in args.models.split(","):
        name, task, scale = spec.split(":")
        scale = int(scale)
        for res in (int(r) for r in args.res.split(",")):
            torch.manual_seed(0)
            model = registry.create_model(name, task=task, scale=scale,
                                          **overrides.get(name, {})).to(device)
            with torch.no_grad():  # random relative-position biases, temperatures != 1
                for pname, p in model.named_parameters():
                    if "relative_position_bias_table" in pname:
                        p.normal_(0, 1.0)
                    elif pname.endswith("temperature"):
                        p.uniform_(0.5, 4.0)
            side = res // scale if task == "sr" else res
            x = torch.rand(1, 3, side, side, device=device)
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                model.eval()
                diff = check_equal(model, x, dtype, device)
                kernels = eligible_backends(set_attn_impl(model, "sdpa"), x,
                                            autocast(device, dtype))
                passed = diff is not None and diff < (1e-4 if dtype == torch.float32 else 0.1)
                ok &= passed or diff is None  # a path that does not run is reported, not wrong
                impls = ["sdpa", "math"] + (["sdpa_uncached"] if name == "swinir" else [])
                for mode in ["infer"] + (["train"] if args.train else []):
                    for impl in impls:
                        set_attn_impl(model, impl.split("_")[0])
                        r = run_one(model, x, dtype, mode == "train", impl.endswith("uncached"),
                                    args.iters, device)
                        row = {"kind": "attention_paths", "model": name, "task": task,
                               "scale": scale, "res": res, "input_size": side, "batch": 1,
                               "dtype": dname, "mode": mode, "attn_impl": impl,
                               "max_abs_diff_sdpa_vs_math": diff, "equal_check_passed": passed,
                               "sdpa_kernels_eligible": kernels, **r, **environment(device)}
                        rows.append(row)
                        med = (f"{r['latency_ms_median']:10.2f} {r['latency_ms_iqr']:7.2f} "
                               f"{r['mem_peak_alloc_mb'] or 0:9.0f}" if r["status"] == "ok"
                               else f"{r['status'].upper():>28s}")
                        same = "n/a (sdpa fails)" if diff is None else (
                            f"{diff:.2e} {'ok' if passed else 'FAIL'}")
                        print(f"{name:9s} {task:8s} {res:5d} {dname:5s} {mode:5s} {impl:14s} "
                              f"{med}  {same}  {','.join(kernels)}  {r.get('message', '')}",
                              flush=True)
            del model, x
            swinir_module.clear_window_cache()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    append_rows(args.out, rows)
    print(f"{len(rows)} rows -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
