"""`bench run` (the efficiency sweep) and `bench models`. Heavy imports happen inside."""
from __future__ import annotations

import datetime as _dt
import gc

import click

from bench import options
from bench.errors import UsageError
from bench.measure.config import CPU_DEFAULT_RES, CUDA_DEFAULT_RES, TIMING_DEFAULTS

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
@options.device_option
@click.option("--warmup", type=int, default=None,
              help=f"Warm-up calls at least (default {TIMING_DEFAULTS['cuda'].warmup} CUDA, "
                   f"{TIMING_DEFAULTS['cpu'].warmup} CPU; more while consecutive calls differ "
                   "by over 10%).")
@click.option("--iters", type=int, default=None,
              help=f"Timed calls at least (default {TIMING_DEFAULTS['cuda'].iters} CUDA, "
                   f"{TIMING_DEFAULTS['cpu'].iters} CPU; more while the median's 95% interval "
                   "is wider than +-1%, within --budget).")
@click.option("--min-time", type=float, default=None,
              help="Keep timing until this many seconds have been timed (default "
                   f"{TIMING_DEFAULTS['cuda'].min_time:g}).")
@click.option("--budget", type=float, default=None,
              help="Seconds per config (warm-up + timed calls) within which the call counts "
                   f"adapt (default {TIMING_DEFAULTS['cuda'].budget:g} CUDA, "
                   f"{TIMING_DEFAULTS['cpu'].budget:g} CPU); at least 5 timed calls whatever "
                   "it says. 0: exactly --warmup and --iters calls.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--measure", default=None,
              help="Any of params,flops,latency,memory (default: all; memory only on CUDA). "
              "params,flops alone needs no activations and runs on a CPU at any resolution.")
@options.set_option
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
@options.progress_option
@click.option("--max-call-s", type=float, default=None, metavar="SEC",
              help="Skip (status skipped, 'too slow') a config whose first call takes longer "
                   "than SEC seconds, instead of timing it: large-image sweeps.")
@click.option("--cuda-graph", is_flag=True, help="Capture each step into a CUDA graph and time "
              "its replays: GPU time without host launch jitter (launch-bound models).")
def run(models, res, task, scale, batch, dtype, mode, device, warmup, iters, min_time, budget,
        compile_, channels_last, max_call_s, cuda_graph, measure, overrides, out, resume,
        isolate, timeout, gpus, workers, progress):
    """Sweep models x resolutions and record params, FLOPs, latency, throughput and memory.

    Exit code 1 when a config ends in error (OOM and skipped rows are results, not failures);
    2 for a usage error.
    """
    from pathlib import Path

    from bench.measure.config import plan_sweep
    from bench.measure.sweep import done_keys, run_sweep
    from bench.report.console import run_table

    if resume and not out:
        raise UsageError("--resume needs --out FILE: the results file whose configs to skip")
    if out and Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder; give a results file such as "
                         f"{Path(out) / 'bench.jsonl'}")
    gpu_ids = _resolve_gpus(gpus)
    if gpu_ids and device not in ("auto", "cuda"):
        raise UsageError("--gpus picks the devices itself; drop --device (or use --device cuda)")
    device = options.resolve_device("cuda" if gpu_ids else device)
    configs = plan_sweep(models=models, res=res, task=task, scale=scale, batch=batch, dtype=dtype,
                         mode=mode, device=device, measure=measure, warmup=warmup, iters=iters,
                         min_time=min_time, budget=budget, compile=compile_,
                         channels_last=channels_last, cuda_graph=cuda_graph,
                         overrides=options.parse_overrides(overrides), max_call_s=max_call_s)
    on_device = bool({"latency", "memory"} & set(configs[0].measure))
    cuda = device.startswith("cuda")
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
        click.echo(run_table(rows))
    click.echo(f"{len(rows)} rows appended to {out}")
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        first = failed[0]
        why = ((first.get("message") or "no message").splitlines() or ["no message"])[0][:200]
        click.echo(f"bench run: {len(failed)} of {len(rows)} config(s) failed, first "
                   f"{first['model']} {first['res']}px {first['mode']} {first['dtype']}: {why} "
                   f"(every message: the message column of {out})", err=True)
        return 1
    return 0


def short_reference(text: str, width: int = 60) -> str:
    """A reference that fits a table column: as registered when short enough, else first
    author et al. with its arXiv id / code link ('Sepehri et al., arXiv 2403.17902')."""
    import re
    import textwrap

    if len(text) <= width:
        return text
    authors = text.split(":", 1)[0].split(",")
    short = ", ".join([authors[0].strip() + (" et al." if len(authors) > 1 else ""),
                       *re.findall(r"arXiv \d{4}\.\d{4,5}|github\.com/[\w./-]+\w", text)])
    return short if len(short) <= width else textwrap.shorten(text, width, placeholder=" ...")


@click.command()
@click.option("--task", default="deblur", show_default=True, help="Task whose configuration is counted.")
@click.option("--scale", type=int, default=None, help="SR factor (default 8 for sr).")
@click.argument("pattern", default="*")
def models(task, scale, pattern):
    """List registered models (optionally matching a glob) with family and parameter count."""
    from tabulate import tabulate

    from bench import registry  # not bench.measure.flops: its imports (fvcore, triton) cost ~0.15 s

    # The ~200k objects of those imports (torch) live until exit: frozen, the collector skips
    # them in its full collections, during the builds and at interpreter exit (~0.4 s in all).
    gc.freeze()

    task = options.choice_list(task, options.TASKS, "task")[0]
    scale = options.resolve_scale(task, scale)
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
                     info.multiple, params, short_reference(info.reference)])
    click.echo(tabulate(rows, headers=["model", "family", "tasks", "own SR upsampler", "multiple",
                                       f"params (M, {task}{'x' + str(scale) if task == 'sr' else ''})",
                                       "reference"]))
