"""`bench train`: train one registered model on image folders for a task (see bench.train.loop)."""
from __future__ import annotations

import sys
import time

import click

from bench import options
from bench.errors import UsageError


def task_options(fn):
    """Degradation options shared by train and eval."""
    for opt in reversed([
        click.option("--task", required=True, type=click.Choice(options.TASKS),
                     help="deblur (Gaussian blur + noise), sr (MATLAB bicubic), denoise."),
        click.option("--scale", type=int, default=None,
                     help="SR factor: 2, 3, 4 or 8 (default 8 for --task sr)."),
        click.option("--blur-sigma", default=None,
                     help="Blur std in pixels (default 3.0); train accepts a range lo:hi."),
        click.option("--kernel-size", type=int, default=61, show_default=True,
                     help="Blur kernel side (odd)."),
        click.option("--noise-sigma", default=None,
                     help="Noise std in [0,1] units or a fraction like 25/255 (defaults: deblur "
                          "0.01, denoise 25/255, sr 0); train accepts a range lo:hi."),
        click.option("--data-root", default=None,
                     help="Folder holding the named image sets (default $SERPENT_BENCH_DATA)."),
        options.set_option,
    ]):
        fn = opt(fn)
    return fn


def make_task_from(task, scale, blur_sigma, kernel_size, noise_sigma):
    from bench.quality.tasks import make_task, parse_level

    return make_task(task, scale=scale, kernel_size=kernel_size,
                     blur_sigma=parse_level(blur_sigma) if blur_sigma else None,
                     noise_sigma=parse_level(noise_sigma) if noise_sigma else None)


def default_workers(limit: int = 4) -> int:
    """DataLoader workers: the cores this process may use (its affinity mask, not the
    machine's count), shared with the other torchrun processes of the node, at most `limit`;
    more workers than cores only makes PyTorch warn and the workers compete."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(limit, cores // max(1, local)))


@click.command("train")
@click.option("--model", required=True, help="Registered model name (see `bench models`).")
@task_options
@click.option("--train-set", "train_sets", required=True,
              help="Comma list of set names under the data root, or folders.")
@click.option("--iters", type=int, default=None,
              help="Optimizer steps (required without --time-budget; with it, an upper bound).")
@click.option("--time-budget", type=float, default=None, metavar="MIN",
              help="Stop after MIN minutes of training time (data + steps; validation and "
                   "checkpoints are timed apart). The lr follows a cosine to zero over it.")
@click.option("--val-points", type=int, default=10, show_default=True,
              help="With --time-budget: validate and checkpoint at every 1/N of the budget.")
@click.option("--recipe", type=click.Choice(["suite", "paper"]), default="suite",
              show_default=True, help="paper: optimizer, lr, betas and weight decay of the "
                                      "model's paper (bench/train/recipes.py), overriding "
                                      "--optimizer/--lr/--weight-decay.")
@click.option("--optimizer", type=click.Choice(["adamw", "adam"]), default="adamw",
              show_default=True)
@click.option("--crop", type=int, default=128, show_default=True,
              help="Ground-truth (output) crop side; the LR crop is crop/scale for SR models "
                   "with their own upsampler.")
@click.option("--batch", type=int, default=8, show_default=True,
              help="Global batch size: under torchrun it is split evenly over the processes.")
@click.option("--out-dir", required=True, help="Run folder: checkpoints, logs, train_config.json.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="AdamW peak lr.")
@click.option("--min-lr", type=float, default=1e-6, show_default=True, help="Cosine floor.")
@click.option("--warmup", type=int, default=None,
              help="Linear warm-up iterations (default 5% of --iters, at most 1000).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--loss", type=click.Choice(options.LOSSES), default="l1",
              show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True,
              help="Max global gradient norm (0 = off).")
@click.option("--val-set", "val_sets", default="", help="Comma list of validation sets.")
@click.option("--val-every", type=int, default=None,
              help="Validate every N iterations (default iters/5 with a --val-set; 0 = off).")
@click.option("--val-limit", type=int, default=None, help="First N images of each val set.")
@click.option("--ckpt-every", type=int, default=None,
              help="Write last.pt every N iterations (default iters/10) and at the end.")
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--stop-at", type=int, default=None,
              help="Stop after this iteration (checkpoint written); continue later with --resume.")
@click.option("--resume", is_flag=False, flag_value="auto", default=None, metavar="[CKPT]",
              help="Continue exactly from CKPT (bare --resume: <out-dir>/last.pt).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --out-dir (its checkpoints and log are deleted); "
                   "without it, or --resume, such a folder is refused.")
@click.option("--holdout", "holdout_sets", default="",
              help="Sets you will evaluate on: training images also in them (or in --val-set) "
                   "are refused, or dropped with --drop-overlap.")
@click.option("--drop-overlap", is_flag=True,
              help="Leave out training images that appear in --val-set/--holdout sets.")
@options.device_option
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
              show_default=True, help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--workers", type=int, default=None,
              help="DataLoader workers (default: the CPU cores this process may use, split over "
                   "the processes of this node, at most 4).")
@click.option("--seed", type=int, default=0, show_default=True)
@options.progress_option
def train(model, task, scale, blur_sigma, kernel_size, noise_sigma, data_root, overrides,
          train_sets, iters, time_budget, val_points, recipe, optimizer, crop, batch, out_dir, lr, min_lr, warmup, weight_decay, loss,
          grad_clip, val_sets, val_every, val_limit, ckpt_every, log_every, stop_at, resume,
          overwrite, holdout_sets, drop_overlap, device, dtype, workers, seed, progress):
    """Train MODEL for TASK with AdamW + cosine schedule; writes checkpoints and a CSV log.

    Under torchrun (one or several nodes) it trains with DistributedDataParallel: same
    global batch, same results, whatever the number of processes.

    \b
    Example:
      bench train --model serpent_s --task sr --scale 8 --train-set Urban100 \\
          --iters 2000 --crop 128 --batch 16 --val-set Set5 --out-dir runs/serpent_s_sr8
      torchrun --nproc_per_node 4 -m bench train --model serpent_s ... --batch 32
    """
    from bench.train.checkpoint import check_run_dir, clear_run_dir
    from bench.train.loop import TrainConfig, TrainingDiverged, train as run

    split_names = options.split_names
    rank, _, local_rank = options.torchrun_ranks()
    if workers is None:
        workers = default_workers()
    try:
        check_run_dir(out_dir, resume=resume, overwrite=overwrite)  # before any work
        if overwrite and rank == 0:
            removed = clear_run_dir(out_dir)
            if removed:
                click.echo(f"--overwrite: removed {', '.join(removed)} from {out_dir}", err=True)
        task_cfg = make_task_from(task, scale, blur_sigma, kernel_size, noise_sigma)
        cfg = TrainConfig(
            model=model, task=task, train_sets=split_names(train_sets), iters=iters, crop=crop,
            time_budget_s=None if time_budget is None else time_budget * 60,
            val_points=val_points, recipe=recipe, optimizer=optimizer,
            batch=batch, out_dir=out_dir, lr=lr, min_lr=min_lr, warmup=warmup,
            weight_decay=weight_decay, loss=loss, grad_clip=grad_clip,
            val_sets=split_names(val_sets), val_every=val_every, val_limit=val_limit,
            ckpt_every=ckpt_every, log_every=log_every, stop_at=stop_at, resume=resume,
            device=device, dtype=dtype, workers=workers, seed=seed, data_root=data_root,
            holdout_sets=split_names(holdout_sets), drop_overlap=drop_overlap,
            model_overrides=options.parse_overrides(overrides), progress=progress)
        s = run(cfg, task_cfg)
    except (UsageError, TrainingDiverged) as e:
        # Under torchrun every process hits the same error: the first process of each node
        # says it (one line on a single node), the others exit with the same code a moment
        # later (torchrun stops the remaining processes as soon as one has exited).
        code = 2 if isinstance(e, UsageError) else 1
        if local_rank:
            time.sleep(3.0)
            sys.exit(code)
        msg = f"rank {rank}: {e}" if rank else str(e)
        if code == 2:
            raise UsageError(msg) from None
        raise click.ClickException(msg) from None
    if rank:
        return
    best = f", best val PSNR {s['best_val_psnr']:.2f} dB" if s["best_val_psnr"] else ""
    wait = s["data_wait_fraction"]
    speed = (f" ({s['mean_step_time'] * 1e3:.1f} ms/step, data wait {wait:.1%} of step time)"
             if wait is not None else "")
    steps = f"{s['iteration']}/{iters}" if iters else str(s["iteration"])
    budget = (f" (training {s['train_s']:.0f} s of a {time_budget:g} min budget, validation "
              f"{s['val_s']:.0f} s, checkpoints {s['ckpt_s']:.0f} s)" if time_budget else "")
    click.echo(f"{model} {task_cfg.key}: {steps} iterations in "
               f"{s['wall_s']:.1f} s{budget}{speed}{best} -> {out_dir}")
    if wait is not None and wait > 0.1:
        click.echo("note: the GPU waited for data over 10% of the time; raise --workers",
                   err=True)
