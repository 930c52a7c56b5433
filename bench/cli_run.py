"""`bench run` (the efficiency sweep) and `bench models`. Heavy imports happen inside."""
from __future__ import annotations

import datetime as _dt
import gc
import json

import click

from bench.errors import UsageError

TASK_CHOICES = ("deblur", "sr", "denoise")
DTYPE_CHOICES = ("fp32", "bf16", "fp16")
MEASURE_CHOICES = ("params", "flops", "latency", "memory")
CPU_DEFAULT_RES = (32,)  # a CPU forward of MambaIR at 64 px takes ~25 s: keep `bench run` short
CUDA_DEFAULT_RES = (256, 512, 1024)


def _int_list(value: str, what: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated positive integers, got {value!r}") from None
    if not items or any(i <= 0 for i in items):
        raise UsageError(f"{what} must be comma-separated positive integers, got {value!r}")
    return items


def _choice_list(value: str, choices: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in choices]
    if bad or not items:
        raise UsageError(f"unknown {what} {', '.join(bad) or repr(value)}; choose from {', '.join(choices)}")
    return items


def _parse_overrides(pairs: tuple[str, ...]) -> dict:
    """--set key=value: the value is read as a JSON literal when it is one, else as a string."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--set expects key=value with a Python identifier as key, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} asked for, but CUDA is not available here "
                             "(use --device cpu, or run on a machine with an NVIDIA GPU)")
        try:
            torch.device(device)
        except RuntimeError:
            raise UsageError(f"bad device {device!r}; use cpu, cuda or cuda:N") from None
        return device
    if device != "cpu":
        raise UsageError(f"bad device {device!r}; use cpu, cuda or cuda:N")
    return device


def _resolve_gpus(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError("--gpus asked for, but CUDA is not available here")
    if spec == "all":
        return list(range(count))
    try:
        ids = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--gpus expects 'all' or comma-separated GPU indices, got {spec!r}") from None
    bad = [i for i in ids if i >= count]
    if not ids or bad or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise UsageError(f"--gpus {spec}: this machine has GPUs 0..{count - 1}; give distinct indices or 'all'")
    return ids


@click.command()
@click.option("--models", default="all", show_default=True,
              help="Comma list of model names or globs (e.g. 'serpent*,swinir'), or 'all'.")
@click.option("--res", default=None, help="Output resolutions R (R x R), comma list. "
              f"Default: {','.join(map(str, CUDA_DEFAULT_RES))} on CUDA, "
              f"{','.join(map(str, CPU_DEFAULT_RES))} on CPU.")
@click.option("--task", default="deblur", show_default=True, help="deblur | sr | denoise.")
@click.option("--scale", type=int, default=None, help="SR factor (default 8 for sr, 1 otherwise).")
@click.option("--batch", default="1", show_default=True, help="Batch sizes, comma list.")
@click.option("--dtype", default="fp32", show_default=True,
              help="fp32 | bf16 | fp16 (autocast), comma list.")
@click.option("--mode", default="infer", show_default=True,
              type=click.Choice(["infer", "train", "both"]),
              help="Inference, one training step (fwd+bwd+AdamW), or both.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available).")
@click.option("--warmup", type=int, default=None, help="Warm-up calls (default 10 CUDA, 1 CPU).")
@click.option("--iters", type=int, default=None, help="Timed calls at least (default 50 CUDA, 3 CPU).")
@click.option("--min-time", type=float, default=None,
              help="Keep timing until this many seconds have been timed (default 1.0 CUDA, 0 CPU).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--measure", default=None,
              help="Any of params,flops,latency,memory (default: all; memory only on CUDA). "
              "params,flops alone needs no activations and runs on a CPU at any resolution.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Constructor override for every model, e.g. --set attn_impl=math (repeatable).")
@click.option("--out", default=None, help="Results JSONL (appended). "
              "Default: runs/bench-<UTC time>.jsonl.")
@click.option("--resume", is_flag=True, help="Skip configs already in --out (errors are retried).")
@click.option("--isolate/--no-isolate", default=None,
              help="Fresh process per config (default: on for CUDA, off for CPU).")
@click.option("--timeout", type=float, default=900, show_default=True,
              help="Seconds per isolated config before it is recorded as an error.")
@click.option("--gpus", default=None, help="Shard the sweep over these GPUs ('0,1' or 'all'): "
              "one worker per GPU, most expensive configs first, each config in a fresh process.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="CPU: measure this many configs at once, each in its own process (timings "
              "then share the CPU: use for params/FLOPs sweeps).")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@click.option("--cuda-graph", is_flag=True, help="Capture each step into a CUDA graph and time "
              "its replays: GPU time without host launch jitter (launch-bound models).")
def run(models, res, task, scale, batch, dtype, mode, device, warmup, iters, min_time, compile_,
        channels_last, cuda_graph, measure, overrides, out, resume, isolate, timeout, gpus, workers, progress):
    """Sweep models x resolutions and record params, FLOPs, latency, throughput and memory."""
    from pathlib import Path

    from bench import registry
    from bench.measure import RunConfig, check_cuda_graph
    from bench.sweep import done_keys, run_sweep
    from bench.tables import efficiency_table

    names = registry.resolve_models(models)
    task = _choice_list(task, TASK_CHOICES, "task")[0]
    scale = scale if scale is not None else (8 if task == "sr" else 1)
    if task != "sr" and scale != 1:
        raise UsageError(f"--scale applies to --task sr only (task {task} is x1)")
    gpu_ids = _resolve_gpus(gpus)
    if gpu_ids and device not in (None, "cuda"):
        raise UsageError("--gpus picks the devices itself; drop --device (or use --device cuda)")
    device = _resolve_device("cuda" if gpu_ids else device)
    cuda = device.startswith("cuda")
    resolutions = _int_list(res, "--res") if res else list(CUDA_DEFAULT_RES if cuda else CPU_DEFAULT_RES)
    batches = _int_list(batch, "--batch")
    dtypes = _choice_list(dtype, DTYPE_CHOICES, "dtype")
    if not cuda and "fp16" in dtypes:
        raise UsageError("fp16 autocast is a CUDA measurement; use fp32 or bf16 on the CPU")
    if measure is None:  # peak memory is read from the CUDA allocator: nothing to read on a CPU
        measures = MEASURE_CHOICES if cuda else tuple(m for m in MEASURE_CHOICES if m != "memory")
    else:
        measures = tuple(_choice_list(measure, MEASURE_CHOICES, "measure"))
        if "memory" in measures and not cuda:
            raise UsageError("--measure memory needs CUDA (peak memory is read from the CUDA "
                             "allocator); drop it or use --device cuda")
    modes = ["infer", "train"] if mode == "both" else [mode]
    for name, value in (("--warmup", warmup), ("--iters", iters)):
        if value is not None and value < 0:
            raise UsageError(f"{name} must be >= 0")
    on_device = bool({"latency", "memory"} & set(measures))
    configs = [
        RunConfig(model=m, task=task, scale=scale, res=r, batch=b, dtype=dt, mode=md,
                  device=device if on_device else "cpu", measure=measures,
                  warmup=warmup if warmup is not None else (10 if cuda else 1),
                  iters=iters if iters is not None else (50 if cuda else 3),
                  min_time=min_time if min_time is not None else (1.0 if cuda else 0.0),
                  compile=compile_, channels_last=channels_last, cuda_graph=cuda_graph,
                  overrides=_parse_overrides(overrides))
        for m in names for r in resolutions for b in batches for md in modes for dt in dtypes
    ]
    if cuda_graph and not on_device:
        raise UsageError("--cuda-graph changes how latency and memory are measured; "
                         "add latency or memory to --measure")
    for cfg in configs:
        check_cuda_graph(cfg)
    out = Path(out) if out else Path("runs") / f"bench-{_dt.datetime.utcnow():%Y%m%d-%H%M%S}.jsonl"
    if resume:
        done = done_keys(out)
        before = len(configs)
        configs = [c for c in configs if c.key() not in done]
        click.echo(f"--resume: {before - len(configs)} of {before} configs already in {out}", err=True)
    isolate = (cuda and on_device) if isolate is None else isolate
    if gpu_ids and not isolate:
        raise UsageError("--gpus runs every config in its own process; drop --no-isolate")
    if gpu_ids and not on_device:
        gpu_ids = None  # params/FLOPs need no GPU: nothing to shard
    if workers < 1:
        raise UsageError("--workers must be >= 1")
    if workers > 1 and gpu_ids:
        raise UsageError("--workers is for CPU sweeps; with --gpus there is one worker per GPU")
    rows = run_sweep(configs, out, isolate=isolate, timeout_s=timeout, progress=progress,
                     gpus=gpu_ids, workers=workers)
    if rows:
        click.echo(efficiency_table(rows))
    click.echo(f"{len(rows)} rows appended to {out}")
    failed = sum(r["status"] == "error" for r in rows)
    if failed:
        click.echo(f"{failed} config(s) failed: see the message column in {out}", err=True)


@click.command()
@click.option("--task", default="deblur", show_default=True, help="Task whose configuration is counted.")
@click.option("--scale", type=int, default=None, help="SR factor (default 8 for sr).")
@click.argument("pattern", default="*")
def models(task, scale, pattern):
    """List registered models (optionally matching a glob) with family and parameter count."""
    from tabulate import tabulate

    from bench import registry  # not bench.flops: its imports (fvcore, triton) cost ~0.15 s

    # The ~200k objects of those imports (torch) live until exit: frozen, the collector skips
    # them in its full collections, during the builds and at interpreter exit (~0.4 s in all).
    gc.freeze()

    task = _choice_list(task, TASK_CHOICES, "task")[0]
    scale = scale if scale is not None else (8 if task == "sr" else 1)
    rows, counts = [], {}  # counts: per network, an alias (same network) is built once
    for name in registry.list_models(pattern):
        info = registry.model_info(name)
        try:
            registry.check_task(info, task, scale)
            net = info.alias_of or name
            if net not in counts:
                model = registry.create_meta_model(net, task=task, scale=scale)
                counts[net] = registry.count_params(model)
            params = f"{counts[net] / 1e6:.3f}"
        except UsageError as e:
            params = f"n/a ({e})"[:40]
        rows.append([name, info.family, ",".join(info.tasks), "yes" if info.upsampler else "no (bicubic input)",
                     info.multiple, params, info.reference])
    click.echo(tabulate(rows, headers=["model", "family", "tasks", "own SR upsampler", "multiple",
                                       f"params (M, {task}{'x' + str(scale) if task == 'sr' else ''})",
                                       "reference"]))
