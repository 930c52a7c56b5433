"""`bench eval`: score models on evaluation sets (PSNR/SSIM on RGB and Y, LPIPS when available)."""
from __future__ import annotations

import click

from bench import options
from bench.cli.train import make_task_from, task_options
from bench.errors import UsageError


@click.command("eval")
@click.option("--model", "models", required=True,
              help="Comma list of registered models (scored on identical inputs).")
@click.option("--weights", default="",
              help="Comma list aligned with --model: a checkpoint file, official weights, or a "
                   "`bench train` run folder (its best.pt, else last.pt); '-' = none.")
@task_options
@click.option("--eval-set", "eval_sets", required=True,
              help="Comma list of set names under the data root, or folders.")
@click.option("--out", default=None, help="Append quality rows to this JSONL results file.")
@click.option("--save-images", default=None, help="Save restored images (PNG) under this folder.")
@click.option("--grid", is_flag=True,
              help="With --save-images: also save input | models | GT comparison grids.")
@click.option("--tile", type=int, default=None, help="Tile side (input pixels) for big images.")
@click.option("--tile-overlap", type=int, default=32, show_default=True)
@options.device_option
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Inference precision (bf16 = autocast).")
@click.option("--limit", type=int, default=None, help="First N images of each set.")
@click.option("--images", default="", help="Only these images (comma list of file stems).")
@click.option("--no-lpips", is_flag=True, help="Skip LPIPS (rows say so).")
@click.option("--lpips-weights", default=None, metavar="DIR",
              help="Folder holding alexnet-owt-7be5be79.pth and LPIPS_v0.1_alex-df73285e.pth, "
                   "for machines that cannot download them (default: $SERPENT_BENCH_LPIPS_WEIGHTS,"
                   " else torch hub's and pyiqa's caches).")
@click.option("--allow-overlap", is_flag=True,
              help="Score even on images the weights were trained on (rows carry the count).")
@options.progress_option
def eval_cmd(models, weights, task, scale, blur_sigma, kernel_size, noise_sigma, data_root,
             overrides, eval_sets, out, save_images, grid, tile, tile_overlap, device, dtype,
             limit, images, no_lpips, lpips_weights, allow_overlap, progress):
    """Evaluate MODELS on deterministic degraded inputs; prints per-set means.

    \b
    Example:
      bench eval --model serpent_s,swinir --weights runs/serpent_s_sr8,runs/swinir_sr8 \\
          --task sr --scale 8 --eval-set Kodak24,Set14,CBSD68 --out results/quality.jsonl
    """
    import torch

    from bench.quality.data import data_root as resolve_root
    from bench.quality.data import load_sets
    from bench.options import split_names
    from bench.environment import environment
    from bench.quality.evaluate import Metrics, check_train_overlap, evaluate, load_eval_model
    from bench.registry import resolve_models
    from bench.results import append_rows

    from pathlib import Path

    if out and Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder; give a results file such as "
                         f"{Path(out) / 'quality.jsonl'}")
    if save_images and Path(save_images).exists() and not Path(save_images).is_dir():
        raise UsageError(f"--save-images {save_images} is a file; give a folder")
    cfg = make_task_from(task, scale, blur_sigma, kernel_size, noise_sigma)
    if cfg.blur_sigma_range or cfg.noise_sigma_range:
        raise UsageError("evaluation degradations are fixed: give single values, not lo:hi")
    names = resolve_models(models)
    wlist = split_names(weights)
    if wlist and len(wlist) != len(names):
        raise UsageError(f"--weights lists {len(wlist)} entries for {len(names)} models")
    wlist = [None if w == "-" else w for w in wlist] or [None] * len(names)
    if grid and not save_images:
        raise UsageError("--grid needs --save-images DIR")
    dev = torch.device(options.resolve_device(device))
    root = resolve_root(data_root)
    sets = load_sets(eval_sets, root, limit=limit, only=split_names(images) or None)
    ovr = options.parse_overrides(overrides)
    eval_models = [load_eval_model(n, cfg, w, dev, ovr) for n, w in zip(names, wlist)]
    for problem in check_train_overlap(eval_models, sets, allow_overlap):
        click.echo(f"WARNING: train/eval overlap: {problem}", err=True)
    metrics = Metrics(cfg, dev, lpips=not no_lpips, lpips_weights=lpips_weights)
    if metrics.lpips is None:
        click.echo(f"note: LPIPS {metrics.lpips_status}", err=True)
    rows = evaluate(eval_models, cfg, sets, device=dev, dtype=dtype, tile=tile,
                    tile_overlap=tile_overlap, metrics=metrics, save_images=save_images,
                    grid=grid, env=environment(dev), progress=progress)
    if out:
        append_rows(out, rows)
    _print_table(rows)
    if out:
        click.echo(f"{len(rows)} rows appended to {out}")


def _print_table(rows) -> None:
    from tabulate import tabulate

    cols = ["model", "dataset", "n_images", "psnr", "ssim", "psnr_y", "ssim_y", "lpips"]
    means = [[r[c] for c in cols] for r in rows if r["image"] is None]
    click.echo(tabulate(means, headers=cols, floatfmt=".4f", missingval="-"))
