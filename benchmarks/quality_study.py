"""The equal-GPU-time quality study: every model trained for the same minutes of training time
on the same data stream, then scored on the same full images. Re-entrant: one model per call,
results appended, the study's state is its results folder (commit it, resume in another session).

    # here, once: the images that will travel (eval sets + the training images not in them)
    python -m benchmarks.quality_study stage --data-root ../shared/data --dest .gpu/data
    # on the GPU machine, once per call: the next model the study still lacks
    python -m benchmarks.quality_study run --next --data-root .gpu/data --out results/quality-study
    python -m benchmarks.quality_study status --out results/quality-study

What is equal for every model of a task: training images (BSD100 without the images that are
also in an evaluation set, found by content), seeded crops and degradations (the data stream
depends on seed and sample number only), crop, batch, loss (L1), bf16 autocast, the time budget
(training time: data loading and optimizer steps; validation and checkpoints are timed apart),
validation on Set5 at every 10% of the budget. What follows each paper: optimizer, learning rate,
betas, weight decay (`--recipe paper`, bench/train/recipes.py), with the schedule replaced by a
cosine to zero over the budget. Evaluation: the last checkpoint (not the best on Set5, so Set5's
final score is not selected on), fp32, whole images of Kodak24, CBSD68, Set14 and Set5.

Files under --out: <task>.jsonl (quality rows: per image and means, the degraded input too),
<task>_validation.jsonl (one row per validation point), <task>_runs.jsonl (one row per trained
model: budget, clock, iterations, optimizer, images used) and manifest.jsonl (every image that
travelled, with its sha256).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

# study order: deblurring first (the task of `bench run`), then 8x SR
STUDY = {
    "deblur": ("serpent_t", "serpent_s", "serpent_b", "nafnet_w32", "restormer", "swinir",
               "mambair"),
    "sr8": ("serpent_s", "nafnet_w32", "swinir", "restormer", "serpent_t", "serpent_b",
            "mambair"),
}
TASKS = {"deblur": ("deblur", None), "sr8": ("sr", 8)}
SHAPES = {"deblur": dict(crop=128, batch=16), "sr8": dict(crop=256, batch=8)}  # sr: 32 px LR
EVAL_SETS = ("Kodak24", "CBSD68", "Set14", "Set5")
VAL_SET = "Set5"
TRAIN_SET = "BSD100"
STAGED_TRAIN = "BSD100_train"  # what `stage` writes: BSD100 minus the images in EVAL_SETS


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _done(out: Path, task: str, budget_s: float) -> set[str]:
    from bench.results import read_rows

    path = out / f"{task}_runs.jsonl"
    rows = read_rows(path) if path.exists() else []
    return {r["model"] for r in rows if r.get("status") == "ok" and r["time_budget_s"] == budget_s}


def stage(args) -> int:
    """Copy the evaluation sets and the training images that are in none of them (checked by
    content, not by name) into --dest, and write its manifest (every file, its sha256)."""
    from bench.quality.data import find_overlaps, list_images, load_set, resolve_set

    src = Path(args.data_root)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    held = [r for s in EVAL_SETS for r in load_set(s, src)]
    train = load_set(TRAIN_SET, src)
    overlap = {a for a, _, _ in find_overlaps(train, held)}
    keep = [r for r in train if r.id not in overlap]
    for s in EVAL_SETS:
        shutil.copytree(resolve_set(s, src), dest / s, dirs_exist_ok=True)
    (dest / STAGED_TRAIN).mkdir(exist_ok=True)
    for r in keep:
        shutil.copy2(r.path, dest / STAGED_TRAIN / Path(r.path).name)
    rows = [{"kind": "manifest", "set": p.parent.name, "file": p.name, "bytes": p.stat().st_size,
             "sha256": _sha256(p)}
            for s in (*EVAL_SETS, STAGED_TRAIN) for p in list_images(dest / s)]
    (dest / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mb = sum(r["bytes"] for r in rows) / 2 ** 20
    print(f"staged {len(rows)} images ({mb:.1f} MiB) into {dest}: {', '.join(EVAL_SETS)} and "
          f"{len(keep)} of {len(train)} {TRAIN_SET} images ({len(overlap)} are in an "
          f"evaluation set and stay behind)")
    return 0


def status(args) -> int:
    out, budget = Path(args.out), args.budget_min * 60
    for task, models in STUDY.items():
        done = _done(out, task, budget)
        print(f"{task}: done {', '.join(m for m in models if m in done) or '-'}; "
              f"to do {', '.join(m for m in models if m not in done) or '-'}")
    return 0


def run(args) -> int:
    import torch

    from bench.environment import environment
    from bench.quality.data import load_sets
    from bench.quality.evaluate import Metrics, check_train_overlap, evaluate, load_eval_model
    from bench.quality.tasks import make_task
    from bench.results import append_rows
    from bench.train.loop import VALIDATION_FILE, TrainConfig, train

    out, budget = Path(args.out), args.budget_min * 60
    out.mkdir(parents=True, exist_ok=True)
    todo = [(t, m) for t in STUDY for m in STUDY[t] if m not in _done(out, t, budget)]
    if args.model:
        todo = [(args.task, args.model)]
    elif not todo:
        print("the study is complete at this budget")
        return 0
    task_name, model = todo[0]
    task, scale = TASKS[task_name]
    root = Path(args.data_root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_task(task, scale=scale)
    run_dir = Path(args.runs_dir) / task_name / model
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run cut off in an earlier call starts over: equal budgets
    manifest = root / "manifest.jsonl"
    if manifest.exists() and not (out / "manifest.jsonl").exists():
        shutil.copy2(manifest, out / "manifest.jsonl")  # what travelled
    train_set = STAGED_TRAIN if (root / STAGED_TRAIN).is_dir() else TRAIN_SET
    tc = TrainConfig(model=model, task=task, train_sets=[train_set], iters=None,
                     time_budget_s=budget, val_points=10, val_sets=[VAL_SET],
                     holdout_sets=list(EVAL_SETS), drop_overlap=True, recipe="paper",
                     out_dir=str(run_dir), workers=args.workers, seed=0, data_root=str(root),
                     dtype="bf16" if device.type == "cuda" else "fp32", device=str(device),
                     progress=False, log_every=50,
                     **{**SHAPES[task_name], **{k: v for k, v in (("crop", args.crop),
                                                                   ("batch", args.batch)) if v}})
    print(f"[{task_name}] {model}: training for {args.budget_min:g} min of training time",
          flush=True)
    t0 = time.perf_counter()
    summary = train(tc, cfg)
    config = json.loads((run_dir / "train_config.json").read_text())
    images = json.loads((run_dir / "train_images.json").read_text())
    print(f"[{task_name}] {model}: {summary['iteration']} it, training {summary['train_s']:.0f} s,"
          f" validation {summary['val_s']:.0f} s, checkpoints {summary['ckpt_s']:.0f} s "
          f"(wall {time.perf_counter() - t0:.0f} s)", flush=True)
    append_rows(out / f"{task_name}_validation.jsonl",
                [json.loads(line) for line in (run_dir / VALIDATION_FILE).read_text().splitlines()])
    sets = load_sets(list(EVAL_SETS), root, limit=args.eval_limit)
    em = load_eval_model(model, cfg, str(run_dir / "last.pt"), device)
    problems = check_train_overlap([em], sets)  # raises if a training image is in an eval set
    env = {**environment(device), "benchmark": "quality_study"}
    t1 = time.perf_counter()
    rows = evaluate([em], cfg, sets, device=device, dtype="fp32", metrics=Metrics(cfg, device),
                    env=env)
    append_rows(out / f"{task_name}.jsonl", rows)
    append_rows(out / f"{task_name}_runs.jsonl", [{
        "kind": "study_run", "model": model, "task": task, "scale": cfg.scale,
        "degradation": cfg.key, "time_budget_s": budget, "status": "ok",
        **{k: summary[k] for k in ("iteration", "train_s", "val_s", "ckpt_s", "mean_step_time",
                                   "data_wait_fraction", "best_val_psnr", "last_val_psnr")},
        "images_seen": summary["iteration"] * tc.batch, "crop": tc.crop, "batch": tc.batch,
        "optimizer": {k: config[k] for k in ("recipe", "optimizer", "lr", "betas",
                                             "weight_decay")},
        "train_images": [i["id"] for i in images], "dropped_overlap": config["dropped_overlap"],
        "val_set": VAL_SET, "eval_sets": list(EVAL_SETS), "eval_limit": args.eval_limit,
        "overlap_warnings": problems,
        "eval_s": time.perf_counter() - t1, **env}])
    for r in rows:
        if r["image"] is None:
            print(f"  {r['model']:>12} {r['dataset']:>8}: PSNR {r['psnr']:.2f} dB, "
                  f"PSNR-Y {r['psnr_y']:.2f} dB, SSIM {r['ssim']:.4f}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="copy the images the study needs, with a manifest")
    st.add_argument("--data-root", required=True)
    st.add_argument("--dest", required=True)
    for name in ("run", "status"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="the study's results folder")
        p.add_argument("--budget-min", type=float, default=6.0,
                       help="training minutes per model (default 6)")
    r = sub.choices["run"]
    r.add_argument("--data-root", required=True, help="a folder from `stage`, or the full data")
    r.add_argument("--next", action="store_true", help="the next model the study lacks (default)")
    r.add_argument("--task", choices=list(STUDY), default="deblur")
    r.add_argument("--model", default=None, help="train this model instead of the next one")
    r.add_argument("--runs-dir", default="runs/quality-study")
    r.add_argument("--workers", type=int, default=8)
    r.add_argument("--crop", type=int, default=None, help="smoke tests only (default: SHAPES)")
    r.add_argument("--batch", type=int, default=None, help="smoke tests only (default: SHAPES)")
    r.add_argument("--eval-limit", type=int, default=None,
                   help="smoke tests only: first N images of each evaluation set")
    args = ap.parse_args(argv)
    return {"stage": stage, "status": status, "run": run}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
