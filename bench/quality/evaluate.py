"""Evaluation: deterministic degraded inputs -> model -> pyiqa metrics -> quality rows.

Metric conventions (what a reader of a row needs to know):

- Outputs are clamped to [0, 1] and quantized to 8 bits (round(x * 255) / 255) before scoring,
  as if saved to PNG: that is how SR/deblurring papers score. The degraded input row
  (`model=input`; for SR the MATLAB-bicubic upsample) is clamped and quantized the same way.
- psnr / ssim: on RGB (pyiqa "psnr" and "ssimc"). psnr_y / ssim_y: on the Y channel of
  BT.601 YCbCr as MATLAB's rgb2ycbcr computes it (Y = 16 + 65.481 R + 128.553 G + 24.966 B for
  R, G, B in [0, 1]; pyiqa ``color_space='ycbcr'``, not its default 'yiq'). pyiqa's SSIM is
  MATLAB ssim.m: Gaussian window 11 / sigma 1.5, 'valid' filtering, values rounded to 8-bit
  levels, no downsampling. PSNR uses data range 1 (Y unrounded, as BasicSR does).
- Border: `crop_border = scale` pixels on each side for SR (the usual SR convention), 0 for x1.
- LPIPS (pyiqa "lpips", AlexNet v0.1, on RGB) only when both weight files are already in the
  local caches; otherwise `lpips: null` with `lpips_status: "unavailable: <reason>"`. Nothing is
  downloaded at evaluation time.
- Whole images: the input is reflect-padded to the model's multiple and the output cropped back.
  With `tile`, the input is cut into tile x tile pieces overlapping by `tile_overlap` pixels and
  overlapping outputs are averaged; rows carry `tile`/`tile_overlap` (null when whole).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import UsageError
from bench.quality.tasks import TaskConfig, eval_pair
from bench.train.checkpoint import (TRAIN_CONFIG, TRAIN_IMAGES, budget_of, load_weights_into,
                                    resolve_weights)

# ----------------------------------------------------------------------------- inference


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad bottom/right so H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _forward(model, x: torch.Tensor, multiple: int, out_scale: int, autocast: bool
             ) -> torch.Tensor:
    h, w = x.shape[-2:]
    xp = pad_to_multiple(x, multiple)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = model(xp)
    return y[..., : h * out_scale, : w * out_scale].float()


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    stride = tile - overlap
    s = list(range(0, n - tile, stride))
    return s + [n - tile]


@torch.inference_mode()
def restore(model, inp: torch.Tensor, *, multiple: int = 1, out_scale: int = 1,
            tile: int | None = None, overlap: int = 0, autocast: bool = False) -> torch.Tensor:
    """Model output for a (1, 3, h, w) input: whole image, or overlapping tiles averaged."""
    if not tile:
        return _forward(model, inp, multiple, out_scale, autocast)
    if overlap >= tile:
        raise UsageError(f"--tile-overlap ({overlap}) must be smaller than --tile ({tile})")
    b, c, h, w = inp.shape
    s = out_scale
    out = torch.zeros(b, c, h * s, w * s, device=inp.device)
    weight = torch.zeros(1, 1, h * s, w * s, device=inp.device)
    for y0 in _starts(h, tile, overlap):
        for x0 in _starts(w, tile, overlap):
            piece = inp[..., y0:y0 + tile, x0:x0 + tile]
            y = _forward(model, piece, multiple, s, autocast)
            out[..., y0 * s:y0 * s + y.shape[-2], x0 * s:x0 * s + y.shape[-1]] += y
            weight[..., y0 * s:y0 * s + y.shape[-2], x0 * s:x0 * s + y.shape[-1]] += 1
    return out / weight


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels (what a saved PNG holds)."""
    return (x.clamp(0, 1) * 255).round() / 255


def psnr_rgb(x: torch.Tensor, y: torch.Tensor, border: int = 0) -> float:
    """Plain RGB PSNR (data range 1) for training-time validation; no pyiqa needed."""
    if border:
        x, y = x[..., border:-border, border:-border], y[..., border:-border, border:-border]
    mse = torch.mean((x.double() - y.double()) ** 2).item()
    return 10 * math.log10(1 / max(mse, 1e-20))


# ----------------------------------------------------------------------------- metrics


LPIPS_WEIGHTS_ENV = "SERPENT_BENCH_LPIPS_WEIGHTS"


def lpips_weight_files(weights_dir: str | Path | None = None) -> list[Path]:
    """The two files pyiqa's LPIPS (alex, v0.1) needs: torchvision's AlexNet and the LPIPS
    linear layers. In `weights_dir` (--lpips-weights, or $SERPENT_BENCH_LPIPS_WEIGHTS) when
    given, else where pyiqa and torchvision would download them (torch hub's checkpoints folder
    and pyiqa's cache)."""
    import torchvision
    from pyiqa.archs.lpips_arch import default_model_urls
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    alex = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    lin = default_model_urls["0.1_alex"].rsplit("/", 1)[-1]
    if weights_dir:
        return [Path(weights_dir) / alex, Path(weights_dir) / lin]
    return [Path(torch.hub.get_dir()) / "checkpoints" / alex, Path(DEFAULT_CACHE_DIR) / lin]


@contextlib.contextmanager
def _hub_dir_with(checkpoint: Path):
    """torch hub pointed at a temporary folder whose checkpoints/ holds `checkpoint` (a link):
    torchvision then loads the AlexNet weights from it instead of downloading them."""
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / checkpoint.name).symlink_to(checkpoint.resolve())
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


def _load_lpips_layers(net: torch.nn.Module, path: Path) -> None:
    """The LPIPS linear layers from `path` (weights_only: a user's folder is not trusted to
    run code), every key checked: none missing, none left over."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = {k for k in net.state_dict() if re.match(r"lin\d+\.", k)}  # (lins.N: the same)
    if set(state) != own:
        raise ValueError(f"{path.name} does not hold LPIPS v0.1 alex linear layers "
                         f"(missing {sorted(own - set(state))[:3]}, unexpected "
                         f"{sorted(set(state) - own)[:3]})")
    net.load_state_dict(state, strict=False)  # strict over the lin layers, checked above
    net.eval()


def make_lpips(device, weights_dir: str | Path | None = None):
    """(metric or None, status). Never downloads: missing files -> unavailable, at once."""
    weights_dir = weights_dir or os.environ.get(LPIPS_WEIGHTS_ENV) or None
    try:
        alex, lin = lpips_weight_files(weights_dir)
        missing = [str(p) for p in (alex, lin) if not p.is_file()]
        if missing:
            hint = ("" if weights_dir else f"; put them in a folder and pass --lpips-weights DIR "
                    f"(or set {LPIPS_WEIGHTS_ENV})")
            return None, f"unavailable: weights not found ({', '.join(missing)}){hint}"
        import pyiqa

        if not weights_dir:
            return pyiqa.create_metric("lpips", device=device), "ok"
        with _hub_dir_with(alex):
            metric = pyiqa.create_metric("lpips", device=device, pretrained=False)
        _load_lpips_layers(metric.net, lin)
        return metric, f"ok (weights from {weights_dir})"
    except Exception as e:  # noqa: BLE001  (any failure must become a status, not a crash)
        return None, f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


class Metrics:
    """pyiqa PSNR/SSIM on RGB and on Y (BT.601), LPIPS when available; see module doc."""

    def __init__(self, cfg: TaskConfig, device="cpu", lpips: bool = True,
                 lpips_weights: str | Path | None = None):
        import pyiqa

        self.border = cfg.scale if cfg.task == "sr" else 0
        kw = {"crop_border": self.border, "device": device}
        self.fns = {
            "psnr": pyiqa.create_metric("psnr", test_y_channel=False, **kw),
            "ssim": pyiqa.create_metric("ssimc", **kw),
            "psnr_y": pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", **kw),
            "ssim_y": pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", **kw),
        }
        self.lpips, self.lpips_status = (make_lpips(device, lpips_weights) if lpips
                                         else (None, "unavailable: disabled (--no-lpips)"))

    def __call__(self, out: torch.Tensor, gt: torch.Tensor) -> dict:
        scores = {k: float(f(out, gt).item()) for k, f in self.fns.items()}
        scores["lpips"] = float(self.lpips(out, gt).item()) if self.lpips is not None else None
        scores["lpips_status"] = self.lpips_status
        return scores


# ----------------------------------------------------------------------------- models


@dataclass
class EvalModel:
    """A model ready to score, and where its weights came from."""

    name: str
    module: torch.nn.Module
    multiple: int = 1
    upsampler: bool = False
    weights: str | None = None
    weights_sha256: str | None = None
    train_budget: dict | None = None
    train_images: list = field(default_factory=list)  # summaries from train_images.json


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_eval_model(name: str, cfg: TaskConfig, weights: str | None = None,
                    device="cpu", overrides: dict | None = None) -> EvalModel:
    """Build registered model `name` for the task and load its weights (if given)."""
    from bench.registry import create_model, model_info, network_name

    info = model_info(name)
    wfile, run_dir, config, images = None, None, None, []
    if weights:
        wfile, run_dir = resolve_weights(weights)
        if run_dir is not None:
            config = json.loads((run_dir / TRAIN_CONFIG).read_text())
            if (run_dir / TRAIN_IMAGES).is_file():
                images = json.loads((run_dir / TRAIN_IMAGES).read_text())
    if config is not None:
        want = {"model": name, "task": cfg.task, "scale": cfg.scale}
        got = {k: config.get(k) for k in want}
        if network_name(str(got["model"])) == network_name(name):  # an alias, same network
            got["model"] = name
        if got != want:
            raise UsageError(f"weights {wfile} were trained for {got}, not {want}")
        overrides = {**config.get("model_overrides", {}), **(overrides or {})}
    module = create_model(name, task=cfg.task, scale=cfg.scale, **(overrides or {}))
    if wfile is not None:
        ckpt_config = load_weights_into(module, wfile)
        if ckpt_config and config is None:
            config = ckpt_config
    else:
        warnings.warn(f"{name}: no --weights given: scoring randomly initialized weights",
                      stacklevel=2)
    module.to(device).eval()
    return EvalModel(name, module, info.multiple, bool(info.upsampler),
                     str(wfile) if wfile else None, file_sha256(wfile) if wfile else None,
                     budget_of(config) if config else None, images)


# ----------------------------------------------------------------------------- evaluation


def _save_png(x: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (quantize(x)[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def _grid(panels: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """input | each model | GT side by side, labelled."""
    from PIL import Image, ImageDraw

    imgs = [(quantize(t)[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            for _, t in panels]
    h = max(i.shape[0] for i in imgs)
    gap = 4
    canvas = Image.new("RGB", (sum(i.shape[1] for i in imgs) + gap * (len(imgs) - 1), h + 16),
                       "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (label, _), img in zip(panels, imgs):
        canvas.paste(Image.fromarray(img), (x, 16))
        draw.text((x + 2, 2), label, fill="black")
        x += img.shape[1] + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _mean_rows(rows: list[dict]) -> list[dict]:
    """One mean row per (model, dataset) from per-image rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # the same model may be scored with several checkpoints
        groups.setdefault((r["model"], r["weights_sha256"], r["dataset"]), []).append(r)
    out = []
    for group in groups.values():
        mean = {k: v for k, v in group[0].items() if k not in ("image", "input_sha256")}
        mean["image"] = None
        mean["n_images"] = len(group)
        for k in ("psnr", "ssim", "psnr_y", "ssim_y", "lpips", "seconds"):
            vals = [r[k] for r in group if r.get(k) is not None]
            mean[k] = float(np.mean(vals)) if len(vals) == len(group) else None
        out.append(mean)
    return out


def evaluate(models: list[EvalModel], cfg: TaskConfig, sets: dict, *, device="cpu",
             dtype: str = "fp32", tile: int | None = None, tile_overlap: int = 0,
             metrics: Metrics | None = None, save_images: str | Path | None = None,
             grid: bool = False, env: dict | None = None, progress: bool = False) -> list[dict]:
    """Score `models` (and the degraded input) on `sets` {dataset: [ImageRecord]}.

    Returns per-image rows then mean rows, all kind=quality. Every model sees the same float32
    input tensor per image (its sha256 is in the per-image rows).
    """
    from tqdm import tqdm

    from bench.quality.data import to_tensor

    device = torch.device(device)
    metrics = metrics or Metrics(cfg, device)
    env = env or {}
    autocast = dtype == "bf16"
    save_dir = Path(save_images) if save_images else None
    base = {"kind": "quality", "task": cfg.task, "scale": cfg.scale, "degradation": cfg.key,
            "crop_border": metrics.border, "dtype": dtype, "tile": tile or None,
            "tile_overlap": tile_overlap if tile else None, "quantized": "8bit",
            "y_channel": "bt601_ycbcr"}
    rows: list[dict] = []
    names = [m.name for m in models]
    labels = [n if names.count(n) == 1 else f"{n}@{(m.weights_sha256 or 'init')[:8]}-{i}"
              for i, (n, m) in enumerate(zip(names, models))]
    total = sum(len(v) for v in sets.values())
    bar = tqdm(total=total * (len(models) + 1), disable=not progress, unit="img", leave=False)
    for dataset, records in sets.items():
        overlap = {m.name: _overlap_count(m, records) for m in models}
        for rec in records:
            hr = to_tensor(rec.array)[None]
            pairs = {up: eval_pair(hr, rec.id, cfg, up) for up in {m.upsampler for m in models}
                     | {False}}
            gt, _, shown = pairs[False]
            gt_dev = gt.to(device)
            common = {**base, "dataset": dataset, "image": rec.name, "n_images": 1}
            panels = [("input", shown)]
            scores = metrics(quantize(shown).to(device), gt_dev)
            rows.append({"model": "input", **common, **scores,
                         "input_sha256": _tensor_sha(shown), "weights": None,
                         "weights_sha256": None, "train_budget": None, **env})
            bar.update()
            for m, label in zip(models, labels):
                inp = pairs[m.upsampler][1]
                s = cfg.scale if (cfg.task == "sr" and m.upsampler) else 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                out = restore(m.module, inp.to(device), multiple=m.multiple, out_scale=s,
                              tile=tile, overlap=tile_overlap, autocast=autocast)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                if out.shape != gt.shape:
                    raise RuntimeError(f"{m.name}: output {tuple(out.shape)} for input "
                                       f"{tuple(inp.shape)}, expected {tuple(gt.shape)}")
                out = quantize(out)
                rows.append({"model": m.name, **common, **metrics(out, gt_dev),
                             "input_sha256": _tensor_sha(inp), "seconds": seconds,
                             "weights": m.weights, "weights_sha256": m.weights_sha256,
                             "train_budget": m.train_budget, "train_overlap": overlap[m.name],
                             **env})
                panels.append((label, out))
                if save_dir:
                    _save_png(out, save_dir / label / dataset / f"{rec.name}.png")
                bar.update()
            if save_dir and grid:
                _grid(panels + [("GT", gt)], save_dir / "grid" / dataset / f"{rec.name}.png")
    bar.close()
    return rows + _mean_rows(rows)


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _overlap_count(m: EvalModel, records) -> int | None:
    if not m.train_images:
        return None
    from bench.quality.data import find_overlaps

    return len({b for _, b, _ in find_overlaps(m.train_images, records)})


def check_train_overlap(models: list[EvalModel], sets: dict, allow: bool = False) -> list[str]:
    """Refuse (UsageError) to score a model on images it was trained on, unless `allow`; then
    return the problems for the caller to print. Uses the run's train_images.json."""
    from bench.quality.data import find_overlaps

    problems = []
    for m in models:
        for dataset, records in sets.items():
            pairs = find_overlaps(m.train_images, records) if m.train_images else []
            if pairs:
                ex = ", ".join(f"{a} = {b}" for a, b, _ in pairs[:3])
                problems.append(f"{m.name} was trained on {len({b for _, b, _ in pairs})} "
                                f"image(s) of {dataset} (e.g. {ex})")
    if problems and not allow:
        raise UsageError("train/eval overlap: " + "; ".join(problems)
                         + " -- evaluate on disjoint sets, or pass --allow-overlap "
                         "(rows then carry train_overlap)")
    return problems
