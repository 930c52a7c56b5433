"""Equal short training budget for several models on two tasks, then evaluation, in one process.

    python -m benchmarks.quality_short --out results/quality_short.jsonl

For each task (deblurring, SR x8 by default) every model is trained with the same budget
(iterations, crop, batch, lr, data, seed) through bench.train.loop -- the code `bench train` runs --
then all of them are scored together on the same deterministic inputs through bench.quality.evaluate
(`bench eval`), and the quality rows (kind=quality, benchmark=quality_short, train budget and
measured training time in `train_budget`) are appended to --out. One process saves the start-up
of ten CLI invocations. A model that fails to train is reported and left out of its evaluation;
the run goes on. Each task's rows are written as soon as that task is done.

Training data default: Urban100 + BSD100, minus the BSD100 images that are also in CBSD68
(found by content, --holdout), so evaluation on Kodak24/Set14/CBSD68 never sees a training image.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

TASKS = {"deblur": ("deblur", None), "sr8": ("sr", 8), "sr4": ("sr", 4), "denoise": ("denoise", None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results JSONL (appended)")
    ap.add_argument("--models", default="serpent_s,swinir,restormer,nafnet")
    ap.add_argument("--tasks", default="deblur,sr8", help=f"comma list of {', '.join(TASKS)}")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-set", default="Urban100,BSD100")
    ap.add_argument("--eval-set", default="Kodak24,Set14,CBSD68")
    ap.add_argument("--eval-dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--limit", type=int, default=None, help="first N images per eval set")
    ap.add_argument("--data-root", default=None, help="default $SERPENT_BENCH_DATA")
    ap.add_argument("--runs-dir", default="runs/quality_short")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import torch
    from tabulate import tabulate

    from bench.quality.data import data_root, load_sets
    from bench.options import resolve_device, split_names
    from bench.environment import environment
    from bench.quality.evaluate import Metrics, check_train_overlap, evaluate, load_eval_model
    from bench.results import append_rows
    from bench.quality.tasks import make_task
    from bench.train.loop import TrainConfig, train

    device = torch.device(resolve_device(args.device))
    root = data_root(args.data_root)
    eval_sets = load_sets(args.eval_set, root, limit=args.limit)
    models = split_names(args.models)
    t_all = time.perf_counter()
    table = []
    for tname in split_names(args.tasks):
        task, scale = TASKS[tname]
        cfg = make_task(task, scale=scale)
        trained = []
        for m in models:
            out_dir = Path(args.runs_dir) / f"{m}-{tname}"
            tc = TrainConfig(model=m, task=task, train_sets=split_names(args.train_set),
                             iters=args.iters, crop=args.crop, batch=args.batch,
                             out_dir=str(out_dir), lr=args.lr, workers=args.workers,
                             seed=args.seed, data_root=args.data_root,
                             holdout_sets=split_names(args.eval_set), drop_overlap=True,
                             device=str(device), progress=False)
            t0 = time.perf_counter()
            try:
                s = train(tc, cfg)
            except Exception as e:  # noqa: BLE001  (one model failing must not end the run)
                traceback.print_exc()
                print(f"[{tname}] {m}: training FAILED: {type(e).__name__}: {e}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            print(f"[{tname}] {m}: {s['iteration']} it in {s['wall_s']:.1f} s "
                  f"({s['mean_step_time'] * 1e3:.1f} ms/step, data wait "
                  f"{s['data_wait_fraction']:.1%}); process total {time.perf_counter() - t0:.1f} s",
                  flush=True)
            trained.append((m, out_dir))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not trained:
            continue
        t0 = time.perf_counter()
        ems = [load_eval_model(m, cfg, str(d), device) for m, d in trained]
        check_train_overlap(ems, eval_sets)  # refuses if a training image is in an eval set
        env = {**environment(device), "benchmark": "quality_short"}
        rows = evaluate(ems, cfg, eval_sets, device=device, dtype=args.eval_dtype,
                        metrics=Metrics(cfg, device), env=env)
        append_rows(args.out, rows)
        print(f"[{tname}] evaluation of {len(ems)} models: {time.perf_counter() - t0:.1f} s; "
              f"{len(rows)} rows -> {args.out}", flush=True)
        for r in rows:
            if r["image"] is None:
                b = r.get("train_budget") or {}
                table.append([tname, r["model"], r["dataset"], r["n_images"], r["psnr_y"],
                              r["ssim_y"], r["psnr"], b.get("train_wall_s")])
        del ems
    print(tabulate(table, headers=["task", "model", "dataset", "n", "psnr_y", "ssim_y", "psnr",
                                   "train s"], floatfmt=".4f", missingval="-"))
    print(f"device: {environment(device).get('device_name')}; budget: {args.iters} it x batch "
          f"{args.batch} x crop {args.crop}, lr {args.lr}; total {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
