"""Training loop of `bench train`: same data, degradation and budget for every model.

Design points:
- The data stream is a pure function of (seed, global sample number) (bench.quality.data.TrainCrops),
  so `--resume` continues exactly, the worker count never changes the data, and under
  torchrun each rank takes its slice of every global batch (rank r: samples
  it*B + r*B/W ... ) -- the same global batch whatever the number of ranks.
- Checkpoints hold model, optimizer, scheduler, iteration, best validation PSNR and every RNG
  state (torch, CUDA, numpy, python) as tensors/plain types, so they load with
  ``torch.load(weights_only=True)``. Written atomically (tmp file + os.replace): `last.pt` every
  --ckpt-every iterations and at the end, `best.pt` when validation PSNR improves.
- A non-finite loss or gradient norm stops training before the optimizer step, with a message
  naming the last good checkpoint; nothing is written after the bad step.
- Under torchrun (bench.train.distributed) the model is wrapped in DistributedDataParallel; --batch is
  the global batch and the loss is a mean, so the averaged DDP gradient is the single-process
  gradient of the same global batch: loss curves agree to floating-point rounding whatever the
  number of processes. Rank 0 alone logs and writes checkpoints (the others wait at a barrier);
  checkpoints hold the unwrapped model, so any world size (or `bench eval`) can load them.
  The logged loss is the mean over all ranks; the NaN guard is agreed by all ranks; validation
  is split over the ranks. Ranks > 0 draw dropout/drop-path noise from their own seeds.
"""
from __future__ import annotations

import csv
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.train import distributed
from bench.train.distributed import Dist
from bench import options
from bench.errors import UsageError
from bench.files import atomic_write
from bench.quality.evaluate import psnr_rgb, quantize, restore
from bench.train.checkpoint import (CKPT_FORMAT, TRAIN_CONFIG, TRAIN_IMAGES, load_checkpoint,
                                    rng_state, save_checkpoint, set_rng_state)
from bench.quality.tasks import TaskConfig, eval_pair

LOG_COLUMNS = ["iter", "loss", "lr", "data_wait_fraction", "step_time", "val_psnr", "elapsed_s",
               "train_s"]
VALIDATION_FILE = "validation.jsonl"  # one results row per validation (bench report plots them)
# Changing any of these changes what the run computes: --resume refuses a mismatch.
BUDGET_KEYS = ("model", "task", "scale", "task_config", "iters", "crop", "batch", "lr", "min_lr",
               "warmup", "weight_decay", "betas", "loss", "grad_clip", "dtype", "seed",
               "train_sets", "model_overrides", "optimizer", "time_budget_s", "val_points")


class TrainingDiverged(RuntimeError):
    """Loss or gradient became NaN/Inf; the message names the last good checkpoint."""


@dataclass
class TrainConfig:
    model: str
    task: str
    train_sets: list[str]
    iters: int | None  # None only with a time budget: as many steps as the budget allows
    crop: int
    batch: int
    out_dir: str
    scale: int = 1
    task_config: dict = field(default_factory=dict)  # TaskConfig.to_dict(), filled by prepare
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup: int | None = None  # None: 5% of iters (at most 1000)
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"  # adam | adamw
    recipe: str = "suite"  # suite: the options above; paper: bench.train.recipes for the model
    time_budget_s: float | None = None  # stop after this much training time (see _Clock)
    val_points: int = 10  # with a time budget: validate (and checkpoint) at every 1/N of it
    loss: str = "l1"
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    val_sets: list[str] = field(default_factory=list)
    val_every: int | None = None  # None: iters // 5 when a val set is given
    val_limit: int | None = None
    ckpt_every: int | None = None  # None: iters // 10 (at least 1)
    log_every: int = 10
    stop_at: int | None = None  # stop after this iteration (checkpoint written), resume later
    resume: str | None = None  # checkpoint path, or "auto" = <out_dir>/last.pt
    device: str = "auto"
    dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU
    workers: int = 4
    seed: int = 0
    data_root: str | None = None
    holdout_sets: list[str] = field(default_factory=list)
    drop_overlap: bool = False
    model_overrides: dict = field(default_factory=dict)
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        c = TrainConfig(**asdict(self))
        if c.time_budget_s is None and c.iters is None:
            raise UsageError("give --iters, or --time-budget (then --iters is an upper bound)")
        if (c.iters is not None and c.iters < 1) or c.batch < 1 or c.crop < 1:
            raise UsageError("--iters, --batch and --crop must be positive")
        if c.time_budget_s is not None and c.time_budget_s <= 0:
            raise UsageError("--time-budget must be positive (minutes of training)")
        if c.val_points < 1:
            raise UsageError("--val-points must be >= 1")
        if c.loss not in LOSSES:
            raise UsageError(f"--loss must be one of {', '.join(LOSSES)}")
        if c.recipe == "paper":
            from bench.registry import model_info
            from bench.train.recipes import recipe_for

            r = recipe_for(model_info(c.model).alias_of or c.model)
            c.optimizer, c.lr, c.betas, c.weight_decay = r.optimizer, r.lr, r.betas, r.weight_decay
        elif c.recipe != "suite":
            raise UsageError(f"--recipe must be suite or paper, got {c.recipe!r}")
        if c.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if c.time_budget_s is not None:
            # by time: cosine from the peak to zero over the budget, validation and checkpoints
            # at its fractions (_Clock); --iters, if given, only caps the number of steps
            c.warmup = c.warmup or 0
            c.min_lr = 0.0
            c.val_every = c.val_every or 0
            c.ckpt_every = c.ckpt_every or 0
        else:
            c.warmup = min(c.iters // 20, 1000) if c.warmup is None else c.warmup
            c.val_every = (max(1, c.iters // 5) if c.val_sets else 0) if c.val_every is None \
                else c.val_every
            c.ckpt_every = max(1, c.iters // 10) if c.ckpt_every is None else c.ckpt_every
        c.device = options.resolve_device(c.device)
        if c.dtype == "auto":
            c.dtype = "bf16" if c.device.startswith("cuda") else "fp32"
        if c.dtype not in ("bf16", "fp32"):
            raise UsageError("--dtype must be bf16 or fp32")
        c.betas = tuple(c.betas)
        return c


# ----------------------------------------------------------------------------- pieces


def charbonnier(x, y, eps: float = 1e-3):
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss, "charbonnier": charbonnier}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
VAL_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")


def lr_factor(it: int, iters: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up from 1/warmup to 1, then cosine decay to min_ratio at the last step."""
    if warmup and it < warmup:
        return (it + 1) / warmup
    t = (it - warmup) / max(1, iters - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def time_lr_factor(progress: float) -> float:
    """Cosine from 1 to 0 over the time budget (progress = training time / budget)."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


class SampleIndices(torch.utils.data.Sampler):
    """Global sample numbers of this rank, iteration by iteration, from `start` on."""

    def __init__(self, start: int, iters: int, global_batch: int, dist: Dist):
        dist.check_batch(global_batch)
        self.start, self.iters, self.gb, self.dist = start, iters, global_batch, dist
        self.local = global_batch // dist.world

    def __iter__(self):
        for it in range(self.start, self.iters):
            base = it * self.gb + self.dist.rank * self.local
            yield from range(base, base + self.local)

    def __len__(self) -> int:
        return (self.iters - self.start) * self.local


# ----------------------------------------------------------------------------- the run


@dataclass
class ModelSpec:
    """What the loop needs besides the module (filled from the registry, or by tests)."""

    module: torch.nn.Module
    multiple: int = 1
    upsampler: bool = False
    family: str | None = None


def build_model(cfg: TrainConfig, task: TaskConfig) -> ModelSpec:
    from bench.registry import create_model, model_info

    info = model_info(cfg.model)
    module = create_model(cfg.model, task=task.task, scale=task.scale, **cfg.model_overrides)
    return ModelSpec(module, info.multiple, bool(info.upsampler), info.family)


def _check_crop(cfg: TrainConfig, task: TaskConfig, spec: ModelSpec) -> None:
    side = cfg.crop // task.scale if (task.task == "sr" and spec.upsampler) else cfg.crop
    if side % spec.multiple:
        raise UsageError(f"{cfg.model} needs input sides divisible by {spec.multiple}; --crop "
                         f"{cfg.crop} gives {side}. Pick a crop that makes it divisible")


def _load_data(cfg: TrainConfig, task: TaskConfig, warn):
    """Training images (overlap with val/holdout sets refused or dropped) and val images."""
    from bench.quality.data import data_root, find_overlaps, load_sets, split_names

    root = data_root(cfg.data_root)
    train = [r for recs in load_sets(cfg.train_sets, root).values() for r in recs]
    val = load_sets(cfg.val_sets, root, limit=cfg.val_limit) if cfg.val_sets else {}
    held = dict(val)
    for name in split_names(cfg.holdout_sets):
        if name not in held:
            held.update(load_sets([name], root))
    others = [r for recs in held.values() for r in recs]
    pairs = find_overlaps(train, others)
    dropped = sorted({a for a, _, _ in pairs})
    if pairs and not cfg.drop_overlap:
        ex = ", ".join(f"{a} = {b}" for a, b, _ in pairs[:4])
        raise UsageError(f"{len(dropped)} training image(s) also appear in the validation/holdout "
                         f"sets (e.g. {ex}); use disjoint sets or pass --drop-overlap to leave "
                         "them out of training")
    if dropped:
        warn(f"dropping {len(dropped)} training image(s) that appear in "
             f"{', '.join(held)}: {', '.join(dropped[:6])}{' ...' if len(dropped) > 6 else ''}")
        train = [r for r in train if r.id not in set(dropped)]
        if not train:
            raise UsageError("no training images left after dropping those in the "
                             "validation/holdout sets")
    s = task.scale
    fits = [r for r in train if min(r.hw[0] - r.hw[0] % s, r.hw[1] - r.hw[1] % s) >= cfg.crop]
    small = [r.id for r in train if r.id not in {f.id for f in fits}]
    if small:
        warn(f"skipping {len(small)} training image(s) smaller than the {cfg.crop}x{cfg.crop} "
             f"crop: {', '.join(small[:6])}{' ...' if len(small) > 6 else ''}")
    return root, fits, val, dropped


def _validate(spec: ModelSpec, val_pairs, task: TaskConfig, device, autocast: bool,
              dist: Dist = Dist(), metrics=None) -> dict:
    """Means over the validation images of: `val_psnr`, the RGB PSNR (8-bit quantized, border
    = scale for SR, float64; it picks best.pt), and with `metrics` (bench.quality.evaluate.
    Metrics: pyiqa) psnr, ssim, psnr_y, ssim_y as `bench eval` scores them. Under torchrun each
    rank scores every world-th image and the sums are all-reduced."""
    spec.module.eval()
    s = task.scale if (task.task == "sr" and spec.upsampler) else 1
    border = task.scale if task.task == "sr" else 0
    keys = ["val_psnr", *(VAL_METRICS if metrics is not None else ())]
    sums = [0.0] * len(keys)
    for gt, inp in val_pairs[dist.rank::dist.world]:
        out = quantize(restore(spec.module, inp.to(device), multiple=spec.multiple, out_scale=s,
                               autocast=autocast)).float()
        sums[0] += psnr_rgb(out.cpu(), gt, border)
        if metrics is not None:
            scores = metrics(out, gt.to(out.device))
            for i, k in enumerate(VAL_METRICS, 1):
                sums[i] += scores[k]
    spec.module.train()
    sums = distributed.all_reduce_sum(sums, dist, device)
    return {k: v / len(val_pairs) for k, v in zip(keys, sums)}


class _CsvLog:
    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        rows = []
        if keep_until is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iter"]) <= keep_until]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow({k: row.get(k, "") for k in LOG_COLUMNS})


def train(cfg: TrainConfig, task: TaskConfig, spec: ModelSpec | None = None) -> dict:
    """Run (or resume) one training; returns a summary dict. See module doc.

    Under torchrun every process calls this; the configuration is checked before the process
    group is joined, so a bad --batch stops every rank at once with the same message.
    """
    dist = Dist.from_env()
    cfg = cfg.resolved()
    dist.check_batch(cfg.batch)
    device = dist.device(cfg.device)
    cfg.device = str(device)
    with distributed.process_group(dist, device):
        return _train(cfg, task, spec, dist, device)


def _train(cfg: TrainConfig, task: TaskConfig, spec: ModelSpec | None, dist: Dist,
           device: torch.device) -> dict:
    """The run, phase by phase: model, data, optimizer, resume, run files, loop, summary."""
    cfg.task, cfg.scale, cfg.task_config = task.task, task.scale, task.to_dict()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        if dist.is_main:
            print(f"bench train: warning: {msg}", file=sys.stderr)

    spec = _seeded_model(cfg, task, spec)
    model = spec.module.to(device).train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: let cuDNN pick its kernels
    data = _prepare_data(cfg, task, spec, warn)
    metrics = _validation_metrics(cfg, task, device)
    clock = _Clock()
    opt, sched = _optimizer(model, cfg, clock)
    config = _run_config(cfg, dist, model, spec, data)
    start, best = _resume(cfg, out, config, model, opt, sched, device, clock)
    if dist.rank:  # rank 0 carries the single-process RNG stream; the others get their own
        torch.manual_seed(distributed.rank_seed(cfg.seed, dist.rank, start))
    _write_run_files(out, config, data, dist, device)
    ckpt = _Checkpointer(out, model, opt, sched, config, cfg, dist, device, clock,
                         last=(str(out / "last.pt"), start) if cfg.resume else None, best=best)
    log = _CsvLog(out / "train_log.csv", start if cfg.resume else None) if dist.is_main else None
    val_rows = _ValidationRows(out / VALIDATION_FILE, config, data, start if cfg.resume else None,
                               device) if dist.is_main else None
    summary = _loop(cfg, task, spec, model, opt, sched, data, ckpt, log, val_rows, metrics,
                    clock, dist, device, start)
    summary["warnings"] = warnings
    if dist.is_main:
        config["result"] = summary
        atomic_write(out / TRAIN_CONFIG, json.dumps(config, indent=2, default=str))
    return summary


# ----------------------------------------------------------------------------- phases


def _seeded_model(cfg: TrainConfig, task: TaskConfig, spec: ModelSpec | None) -> ModelSpec:
    """Seeds every RNG, then builds the model: two runs with one seed start from one init."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    random.seed(cfg.seed)
    spec = spec if spec is not None else build_model(cfg, task)
    _check_crop(cfg, task, spec)
    return spec


@dataclass
class _Data:
    root: Path | None
    train_images: list
    dropped: list
    dataset: torch.utils.data.Dataset
    val_pairs: list  # (ground truth, model input) per validation image


def _prepare_data(cfg: TrainConfig, task: TaskConfig, spec: ModelSpec, warn) -> _Data:
    from bench.quality.data import TrainCrops, to_tensor

    root, train_images, val_sets, dropped = _load_data(cfg, task, warn)
    dataset = TrainCrops(train_images, task, cfg.crop, upsampler=spec.upsampler, seed=cfg.seed)
    val_pairs = [eval_pair(to_tensor(r.array)[None], r.id, task, spec.upsampler)[:2]
                 for recs in val_sets.values() for r in recs]
    return _Data(root, train_images, dropped, dataset, val_pairs)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, clock: "_Clock"):
    """Adam(W) without weight decay on biases and norms (tensors of <= 1 dim), and the schedule:
    by iterations, the warm-up + cosine of `lr_factor`; with a time budget, the cosine to zero
    of `time_lr_factor` over the training time the clock has counted."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    opt = OPTIMIZERS[cfg.optimizer]([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}],
                                    lr=cfg.lr, betas=cfg.betas)
    if cfg.time_budget_s is not None:
        budget = cfg.time_budget_s
        schedule = lambda it: time_lr_factor(clock.train_s / budget)  # noqa: E731
    else:
        min_ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        schedule = lambda it: lr_factor(it, cfg.iters, cfg.warmup, min_ratio)  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _validation_metrics(cfg: TrainConfig, task: TaskConfig, device):
    """pyiqa's PSNR/SSIM on RGB and Y for validation rows when pyiqa is installed (required
    with a time budget: the study's curves plot them), else None (RGB PSNR only)."""
    if not cfg.val_sets:
        return None
    try:
        from bench.quality.evaluate import Metrics

        return Metrics(task, device, lpips=False)
    except ImportError:
        if cfg.time_budget_s is not None:
            raise UsageError("--time-budget validation rows need pyiqa: pip install -e "
                             "'.[quality]'") from None
        return None


def _run_config(cfg: TrainConfig, dist: Dist, model, spec: ModelSpec, data: _Data) -> dict:
    """What train_config.json (and every checkpoint) records about the run."""
    return {**asdict(cfg), "world_size": dist.world, "batch_per_process": cfg.batch // dist.world,
            "params": sum(p.numel() for p in model.parameters()),
            "family": spec.family, "multiple": spec.multiple, "upsampler": spec.upsampler,
            "n_train_images": len(data.train_images), "dropped_overlap": data.dropped,
            "data_root": str(data.root) if data.root else None, "command": sys.argv}


def _resume(cfg: TrainConfig, out: Path, config: dict, model, opt, sched, device,
            clock: "_Clock") -> tuple[int, float | None]:
    """(start iteration, best validation PSNR); restores every state from the checkpoint,
    refusing one trained with a different budget (BUDGET_KEYS)."""
    resume = (out / "last.pt") if cfg.resume == "auto" else cfg.resume
    if not resume:
        return 0, None
    ckpt = load_checkpoint(resume)
    old = ckpt["config"]
    diff = [k for k in BUDGET_KEYS if _norm(old.get(k)) != _norm(config.get(k))]
    if diff:
        raise UsageError(f"cannot resume {resume}: it was trained with different "
                         + ", ".join(f"{k}={old.get(k)!r} (now {config.get(k)!r})"
                                     for k in diff))
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    start = int(ckpt["iteration"])
    clock.load(ckpt.get("clock") or {})
    set_rng_state(ckpt["rng"], device)
    config["resumed_from"] = {"path": str(resume), "iteration": start,
                              "world_size": old.get("world_size", 1)}
    return start, ckpt.get("best_val_psnr")


def _write_run_files(out: Path, config: dict, data: _Data, dist: Dist, device) -> None:
    """train_config.json (with the environment and, under torchrun, every rank's device) and
    train_images.json (what the model was trained on: `bench eval` checks overlaps with it)."""
    from bench.environment import environment
    from bench.quality.data import record_summary

    devices = distributed.gather(distributed.describe(device), dist) if dist.world > 1 else None
    if not dist.is_main:
        return
    config["environment"] = environment(device)
    if devices:
        config["devices"] = devices  # one per rank
    atomic_write(out / TRAIN_CONFIG, json.dumps(config, indent=2, default=str))
    atomic_write(out / TRAIN_IMAGES, json.dumps([record_summary(r) for r in data.train_images]))


class _Checkpointer:
    """Writes last.pt / best.pt (rank 0; the others wait at a barrier until the file exists)
    and remembers the last good checkpoint for the divergence message."""

    def __init__(self, out: Path, model, opt, sched, config: dict, cfg: TrainConfig, dist: Dist,
                 device, clock: "_Clock", *, last: tuple[str, int] | None, best: float | None):
        self.out, self.model, self.opt, self.sched = out, model, opt, sched
        self.config, self.cfg, self.dist, self.device = config, cfg, dist, device
        self.clock, self.last, self.best = clock, last, best

    def save(self, it: int, name: str = "last.pt") -> None:
        t0 = time.perf_counter()
        if name == "last.pt":
            self.last = (str(self.out / name), it)
        if self.dist.is_main:
            save_checkpoint({"format": CKPT_FORMAT, "model": self.model.state_dict(),
                             "optimizer": self.opt.state_dict(),
                             "scheduler": self.sched.state_dict(), "iteration": it,
                             "best_val_psnr": self.best, "rng": rng_state(self.device),
                             "clock": self.clock.state(),
                             "config": json.loads(json.dumps(self.config, default=str)),
                             "data": {"seed": self.cfg.seed,
                                      "samples_seen": it * self.cfg.batch}},
                            self.out / name)
        distributed.barrier(self.dist)
        self.clock.ckpt_s += time.perf_counter() - t0

    def validated(self, it: int, psnr: float) -> None:
        """A new validation PSNR: best.pt when it improves."""
        if self.best is None or psnr > self.best:
            self.best = psnr
            self.save(it, "best.pt")


class _Clock:
    """Where the run's time went: training (data wait + steps), validation, checkpoints. A time
    budget counts training only; validation points fall at fractions of it. Saved in every
    checkpoint, so a resumed run continues the same clock and schedule."""

    def __init__(self):
        self.train_s = self.val_s = self.ckpt_s = 0.0
        self.points_done = 0  # validation points of the time budget already taken

    def state(self) -> dict:
        return dict(vars(self))

    def load(self, state: dict) -> None:
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, type(getattr(self, k))(v))

    def due_point(self, cfg: TrainConfig) -> int | None:
        """The newest validation point of the time budget that training time has reached and
        that was not taken yet (points k = 1..val_points at k/val_points of the budget)."""
        if cfg.time_budget_s is None:
            return None
        k = min(cfg.val_points, int(self.train_s * cfg.val_points / cfg.time_budget_s))
        return k if k > self.points_done else None


class _ValidationRows:
    """One results row per validation, appended to <out-dir>/validation.jsonl: what `bench
    report` draws quality-vs-training-time curves from. A resumed run first drops the rows of
    validations after its checkpoint (they are redone)."""

    def __init__(self, path: Path, config: dict, data: "_Data", keep_until: int | None, device):
        from bench.environment import environment
        from bench.results import append_rows, read_rows

        self.path, self.append = path, append_rows
        if path.exists():
            rows = [r for r in read_rows(path)
                    if keep_until is not None and r.get("iteration", 0) <= keep_until]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
        task = config["task_config"]
        self.base = {
            "kind": "validation", "model": config["model"], "task": config["task"],
            "scale": config["scale"], "degradation": task.get("key"),
            "val_sets": config["val_sets"], "n_val_images": len(data.val_pairs),
            "batch": config["batch"], "crop": config["crop"], "dtype": config["dtype"],
            "seed": config["seed"], "time_budget_s": config["time_budget_s"],
            "optimizer": {k: config[k] for k in ("recipe", "optimizer", "lr", "betas",
                                                 "weight_decay")},
            "schedule": ("cosine to zero over the time budget" if config["time_budget_s"]
                         else f"warm-up {config['warmup']} it, cosine to {config['min_lr']}"),
            **environment(device)}

    def write(self, it: int, scores: dict, clock: _Clock, point: int | None) -> None:
        budget = self.base["time_budget_s"]
        self.append(self.path, [{
            **self.base, "iteration": it, "images_seen": it * self.base["batch"],
            "train_s": clock.train_s, "val_s": clock.val_s, "ckpt_s": clock.ckpt_s,
            "budget_fraction": clock.train_s / budget if budget else None, "point": point,
            **scores, "status": "ok"}])


class _Window:
    """Loss and timing sums since the last log line, and over the whole run."""

    def __init__(self):
        self.loss = self.wait = self.time = 0.0
        self.n = 0
        self.wait_total = self.time_total = 0.0

    def add(self, loss: float, wait: float, step: float) -> None:
        self.loss, self.wait, self.time, self.n = (self.loss + loss, self.wait + wait,
                                                   self.time + step, self.n + 1)
        self.wait_total += wait
        self.time_total += step

    def flush(self) -> tuple[float, float, float]:
        """(mean loss, data-wait fraction, mean step time) of the window, then a new window."""
        out = self.loss / self.n, self.wait / self.time, self.time / self.n
        self.loss = self.wait = self.time = 0.0
        self.n = 0
        return out


def _loader(cfg: TrainConfig, data: _Data, dist: Dist, device, start: int, limit: int):
    return torch.utils.data.DataLoader(
        data.dataset, batch_size=cfg.batch // dist.world,
        sampler=SampleIndices(start, limit, cfg.batch, dist), num_workers=cfg.workers,
        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None,
        generator=torch.Generator())  # keeps the loader from drawing on the global torch RNG


def _loop(cfg: TrainConfig, task: TaskConfig, spec: ModelSpec, model, opt, sched, data: _Data,
          ckpt: _Checkpointer, log: "_CsvLog | None", val_rows: "_ValidationRows | None",
          metrics, clock: _Clock, dist: Dist, device, start: int) -> dict:
    """Optimizer steps from `start` until --stop-at / --iters or the time budget: validation,
    checkpoints, log. Validation and checkpoint time stay off the training clock."""
    from tqdm import tqdm

    limit = cfg.iters if cfg.iters is not None else 2 ** 40  # a time budget ends it first
    stop = min(limit, cfg.stop_at or limit)
    budget = cfg.time_budget_s
    loss_fn = LOSSES[cfg.loss]
    ddp = distributed.wrap(model, dist, device)  # forward through it; save/validate `model`
    autocast = cfg.dtype == "bf16"
    bar = tqdm(total=cfg.iters if budget is None else round(budget), unit="it" if budget is None
               else "train-s", initial=start if budget is None else round(clock.train_s),
               disable=not (cfg.progress and dist.is_main), dynamic_ncols=True)
    window = _Window()
    t_run = time.perf_counter()
    it = start
    data_iter = iter(_loader(cfg, data, dist, device, start, limit))
    val_psnr = None

    def validate(point: int | None) -> float:
        t0 = time.perf_counter()
        scores = _validate(spec, data.val_pairs, task, device, autocast, dist, metrics)
        clock.val_s += time.perf_counter() - t0
        if val_rows is not None:
            val_rows.write(it, scores, clock, point)
        ckpt.validated(it, scores["val_psnr"])
        return scores["val_psnr"]

    try:
        while it < stop and (budget is None or clock.train_s < budget):
            t0 = time.perf_counter()
            inp, target = next(data_iter)
            inp = inp.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            t_data = time.perf_counter() - t0
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                pred = ddp(inp)
            loss = loss_fn(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under DDP: gradients averaged over ranks = global-batch gradient
            norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    if cfg.grad_clip > 0 else None)
            # the step is taken only if every rank's loss and gradient norm are finite
            loss_value, bad_norm = distributed.step_check(loss, norm, dist)
            if not math.isfinite(loss_value):
                raise TrainingDiverged(_diverged("loss", loss_value, it + 1, ckpt.last))
            if bad_norm:
                raise TrainingDiverged(_diverged("gradient norm", float(norm), it + 1, ckpt.last))
            opt.step()
            it += 1
            step = time.perf_counter() - t0  # loss_value synchronised with the device
            clock.train_s += step
            if budget is not None:  # every rank follows rank 0's clock: same steps everywhere
                clock.train_s, = distributed.broadcast_floats([clock.train_s], dist, device)
            sched.step()
            window.add(loss_value, t_data, step)
            val_psnr = None
            point = clock.due_point(cfg)
            if point is not None:
                clock.points_done = point
                if data.val_pairs:
                    val_psnr = validate(point)
                ckpt.save(it)
            elif cfg.val_every and data.val_pairs and (it % cfg.val_every == 0
                                                       or it == cfg.iters):
                val_psnr = validate(None)
            if (cfg.ckpt_every and it % cfg.ckpt_every == 0) or (it == stop and point is None):
                ckpt.save(it)
            if log is not None and (it % cfg.log_every == 0 or it == stop or val_psnr is not None):
                loss_mean, wait, step_time = window.flush()
                log.write({"iter": it, "loss": f"{loss_mean:.6g}",
                           "lr": f"{opt.param_groups[0]['lr']:.6g}",
                           "data_wait_fraction": f"{wait:.4f}", "step_time": f"{step_time:.6g}",
                           "val_psnr": "" if val_psnr is None else f"{val_psnr:.4f}",
                           "elapsed_s": f"{time.perf_counter() - t_run:.2f}",
                           "train_s": f"{clock.train_s:.3f}"})
                bar.set_postfix(loss=f"{loss_mean:.4g}", wait=f"{wait:.0%}",
                                **({"val": f"{val_psnr:.2f}"} if val_psnr is not None else {}))
            bar.update(1 if budget is None else round(clock.train_s) - bar.n)
    finally:
        bar.close()
        del data_iter
    finished = it >= limit or (budget is not None and clock.train_s >= budget)
    return {"iteration": it, "finished": finished, "best_val_psnr": ckpt.best,
            "last_val_psnr": val_psnr, "wall_s": time.perf_counter() - t_run,
            "data_wait_fraction": (window.wait_total / window.time_total
                                   if window.time_total else None),
            "mean_step_time": window.time_total / max(1, it - start),
            "train_s": clock.train_s, "val_s": clock.val_s, "ckpt_s": clock.ckpt_s,
            "time_budget_s": budget}


def _norm(v):
    """Compare config values after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(v, default=str))


def _diverged(what: str, value: float, it: int, last_ckpt) -> str:
    where = (f"last good checkpoint: {last_ckpt[0]} (iteration {last_ckpt[1]}); lower --lr or "
             "--grad-clip and resume from it with --resume" if last_ckpt
             else "no checkpoint was written yet")
    return f"training stopped: {what} became {value} at iteration {it}; {where}"
