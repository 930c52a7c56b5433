"""Each baseline in each formulation against its official formulation, on one GPU (issue 13).

    python -m benchmarks.baseline_formulations --out DIR [--deadline-s 290] [--resume ROWS]
    python -m benchmarks.formulation_report DIR/rows.jsonl        # the summary again (also
                                                                  # written to DIR/summary.md)

The official architectures cannot be installed on the GPU machine; the "official formulation"
is each model's own switch that re-states the official ops (Restormer: to_3d + manual mean/var
norm, F.normalize + matmul attention; NAFNet: the official LayerNormFunction; SwinIR: the
explicit softmax attention), on the same weights. Parts, in priority order (each config in
try/except; rows appended and flushed as produced; OOM is a row; a deadline stops the run
cleanly, every config it did not reach is a `skipped` row, and `--resume` with those rows
continues where the run stopped):

0. probe    (always, first) the Triton channel norm against float64 in a child process: a
            faulting kernel cannot poison this process's CUDA context; if it fails, Triton
            formulations are skipped (grid) or replaced by "channels_first" (huge, profile).
1. checks   every formulation against the official one on the GPU: fp32 with TF32 off (outputs
            and all gradients), bf16 (error against an fp32 reference, beside the official
            formulation's own), and the Triton channel norm against the torch formula.
2. grid     Restormer, NAFNet-w64, NAFNet-w32: the grid formulations (default official, fused),
            256/512/1024 px (1024 first), inference and training step, bf16 and fp32 (Restormer's
            1024 px training step waits for part 6).
3. screen   the screen formulations (default fused_cl, channels_first) at 1024 px bf16
            inference and 512 px bf16 training: the candidates for the default.
4. huge     Restormer past 2048 px: convolutions just under / over 2^31 elements, q @ k^T with
            an H*W-long contraction (plain vs split), one full-resolution block at 2048 and
            4096 px with per-op profiles, and the whole model at 2048 / 4096 px.
5. profile  per-op-class device time (conv / matmul / norm / attention / elementwise / copy) of
            Restormer and NAFNet-w64 at 256 and 1024 px bf16, inference and training step.
6. late     Restormer's training step at 1024 px (about 1.2 s a call), grid formulations.
7. screen2  the remaining formulations (layer_norm = before issue 13, layer_norm_cl) as in 3.
8. wide     (not by default) the full grid for the wide formulations (default fused_cl): run
            it when the screen says fused_cl beats fused.
9. others   SwinIR (SDPA vs the official math attention) and MambaIR (no switch: our
            formulation is the official one) at 256 px.

Budget (one H200, estimated from run 4's per-call times): checks ~25 s (Triton compiles
included), grid ~210 s, screen ~45 s, huge ~100 s, profile ~40 s, late ~55 s, screen2 ~40 s,
others ~40 s: about 9 minutes in all. `--deadline-s 290` stops after the screen; the same
command with `--resume <first rows.jsonl>` does the rest.

Timing: batch 1, CUDA events around each call after two warm-up calls (the first autotunes,
cudnn.benchmark on), median and IQR of `--calls` (>= 20) calls; peak memory reset after the
warm-up (max_memory_allocated / reserved). Inference under torch.inference_mode; a training
step is forward, L1 loss, backward, AdamW step. bf16 = autocast; fp32 with TF32 off. A config
runs only if its measured warm-up call says it fits before the deadline.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import mambair, nafnet, restormer, swinir
from baselines.attention import set_attn_impl
from bench.environment import environment
from bench.measure.timing import measure_with_memory
from benchmarks.op_census import class_breakdown, scoped

PARTS = ("checks", "grid", "screen", "huge", "profile", "late", "screen2", "wide", "others")
DEFAULT_PARTS = tuple(p for p in PARTS if p != "wide")  # wide: when screen favours fused_cl
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("infer", "train")


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Module]
    formulations: tuple[str, ...]  # "official" first where the model has it
    switch: Callable[[nn.Module, str], object]
    train_max_res: int = 1024  # larger training steps did not fit 140 GB (results run 4)


def _set_formulation(model, name):
    return model.set_formulation(name)


def _swinir_switch(model, name):
    return set_attn_impl(model, "math" if name == "official" else "sdpa")


WORKLOADS = {
    "restormer": Workload("restormer", lambda: restormer.restormer(task="deblur", scale=1),
                          tuple(restormer.FORMULATIONS), _set_formulation),
    "nafnet_w64": Workload("nafnet_w64", lambda: nafnet.nafnet(task="deblur", scale=1, width=64),
                           tuple(nafnet.FORMULATIONS), _set_formulation),
    "nafnet_w32": Workload("nafnet_w32", lambda: nafnet.nafnet(task="deblur", scale=1, width=32),
                           tuple(nafnet.FORMULATIONS), _set_formulation),
    "swinir": Workload("swinir", lambda: swinir.swinir(task="deblur", scale=1),
                       ("official", "sdpa"), _swinir_switch, train_max_res=512),
    "mambair": Workload("mambair", lambda: mambair.mambair(task="deblur", scale=1),
                        ("ours",), lambda model, name: None, train_max_res=256),
}


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights where every formulation switch matters: norm affines away from (1, 0), NAFNet's
    zero-initialised residual scales and Restormer's unit temperatures randomised."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            def rand(*shape):
                return torch.randn(*shape, generator=g).to(p.device, p.dtype)
            if name.endswith("temperature"):
                p.copy_(torch.rand(p.shape, generator=g).to(p) * 3.5 + 0.5)
            elif name.endswith(("beta", "gamma")):
                p.copy_(rand(*p.shape) * 0.3)
            elif "norm" in name and p.dim() == 1:
                p.add_(rand(*p.shape) * 0.2)
    return model


# --------------------------------------------------------------------------- run state


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Rows:
    """Append-only JSONL writer (one flushed line per row) that knows which configs are done."""

    def __init__(self, path: Path, env: dict, resume: Path | None):
        self.path = path
        self.env = env
        self.done: set[str] = set()
        for src in (resume, path):
            if src and Path(src).exists():
                for line in Path(src).read_text().splitlines():
                    row = json.loads(line)
                    if row.get("status") in ("ok", "oom", "error"):
                        self.done.add(row["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a")

    def write(self, row: dict) -> dict:
        row = {**row, **self.env, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._f.write(json.dumps(row, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if row.get("status") in ("ok", "oom", "error"):
            self.done.add(row["key"])
        return row


def key_of(*parts) -> str:
    return "|".join(str(p) for p in parts)


def run_env(device: torch.device) -> dict:
    env = environment(device)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["cuda_device_name"] = torch.cuda.get_device_name(device)
    env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    env["allocator_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    env["batch"] = 1
    return env


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_step(model: nn.Module, x: torch.Tensor, dtype, mode: str):
    """One call: an inference forward, or a training step (forward, L1, backward, AdamW)."""
    amp = autocast(x.device, dtype)
    if mode == "infer":
        model.eval()

        def infer():
            with torch.inference_mode(), amp:
                return model(x)
        return infer, None
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    target = torch.rand_like(x)

    def train():
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(x)
        F.l1_loss(out.float(), target).backward()
        opt.step()
    return train, opt


def timed(step, device, calls: int, deadline: Deadline, reserve_s: float,
          predicted_call_s: float | None = None) -> dict:
    """Two warm-up calls (the first autotunes; the second, timed on the host, says whether
    `calls` more fit before the deadline), then `calls` timed calls with peak memory.
    `predicted_call_s`, if given, must fit the two warm-up calls too, or nothing runs."""
    if predicted_call_s is not None and (
            deadline.left() - reserve_s < predicted_call_s * (calls + 2) * 1.15):
        return {"status": "skipped", "reason": "deadline",
                "predicted_call_ms": predicted_call_s * 1e3}
    t0 = time.perf_counter()
    step()
    sync(device)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    sync(device)
    call_s = time.perf_counter() - t0
    if deadline.left() - reserve_s < call_s * calls * 1.15 + 0.2:
        return {"status": "skipped", "reason": "deadline", "first_call_s": first_s,
                "warm_call_ms": call_s * 1e3}
    retries = _alloc_retries(device)
    timing, memory = measure_with_memory(step, device=device, warmup=0, iters=calls)
    row = timing.as_row(1, 0)
    row.pop("throughput_mpix_s", None)
    row.update(memory)
    row.update({"status": "ok", "first_call_s": first_s, "warmup": 2,
                "alloc_retries": _alloc_retries(device) - retries})
    return row


def _alloc_retries(device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0)


def guarded(fn, device) -> dict:
    """fn() as a row fragment; OOM and errors are rows too."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        return {"status": "oom", "message": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - one failed config must not lose the run
        return {"status": "error", "message": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                if str(e) else type(e).__name__, "traceback": traceback.format_exc()[-2000:]}
    finally:
        free(device)


# --------------------------------------------------------------------------- parts


class Runner:
    def __init__(self, args, device: torch.device, rows: Rows, deadline: Deadline):
        self.args, self.device, self.rows, self.deadline = args, device, rows, deadline
        self.models: dict[str, nn.Module] = {}
        self.failed_checks: set[tuple[str, str]] = set()
        self.triton_ok = True  # False when the Triton probe failed: those formulations skip
        self.block_ms: dict[tuple, float] = {}  # (side, form, overrides) -> huge block median
        self.model_ms: dict[tuple, float] = {}  # (side, form, overrides) -> huge model median

    def model(self, name: str) -> nn.Module:
        if name not in self.models:
            torch.manual_seed(0)
            self.models[name] = perturb(WORKLOADS[name].build()).to(self.device)
        return self.models[name]

    def usable(self, name: str, form: str) -> str:
        """`form`, or its no-Triton twin ("channels_first") when the Triton probe failed."""
        return "channels_first" if not self.triton_ok and uses_triton(name, form) else form

    def drop_models(self):
        self.models.clear()
        free(self.device)

    def say(self, text: str):
        print(f"[{self.deadline.left():6.0f} s left] {text}", flush=True)

    # ---- timing of one (model, formulation, res, dtype, mode)

    def time_config(self, part: str, name: str, form: str, res: int, dname: str,
                    mode: str) -> None:
        key = key_of("timing", name, form, res, dname, mode)
        if key in self.rows.done:
            return
        base = {"kind": "timing", "part": part, "key": key, "model": name, "formulation": form,
                "res": res, "dtype": dname, "mode": mode, "calls_requested": self.args.calls,
                "check_failed": (name, form) in self.failed_checks}
        w = WORKLOADS[name]
        if mode == "train" and res > w.train_max_res:
            self.rows.write({**base, "status": "skipped",
                             "reason": f"training at {res} px did not fit 140 GB (run 4)"})
            return
        if self.deadline.left() < self.args.reserve_s:
            self.rows.write({**base, "status": "skipped", "reason": "deadline"})
            return
        if not self.triton_ok and uses_triton(name, form):
            self.rows.write({**base, "status": "skipped", "reason": "Triton probe failed"})
            return
        model = self.model(name)
        w.switch(model, form)

        def run():
            x = torch.rand(1, 3, res, res, device=self.device)
            step, opt = make_step(model, x, DTYPES[dname], mode)
            try:
                return timed(step, self.device, self.args.calls, self.deadline,
                             self.args.reserve_s)
            finally:
                model.zero_grad(set_to_none=True)
                del opt

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        row = self.rows.write({**base, "settings": getattr(model, "formulation_settings", None),
                               **guarded(run, self.device)})
        self.say(f"{part:7s} {name:10s} {form:15s} {res:5d} {dname} {mode}: "
                 + (f"{row['latency_ms_median']:9.2f} ms (IQR {row['latency_ms_iqr']:.2f}) "
                    f"{row.get('mem_peak_alloc_mb', 0):9.0f} MB" if row["status"] == "ok"
                    else f"{row['status']} {row.get('reason', row.get('message', ''))}"))

    def grid(self, part: str, models, forms_for, resolutions, dtypes, modes, want=None):
        """Res-major (1024 first), then model, mode, dtype; formulations of a config back to
        back, their order alternating from config to config. `want(name, res, mode)` filters."""
        flip = False
        for res in resolutions:
            for name in models:
                for mode in modes:
                    if want is not None and not want(name, res, mode):
                        continue
                    for dname in dtypes:
                        forms = [f for f in forms_for(name) if f in WORKLOADS[name].formulations]
                        for form in (forms[::-1] if flip else forms):
                            self.time_config(part, name, form, res, dname, mode)
                        flip = not flip

    # ---- 1. checks

    def checks(self):
        self._check_channel_norm()
        for name in self.args.models:
            if len(WORKLOADS[name].formulations) > 1:
                self._check_workload(name)

    def _check_channel_norm(self):
        from baselines.channel_norm import channel_norm

        if not self.triton_ok:
            return
        shapes = [(1, 48, 128, 128), (2, 96, 33, 40), (1, 1024, 16, 16)]
        for shape in shapes:
            for fmt in ("nchw", "nhwc"):
                for dname in ("fp32", "bf16"):
                    key = key_of("check", "channel_norm", shape, fmt, dname)

                    def run(shape=shape, fmt=fmt, dname=dname):
                        g = torch.Generator(device="cpu").manual_seed(1)
                        c = shape[1]
                        x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(self.device)
                        if fmt == "nhwc":
                            x = x.contiguous(memory_format=torch.channels_last)
                        w = (torch.randn(c, generator=g) * 0.5 + 1).to(self.device)
                        b = torch.randn(c, generator=g).to(self.device)
                        x = x.to(DTYPES[dname])
                        dy = torch.randn(*shape, generator=g).to(self.device, x.dtype)
                        out = {}
                        for impl in ("triton", "channels_first"):
                            xi = x.detach().double().requires_grad_()
                            wi, bi = (t.double().requires_grad_() for t in (w, b))
                            if impl == "triton":
                                xi = x.detach().requires_grad_()
                                wi, bi = (t.detach().requires_grad_() for t in (w, b))
                            y = channel_norm(xi, wi, bi, 1e-6, impl=impl)
                            grads = torch.autograd.grad(y, (xi, wi, bi), dy.to(y.dtype))
                            if impl == "triton":
                                out["triton_ran"] = y.grad_fn is not None and "Triton" in type(
                                    y.grad_fn).__name__
                            out[impl] = [y.double(), *(t.double() for t in grads)]
                        errs = [((a - r).abs().max() / r.abs().max()).item()
                                for a, r in zip(out["triton"], out["channels_first"])]
                        ran = out["triton_ran"]
                        tol = 1e-5 if dname == "fp32" else 2e-2
                        return {"status": "ok", "rel_err_out": errs[0], "rel_err_dx": errs[1],
                                "rel_err_dw": errs[2], "rel_err_db": errs[3],
                                "passed": max(errs) < tol, "tolerance": tol, "triton_ran": ran,
                                "reference": "float64 torch formula (channels_first)"}
                    row = self.rows.write({"kind": "check", "part": "checks", "key": key,
                                           "model": "channel_norm", "shape": list(shape),
                                           "layout": fmt, "dtype": dname,
                                           **guarded(run, self.device)})
                    self.say(f"check channel_norm {shape} {fmt} {dname}: {row.get('passed')} "
                             f"{row.get('rel_err_out', row.get('message'))}")

    def _check_workload(self, name: str):
        w = WORKLOADS[name]
        res = self.args.check_res
        model = self.model(name)
        x = torch.rand(1, 3, res, res, device=self.device,
                       generator=torch.Generator(device=self.device).manual_seed(2))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def outputs(form, dtype, grads=True):
            w.switch(model, form)
            model.eval()
            with torch.no_grad(), autocast(self.device, dtype):
                out = model(x).double()
            if not grads:
                return out, None
            model.train()
            model.zero_grad(set_to_none=True)
            torch.manual_seed(3)  # SwinIR's stochastic depth: the same draws for every formulation
            with autocast(self.device, dtype):
                loss = F.l1_loss(model(x).float(), torch.zeros_like(x))
            loss.backward()
            grads = {n: p.grad.double().clone() for n, p in model.named_parameters()
                     if p.grad is not None}
            model.zero_grad(set_to_none=True)
            return out, grads

        def rel(a, b):
            return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

        ref = guarded(lambda: {"status": "ok", "value": outputs("official", torch.float32)},
                      self.device)
        if ref["status"] != "ok":
            self.rows.write({"kind": "check", "part": "checks", "key": key_of("check", name),
                             "model": name, **ref})
            return
        ref_out, ref_grads = ref["value"]
        official_bf16 = None
        for form in w.formulations:
            key = key_of("check", name, form)
            if not self.triton_ok and uses_triton(name, form):
                continue

            def run(form=form):
                nonlocal official_bf16
                out, grads = outputs(form, torch.float32)
                grad_err = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
                out16, _ = outputs(form, torch.bfloat16, grads=False)
                err16 = rel(out16, ref_out)
                if form == "official":
                    official_bf16 = err16
                ok32 = rel(out, ref_out) < 1e-4 and grad_err < 1e-3
                ok16 = official_bf16 is None or err16 <= 2 * official_bf16 + 1e-3
                return {"status": "ok", "res": res, "rel_err_fp32_out": rel(out, ref_out),
                        "rel_err_fp32_grads_max": grad_err, "rel_err_bf16_out_vs_fp32": err16,
                        "official_rel_err_bf16_out_vs_fp32": official_bf16,
                        "passed": ok32 and ok16,
                        "reference": "official formulation, fp32, TF32 off, same weights"}
            row = self.rows.write({"kind": "check", "part": "checks", "key": key, "model": name,
                                   "formulation": form, **guarded(run, self.device)})
            if not row.get("passed"):
                self.failed_checks.add((name, form))
            self.say(f"check {name} {form}: passed={row.get('passed')} "
                     f"fp32 {row.get('rel_err_fp32_out')} grads {row.get('rel_err_fp32_grads_max')}"
                     f" bf16 {row.get('rel_err_bf16_out_vs_fp32')} {row.get('message', '')}")

    # ---- 4. huge

    def huge(self):
        dt = torch.bfloat16
        if self.device.type == "cuda":  # the micro-benchmarks need the real sizes
            # (a) convolutions whose tensors cross 2^31 elements (int32 indexing) at 4096 px
            for fmt in ("nchw", "nhwc"):
                for kind in ("dw3x3", "pw1x1"):
                    for channels in (126, 130):  # 126 * 4096^2 < 2^31 < 130 * 4096^2
                        self._micro_conv(kind, channels, 4096, fmt, dt)
            # (b) q @ k^T with an H*W-long contraction: plain, and split into partial products
            for c in (48, 96):
                for length in (2**20, 2**22, 2**24):
                    for split in (0, 16, 64):
                        self._micro_gram(c, length, split, dt)
        # (c) one full-resolution block (decoder level 1: dim 96, 1 head), 2048 and 4096 px;
        # "fused" bands the block where a tensor would pass 2^31 elements, band_elements=0 not
        for side in self.args.huge_res:
            for form, extra in (("official", {}), ("fused", {}), ("fused", {"band_elements": 0}),
                                ("fused", {"attn_split": 16})):
                if extra.get("band_elements") == 0 and not bands_at(side):
                    continue  # same computation as "fused" at this size
                self._huge_block(side, form, extra)
        # (d) the whole model, bf16 inference
        for side in self.args.huge_res:
            for form, extra in (("fused", {}), ("official", {}), ("fused", {"band_elements": 0})):
                if extra.get("band_elements") == 0 and not bands_at(side):
                    continue
                self._huge_model(side, form, extra)

    def _predicted_model_s(self, side, form, extra) -> float | None:
        """A whole-model call at `side` from the model at side/2 and the block's growth."""
        ek = tuple(extra.items())
        prev = self.model_ms.get((side // 2, form, ek)) or self.model_ms.get((side // 2, form, ()))
        if prev is None:
            return None
        b1 = self.block_ms.get((side // 2, form, ek)) or self.block_ms.get((side // 2, form, ()))
        b2 = self.block_ms.get((side, form, ek))
        growth = b2 / b1 if b1 and b2 else 4.0
        return prev / 1e3 * growth

    def _micro_conv(self, kind, channels, side, fmt, dt):
        key = key_of("huge_conv", kind, channels, side, fmt)
        if key in self.rows.done or self.deadline.left() < self.args.reserve_s + 20:
            return

        def run():
            x_ch = channels if kind == "dw3x3" else 48
            x = torch.randn(1, x_ch, side, side, device=self.device, dtype=dt)
            conv = (nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
                    if kind == "dw3x3" else nn.Conv2d(48, channels, 1, bias=False))
            conv = conv.to(self.device, dt)
            if fmt == "nhwc":
                x = x.contiguous(memory_format=torch.channels_last)
                conv = conv.to(memory_format=torch.channels_last)
            out_elems = channels * side * side

            def step():
                with torch.inference_mode():
                    conv(x)
            row = timed(step, self.device, self.args.calls, self.deadline, self.args.reserve_s)
            if row["status"] == "ok":
                row["ns_per_output_element"] = row["latency_ms_median"] * 1e6 / out_elems
                row["gb_per_s"] = ((x.numel() + out_elems) * 2 / 1e9) / (
                    row["latency_ms_median"] / 1e3)
            return {**row, "output_elements": out_elems, "over_int32": out_elems > 2**31 - 1}
        row = self.rows.write({"kind": "huge_conv", "part": "huge", "key": key, "conv": kind,
                               "channels": channels, "side": side, "layout": fmt, "dtype": "bf16",
                               **guarded(run, self.device)})
        self.say(f"huge conv {kind} C={channels} {side}px {fmt}: {row.get('latency_ms_median')} ms"
                 f" ({row.get('ns_per_output_element')} ns/elem) {row['status']}")

    def _micro_gram(self, c, length, split, dt):
        key = key_of("huge_gram", c, length, split)
        if key in self.rows.done or self.deadline.left() < self.args.reserve_s + 10:
            return

        def run():
            q = torch.randn(1, 1, c, length, device=self.device, dtype=dt)
            k = torch.randn(1, 1, c, length, device=self.device, dtype=dt)
            ref = (q.double() @ k.double().transpose(-2, -1)) if length <= 2**22 else None

            def step():
                return restormer.gram(q, k, split)
            out = step()
            err = None if ref is None else ((out.double() - ref).abs().max()
                                            / ref.abs().max()).item()
            row = timed(step, self.device, self.args.calls, self.deadline, self.args.reserve_s)
            if row["status"] == "ok":
                row["gb_per_s"] = (2 * c * length * 2 / 1e9) / (row["latency_ms_median"] / 1e3)
            return {**row, "rel_err_vs_fp64": err}
        row = self.rows.write({"kind": "huge_gram", "part": "huge", "key": key, "head_dim": c,
                               "length": length, "split": split, "dtype": "bf16",
                               **guarded(run, self.device)})
        self.say(f"huge gram c={c} L={length} split={split}: {row.get('latency_ms_median')} ms "
                 f"{row.get('gb_per_s')} GB/s {row['status']}")

    def _huge_block(self, side, form, extra):
        form = self.usable("restormer", form)
        key = key_of("huge_block", side, form, *(f"{k}={v}" for k, v in extra.items()))
        if key in self.rows.done or self.deadline.left() < self.args.reserve_s + 30:
            return

        def run():
            torch.manual_seed(0)
            block = restormer.TransformerBlock(96, 1, 2.66, False, "WithBias")
            block = perturb(block).to(self.device)
            holder = nn.Sequential(block)
            _switch_blocks(holder, form, extra)
            # bf16, as the convolution before it writes it under autocast in the model
            x = torch.randn(1, 96, side, side, device=self.device, dtype=torch.bfloat16)
            step, _ = make_step(holder, x, torch.bfloat16, "infer")
            calls = 5 if side <= 2048 else 3
            row = timed(step, self.device, calls, self.deadline, self.args.reserve_s)
            if row["status"] == "ok":
                self.block_ms[(side, form, tuple(extra.items()))] = row["latency_ms_median"]
                row["profile"] = profile_calls(holder, step, self.device, calls=1)
            return row
        row = self.rows.write({"kind": "huge_block", "part": "huge", "key": key, "side": side,
                               "block": "TransformerBlock(dim=96, heads=1)", "formulation": form,
                               "overrides": extra, "dtype": "bf16", "mode": "infer",
                               **guarded(run, self.device)})
        self.say(f"huge block {side}px {form} {extra}: {row.get('latency_ms_median')} ms "
                 f"{row.get('mem_peak_alloc_mb')} MB {row['status']} {row.get('message', '')}")

    def _huge_model(self, side, form, extra):
        form = self.usable("restormer", form)
        key = key_of("huge_model", side, form, *(f"{k}={v}" for k, v in extra.items()))
        if key in self.rows.done or self.deadline.left() < self.args.reserve_s + 30:
            return
        model = self.model("restormer")

        def run():
            model.set_formulation(form, **extra)
            x = torch.rand(1, 3, side, side, device=self.device)
            step, _ = make_step(model, x, torch.bfloat16, "infer")
            row = timed(step, self.device, 5 if side <= 2048 else 2, self.deadline,
                        self.args.reserve_s, self._predicted_model_s(side, form, extra))
            if row["status"] == "ok":
                self.model_ms[(side, form, tuple(extra.items()))] = row["latency_ms_median"]
            return row
        row = self.rows.write({"kind": "huge_model", "part": "huge", "key": key,
                               "model": "restormer", "res": side, "formulation": form,
                               "overrides": extra, "dtype": "bf16", "mode": "infer",
                               **guarded(run, self.device)})
        self.say(f"huge model {side}px {form} {extra}: {row.get('latency_ms_median')} ms "
                 f"{row.get('mem_peak_alloc_mb')} MB {row['status']} {row.get('message', '')}")

    # ---- 5. profile

    def profile(self):
        for name in ("restormer", "nafnet_w64"):
            if name not in self.args.models:
                continue
            for res in self.args.profile_res:
                for mode in MODES:
                    for form in self.args.profile_formulations:
                        self._profile(name, form, res, mode)

    def _profile(self, name, form, res, mode):
        form = self.usable(name, form)
        key = key_of("profile", name, form, res, "bf16", mode)
        if key in self.rows.done or self.deadline.left() < self.args.reserve_s + 15:
            return
        model = self.model(name)

        def run():
            WORKLOADS[name].switch(model, form)
            x = torch.rand(1, 3, res, res, device=self.device)
            step, opt = make_step(model, x, torch.bfloat16, mode)
            try:
                for _ in range(2):
                    step()
                sync(self.device)
                return {"status": "ok", **profile_calls(model, step, self.device, calls=2)}
            finally:
                model.zero_grad(set_to_none=True)
                del opt
        row = self.rows.write({"kind": "profile", "part": "profile", "key": key, "model": name,
                               "formulation": form, "res": res, "dtype": "bf16", "mode": mode,
                               **guarded(run, self.device)})
        self.say(f"profile {name} {form} {res} {mode}: "
                 + (" ".join(f"{c}={v:.1f}" for c, v in row["class_ms"].items())
                    if row["status"] == "ok" else row["status"] + " " + row.get("message", "")))


def bands_at(side: int, widest: int = 510) -> bool:
    """Whether Restormer's widest full-resolution tensor (the level-1 FFN hidden map: 2 x 255
    channels) passes 2^31 - 1 elements at side x side px, where "fused" starts banding."""
    return widest * side * side > 2**31 - 1


def _switch_blocks(holder: nn.Module, form: str, extra: dict) -> None:
    settings = {**restormer.FORMULATIONS[form], **extra}
    for m in holder.modules():
        if isinstance(m, restormer.LayerNorm):
            m.norm_impl = settings["norm_impl"]
        elif isinstance(m, restormer.Attention):
            m.attn_impl, m.attn_split = settings["attn_impl"], settings["attn_split"]
            m.band_elements = settings["band_elements"]
        elif isinstance(m, restormer.FeedForward):
            m.band_elements = settings["band_elements"]


def profile_calls(model: nn.Module, step, device, calls: int = 2) -> dict:
    """Per-op-class breakdown of `calls` calls of `step` (torch.profiler, device time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with scoped(model), profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        sync(device)
    return class_breakdown(prof.events(), calls=calls, use_cpu_time=device.type != "cuda")


# --------------------------------------------------------------------------- Triton probe


PROBE_SHAPES = ((1, 48, 64, 64), (1, 1024, 8, 8), (2, 96, 17, 9))


def probe_triton(device: str = "cuda", shapes=PROBE_SHAPES) -> int:
    """Run the Triton channel norm as the models use it (forward and backward, NCHW and NHWC;
    float32, bfloat16, and float32 in / bfloat16 out under autocast; plus the BiasFree norm)
    against the float64 formula; print one JSON line; exit status 0 if all agree. Run in a
    child process first, so a kernel that faults cannot take the benchmark's CUDA context with
    it (and its compiled kernels land in Triton's cache for the parent)."""
    from baselines.channel_norm import channel_norm

    cases = [(torch.float32, False, True), (torch.bfloat16, False, True),
             (torch.float32, True, True), (torch.float32, False, False)]  # dtype, amp, centred
    results = []
    for shape in shapes:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for dtype, amp, centered in cases:
                g = torch.Generator().manual_seed(0)
                x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(device, dtype)
                x = x.contiguous(memory_format=fmt).requires_grad_()
                w = (torch.randn(shape[1], generator=g) + 1).to(device).requires_grad_()
                b = torch.randn(shape[1], generator=g).to(device).requires_grad_()
                bias = b if centered else None
                with autocast(torch.device(device), torch.bfloat16 if amp else torch.float32):
                    y = channel_norm(x, w, bias, 1e-6, impl="triton", centered=centered)
                dy = torch.randn(*shape, generator=g).to(device, y.dtype)
                grads = torch.autograd.grad(y, [x, w], dy)
                sync(torch.device(device))
                x64 = x.detach().double().requires_grad_()
                w64 = w.detach().double().requires_grad_()
                b64 = b.detach().double() if centered else None
                ref = channel_norm(x64, w64, b64, 1e-6, impl="channels_first", centered=centered)
                ref_grads = torch.autograd.grad(ref, [x64, w64], dy.double())
                errs = [((a.double() - r).abs().max() / r.abs().max()).item()
                        for a, r in zip([y, *grads], [ref, *ref_grads])]
                tol = 1e-5 if y.dtype == torch.float32 else 3e-2
                results.append({"shape": shape, "channels_last": fmt == torch.channels_last,
                                "dtype": str(dtype), "autocast_bf16": amp, "centered": centered,
                                "out_dtype": str(y.dtype), "errors": errs,
                                "ok": max(errs) < tol})
    ok = all(r["ok"] for r in results)
    print(json.dumps({"triton_probe_ok": ok, "cases": results}), flush=True)
    return 0 if ok else 1


def run_probe(device) -> dict:
    """The Triton probe in a child process (a fault there leaves this process untouched)."""
    import subprocess

    if device.type != "cuda":
        return {"status": "skipped", "reason": "no CUDA"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.baseline_formulations",
                            "--probe-triton"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"status": "error", "passed": False, "message": "probe timed out (300 s)"}
    last = (p.stdout.strip().splitlines() or [""])[-1]
    try:
        report = json.loads(last)
    except json.JSONDecodeError:
        report = {"stderr_tail": p.stderr[-2000:]}
    return {"status": "ok" if p.returncode in (0, 1) else "error", "passed": p.returncode == 0,
            "returncode": p.returncode, "seconds": time.perf_counter() - t0, **report}


def uses_triton(name: str, form: str) -> bool:
    module = {"restormer": restormer, "nafnet_w32": nafnet, "nafnet_w64": nafnet}.get(name)
    return bool(module) and module.FORMULATIONS.get(form, {}).get("norm_impl") == "triton"


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", help="directory for rows.jsonl (required)")
    ap.add_argument("--probe-triton", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, default=290.0,
                    help="stop starting new configs after this many seconds (default 290)")
    ap.add_argument("--reserve-s", type=float, default=5.0,
                    help="seconds kept free at the deadline (default 5)")
    ap.add_argument("--resume", help="rows of an earlier run: configs done there are skipped")
    ap.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                    help=f"subset of {','.join(PARTS)} (run in that order; default all but wide)")
    ap.add_argument("--models", default="restormer,nafnet_w64,nafnet_w32,swinir,mambair")
    ap.add_argument("--res", default="1024,512,256", help="grid resolutions, in run order")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--grid-formulations", default="official,fused",
                    help="formulations of the full grid (part grid)")
    ap.add_argument("--screen-formulations", default="fused_cl,channels_first",
                    help="candidates timed at two configs first (part screen; the rest of the "
                         "formulations follow in screen2)")
    ap.add_argument("--wide-formulations", default="fused_cl",
                    help="formulations given the full grid later (part wide)")
    ap.add_argument("--profile-formulations", default="official,fused,fused_cl")
    ap.add_argument("--profile-res", default="256,1024")
    ap.add_argument("--huge-res", default="2048,4096")
    ap.add_argument("--others-res", default="256")
    ap.add_argument("--calls", type=int, default=20, help="timed calls per config (>= 20)")
    ap.add_argument("--check-res", type=int, default=128, help="image side of the checks")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test")
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    args.models = [m for m in args.models.split(",") if m]
    args.res = [int(r) for r in args.res.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.modes = args.modes.split(",")
    args.grid_formulations = args.grid_formulations.split(",")
    args.wide_formulations = [f for f in args.wide_formulations.split(",") if f]
    args.screen_formulations = [f for f in args.screen_formulations.split(",") if f]
    args.profile_formulations = args.profile_formulations.split(",")
    args.huge_res = [int(r) for r in args.huge_res.split(",") if r]
    args.profile_res = [int(r) for r in args.profile_res.split(",") if r]
    args.others_res = [int(r) for r in args.others_res.split(",") if r]
    unknown = (set(args.parts) - set(PARTS)) | (set(args.models) - set(WORKLOADS))
    if unknown:
        ap.error(f"unknown parts/models: {sorted(unknown)}")
    if not args.out and not args.probe_triton:
        ap.error("--out is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_triton:
        return probe_triton()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("baseline_formulations needs CUDA (--device cpu for a smoke test)", file=sys.stderr)
        return 2
    deadline = Deadline(args.deadline_s)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke test; spinning OpenMP threads only slow it down
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    rows = Rows(out / "rows.jsonl", run_env(device), Path(args.resume) if args.resume else None)
    run = Runner(args, device, rows, deadline)
    rows.write({"kind": "run", "key": key_of("run", time.time()), "status": "info",
                "args": {k: v for k, v in vars(args).items()}})
    probe = run_probe(device)
    rows.write({"kind": "triton_probe", "key": key_of("triton_probe", time.time()), **probe})
    run.triton_ok = probe.get("passed", device.type != "cuda")
    run.say(f"Triton probe (child process): passed={run.triton_ok} "
            f"{probe.get('message', '')}{probe.get('stderr_tail', '')[-300:]}")
    print(f"{rows.env.get('cuda_device_name', rows.env['device_name'])}, torch {torch.__version__}"
          f", cudnn {rows.env['cudnn']}, triton {rows.env['triton']}; rows -> {rows.path}",
          flush=True)
    timed_models = [m for m in args.models if m in ("restormer", "nafnet_w64", "nafnet_w32")]
    others = [m for m in args.models if m in ("swinir", "mambair")]
    rest = [f for f in restormer.FORMULATIONS
            if f not in args.grid_formulations + args.screen_formulations]

    def late(name, res, mode):  # about 1.2 s a call: after the cheaper parts
        return name == "restormer" and res >= 1024 and mode == "train"

    def part_grid():
        run.grid("grid", timed_models, lambda n: args.grid_formulations, args.res, args.dtypes,
                 args.modes, want=lambda *c: not late(*c))

    def screen(part, forms):
        for res, dname, mode in ((1024, "bf16", "infer"), (512, "bf16", "train")):
            if res in args.res:
                run.grid(part, timed_models, lambda n: forms, [res], [dname], [mode])

    def part_late():
        run.grid("late", timed_models, lambda n: args.grid_formulations, args.res, args.dtypes,
                 args.modes, want=late)

    def part_wide():
        run.grid("wide", timed_models, lambda n: args.wide_formulations, args.res, args.dtypes,
                 args.modes)

    def part_others():
        for name in others:
            run.grid("others", [name], lambda n: WORKLOADS[n].formulations, args.others_res,
                     args.dtypes, args.modes)

    parts = {"checks": run.checks, "grid": part_grid,
             "screen": lambda: screen("screen", args.screen_formulations), "huge": run.huge,
             "profile": run.profile, "late": part_late,
             "screen2": lambda: screen("screen2", rest), "wide": part_wide,
             "others": part_others}
    for part in PARTS:
        if part not in args.parts:
            continue
        run.say(f"part {part}")
        try:
            parts[part]()
        except Exception as e:  # noqa: BLE001 - keep the other parts
            rows.write({"kind": "part_error", "key": key_of("part_error", part, time.time()),
                        "part": part, "status": "part_error", "message": repr(e)[:500],
                        "traceback": traceback.format_exc()[-3000:]})
            run.say(f"part {part} failed: {e!r}")
        run.drop_models()
    try:  # the markdown summary of every row so far (resumed rows included)
        from benchmarks.formulation_report import load_rows, recommendation_text, summarize

        paths = [rows.path] + ([Path(args.resume)] if args.resume else [])
        every = load_rows([p for p in paths if p.exists()])
        (out / "summary.md").write_text(summarize(every) + "\n")
        print(recommendation_text(every), flush=True)
    except Exception as e:  # noqa: BLE001 - the rows are what matters
        print(f"summary failed: {e!r}", flush=True)
    run.say(f"done; rows in {rows.path}, summary in {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
