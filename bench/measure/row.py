"""Measure one configuration (model, task, scale, res, batch, dtype, mode) into one results row.

The protocol (docs/design.md): params and FLOPs on meta tensors; latency with CUDA events after
warm-up, every sample kept; peak memory reset AFTER warm-up (cudnn.benchmark's autotuning
allocates large workspaces during the first calls) and read after the timed iterations; the
static part (weights, grads, optimizer state, inputs) recorded separately. OOM is a result.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import time
import traceback

import torch

from bench import registry
from bench.environment import environment
from bench.errors import UsageError
from bench.measure.config import RunConfig, check_cuda_graph
from bench.measure.timing import measure_with_memory
from bench.options import torch_dtype
from serpent import scan


def base_row(cfg: RunConfig) -> dict:
    """The config part of a results row (every row has it, errors included)."""
    info = registry.model_info(cfg.model)
    return {"kind": "efficiency", "model": cfg.model, "family": info.family, "task": cfg.task,
            "scale": cfg.scale, "res": cfg.res, "batch": cfg.batch, "dtype": cfg.dtype,
            "mode": cfg.mode, "compile": cfg.compile, "channels_last": cfg.channels_last,
            "cuda_graph": cfg.cuda_graph,
            "overrides": dict(cfg.overrides), "measured": list(cfg.measure)}


def _build(cfg: RunConfig):
    return registry.create_model(cfg.model, task=cfg.task, scale=cfg.scale, **cfg.overrides)


def count_config_flops(cfg: RunConfig) -> float:
    """Forward GFLOPs of one image for `cfg` (meta tensors; seconds on a CPU)."""
    return counted_row(cfg)["gflops"]


def counted_row(cfg: RunConfig) -> dict:
    """The params and FLOPs columns of `cfg`'s row (those in cfg.measure). Counted once per
    network, task and resolution: neither depends on dtype, mode, batch (FLOPs are per image)
    or variant flags, so a sweep over those reuses the count (in the isolated sweep the parent
    counts and hands the columns to its workers)."""
    want = tuple(m for m in ("params", "flops") if m in cfg.measure)
    return copy.deepcopy(dict(_counted(cfg.model, cfg.task, cfg.scale, cfg.res,
                                       json.dumps(cfg.overrides, sort_keys=True), want)))


@functools.lru_cache(maxsize=256)
def _counted(model: str, task: str, scale: int, res: int, overrides: str, want: tuple) -> tuple:
    from bench.measure.flops import count_flops  # fvcore + FlopCounterMode: only when counting

    info = registry.model_info(model)
    spec = registry.input_spec(info, task, res, scale)
    meta = registry.create_meta_model(model, task=task, scale=scale, **json.loads(overrides))
    out = {"params": registry.count_params(meta)} if "params" in want else {}
    if "flops" in want:
        out.update(count_flops(meta, (1, 3, spec.size, spec.size)).as_row())
    return tuple(out.items())


def measure_config(cfg: RunConfig, counted: dict | None = None) -> dict:
    """One row. Never raises for a model failure: OOM and errors become the row's status.

    `counted`: the params/FLOPs columns already counted for this config (`counted_row`), e.g.
    by the parent of an isolated worker (its `flops_s`: the seconds that count took there);
    counted here when None. The row's `phase_s` says where the seconds went.
    """
    row = base_row(cfg)
    device = torch.device(cfg.device)
    info = registry.model_info(cfg.model)
    try:
        registry.check_task(info, cfg.task, cfg.scale)
    except UsageError as e:
        return {**row, **environment(device), "status": "skipped", "message": str(e)}
    spec = registry.input_spec(info, cfg.task, cfg.res, cfg.scale)
    row.update(input_res=spec.size, input_bicubic=spec.bicubic)
    if spec.skip_reason:
        return {**row, **environment(device), "status": "skipped", "message": spec.skip_reason}
    shape = (cfg.batch, 3, spec.size, spec.size)
    phases = {}
    try:
        if "params" in cfg.measure or "flops" in cfg.measure:
            t0 = time.perf_counter()
            counts = dict(counted) if counted is not None else counted_row(cfg)
            phases["flops"] = counts.pop("flops_s", time.perf_counter() - t0)
            row.update(counts)
        if "latency" in cfg.measure or "memory" in cfg.measure:
            row.update(_run_on_device(cfg, device, shape, phases))
        row.update(status="ok", message="", **achieved_tflops(row, cfg))
    except TooSlow as e:
        row.update(status="skipped", message=str(e))
    except torch.OutOfMemoryError as e:
        row.update(status="oom", message=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001 - a failing model is a result row, not a crash
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        row.update(status="error", message=tb[:500])
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["phase_s"] = phases
    return {**row, **environment(device)}


def _run_on_device(cfg: RunConfig, device: torch.device, shape: tuple[int, ...],
                   phases: dict) -> dict:
    """Latency/memory columns; `phases` gets the seconds of device_init, build, warmup, timed."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.init()
        torch.empty(1, device=device)  # the context and the allocator, before the clock below
    phases["device_init"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(0)
    scan.reset_used_backends()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = _build(cfg).to(device=device, memory_format=fmt)
    x = torch.rand(shape, device=device).contiguous(memory_format=fmt)
    dtype = torch_dtype(cfg.dtype)
    amp = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
           else contextlib.nullcontext())
    runner = torch.compile(model) if cfg.compile else model

    check_cuda_graph(cfg)
    if cfg.mode == "infer":
        model.eval()
        prepare = None  # what runs before each step, outside a captured graph

        def step():
            with torch.inference_mode(), amp:
                return runner(x)
    else:
        model.train()
        target = torch.rand(shape[0], 3, cfg.res, cfg.res, device=device).contiguous(memory_format=fmt)
        # capturable: the optimizer keeps its step count on the GPU, as a CUDA graph requires
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=cfg.cuda_graph)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def prepare():
            opt.zero_grad(set_to_none=True)

        def step():
            with amp:
                loss = (runner(x) - target).abs().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    out: dict = {}
    warmup = max(cfg.warmup, 1)
    phases["build"] = time.perf_counter() - t0
    if cfg.compile or cfg.max_call_s:  # the first call alone: compilation, or too slow to time
        first_s = phases["first_call"] = _first_call(prepare, step, device)
        if cfg.compile:
            out["compile_s"] = first_s  # torch.compile's tracing and codegen, plus one call
        elif first_s > cfg.max_call_s:
            raise TooSlow(f"too slow: one call took {first_s:.1f} s (--max-call-s "
                          f"{cfg.max_call_s:g})")
    t0 = time.perf_counter()
    if cfg.cuda_graph:  # eager warm-up, capture, then one replay before timing
        fn = capture_cuda_graph(step, prepare, device, warmup)
    elif prepare is None:
        fn = step
    else:
        def fn():
            prepare()
            step()

    timed = "latency" in cfg.measure
    timing, memory = measure_with_memory(fn, device=device,
                                         warmup=1 if cfg.cuda_graph else warmup,
                                         iters=cfg.iters if timed else 1,
                                         min_time_s=cfg.min_time if timed else 0.0,
                                         budget_s=cfg.budget if timed else 0.0)
    graph_s = time.perf_counter() - t0 - timing.warmup_s - timing.timed_s  # capture (eager warm-up)
    phases.update(warmup=graph_s + timing.warmup_s, timed=timing.timed_s)
    if timed:
        out.update(timing.as_row(cfg.batch, cfg.res * cfg.res))
    if "memory" in cfg.measure:
        out.update(memory)
    if device.type == "cuda":  # after the timed calls: no effect on them
        t0 = time.perf_counter()
        out["cuda_kernels"] = count_cuda_kernels(fn, device)
        phases["kernels"] = time.perf_counter() - t0
    out["scan_backend"] = ",".join(sorted(scan.used_backends())) or "none"
    out["warmup"] = timing.warmup + (warmup if cfg.cuda_graph else 0)  # eager calls before capture
    out["amp"] = "autocast" if dtype != torch.float32 else "none"
    return out


class TooSlow(RuntimeError):
    """One call takes longer than --max-call-s: the config is skipped, not timed."""


def _first_call(prepare, step, device: torch.device) -> float:
    """Seconds of one call (synchronised): the first, which compiles under --compile."""
    t0 = time.perf_counter()
    if prepare is not None:
        prepare()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def count_cuda_kernels(fn, device: torch.device) -> int | None:
    """CUDA kernels that one call launches (torch.profiler's GPU activity; copies and memsets
    not counted). Why it matters: a model of many small kernels is timed at the host's launch
    pace, not the GPU's (Serpent before its fused scan: ~930 per forward). None on a CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def achieved_tflops(row: dict, cfg: RunConfig) -> dict:
    """TFLOP/s the measured latency implies: forward GFLOPs x batch / median latency (a
    training step counted as 3 forwards: forward + backward, the usual estimate). How far a
    model is from the card's peak (H200: ~989 dense bf16 TFLOP/s)."""
    gflops, ms = row.get("gflops"), row.get("latency_ms_median")
    if not gflops or not ms:
        return {}
    passes = 3 if cfg.mode == "train" else 1
    return {"tflops_achieved": gflops * passes * cfg.batch / ms,  # GFLOP/ms = TFLOP/s
            "tflops_basis": "forward GFLOPs x batch / latency" + (" x 3 (train)" if passes > 1
                                                                 else "")}


def capture_cuda_graph(step, prepare, device: torch.device, warmup: int):
    """`step` captured once into a CUDA graph; returns its replay.

    Why: a model of many small kernels (Serpent's scans over scales and directions) is bound by
    the host's kernel launches, so its eager latency follows the host (3-69% apart between two
    sweeps on an H200, results/gpu-h200x4-run4); a replay launches the whole step at once and
    times the GPU work (within 0.8% between the same two sweeps).
    Eager warm-up runs on a side stream first (cudnn autotuning, lazy caches such as SwinIR's
    masks), as capture requires. The graph holds its activations in a private memory pool, so
    peak memory equals the static part. Training: gradients are set to None before capture and
    the backward writes them afresh on each replay, as in PyTorch's whole-network example.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            if prepare is not None:
                prepare()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    if prepare is not None:
        prepare()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
