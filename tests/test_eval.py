"""Evaluation: metrics vs scikit-image, LPIPS fallback, padding/tiling, rows, CLI errors."""
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bench.quality.data import load_set
from bench.quality.evaluate import (EvalModel, Metrics, check_train_overlap, evaluate, make_lpips,
                            quantize, restore)
from bench.errors import UsageError
from bench.quality.tasks import make_task


def _y(rgb: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr luma of an RGB array in [0, 1], in [0, 255] (BT.601)."""
    return 16 + rgb @ np.array([65.481, 128.553, 24.966])


def _pair(h=70, w=66, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 3, h + 4, w + 4, generator=g), 5, 1)
    out = quantize(base + 0.05 * torch.randn(base.shape, generator=g))
    return quantize(base), out


@pytest.mark.parametrize("task,scale", [("deblur", None), ("sr", 4)])
def test_metrics_equal_scikit_image_on_the_same_y_channel(task, scale):
    from skimage.metrics import peak_signal_noise_ratio as sk_psnr
    from skimage.metrics import structural_similarity as sk_ssim

    cfg = make_task(task, scale=scale)
    gt, out = _pair()
    got = Metrics(cfg, lpips=False)(out, gt)
    b = cfg.scale if task == "sr" else 0
    g = gt[0].permute(1, 2, 0).double().numpy()
    o = out[0].permute(1, 2, 0).double().numpy()
    if b:
        g, o = g[b:-b, b:-b], o[b:-b, b:-b]
    yg, yo = _y(g), _y(o)
    ssim_kw = dict(data_range=255, gaussian_weights=True, sigma=1.5, win_size=11,
                   use_sample_covariance=False)
    assert got["psnr_y"] == pytest.approx(sk_psnr(yg / 255, yo / 255, data_range=1), abs=1e-3)
    # MATLAB ssim on rgb2ycbcr(uint8) luma: Y rounded to integer levels
    assert got["ssim_y"] == pytest.approx(sk_ssim(np.round(yg), np.round(yo), **ssim_kw),
                                          abs=1e-4)
    assert got["psnr"] == pytest.approx(sk_psnr(g, o, data_range=1), abs=1e-3)
    assert got["ssim"] == pytest.approx(
        sk_ssim(np.round(g * 255), np.round(o * 255), channel_axis=2, **ssim_kw), abs=1e-4)
    assert got["lpips"] is None and got["lpips_status"].startswith("unavailable")


def test_lpips_unavailable_fails_fast_without_network(tmp_path, monkeypatch):
    monkeypatch.delenv("SERPENT_BENCH_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    import pyiqa.utils.download_util as du
    monkeypatch.setattr(du, "DEFAULT_CACHE_DIR", str(tmp_path / "pyiqa"))
    t = time.perf_counter()
    metric, status = make_lpips("cpu")
    assert metric is None and status.startswith("unavailable: weights not found")
    assert str(tmp_path) in status
    # present but unreadable files: still a status, not a crash or a download
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "pyiqa").mkdir()
    for p in ("checkpoints/alexnet-owt-7be5be79.pth", "pyiqa/LPIPS_v0.1_alex-df73285e.pth"):
        (tmp_path / p).write_bytes(b"garbage")
    metric, status = make_lpips("cpu")
    assert metric is None and status.startswith("unavailable: ")
    assert time.perf_counter() - t < 10


class NeedsMultiple(nn.Module):
    """Pointwise SR-or-x1 model that insists on input sides divisible by `m`."""

    def __init__(self, m=8, s=1):
        super().__init__()
        self.m, self.s = m, s
        self.conv = nn.Conv2d(3, 3 * s * s, 1)
        self.shuffle = nn.PixelShuffle(s)

    def forward(self, x):
        assert x.shape[-1] % self.m == 0 and x.shape[-2] % self.m == 0, x.shape
        return self.shuffle(self.conv(x))


@pytest.mark.parametrize("s", [1, 4])
def test_restore_pads_crops_back_and_tiles_exactly(s):
    torch.manual_seed(0)
    m = NeedsMultiple(8, s).eval()
    x = torch.rand(1, 3, 37, 53)
    whole = restore(m, x, multiple=8, out_scale=s)
    assert whole.shape == (1, 3, 37 * s, 53 * s)
    with torch.no_grad():
        ref = m.shuffle(m.conv(x))  # pointwise: padding must not change the kept pixels
    assert torch.allclose(whole, ref, atol=1e-6)
    tiled = restore(m, x, multiple=8, out_scale=s, tile=16, overlap=4)
    assert torch.allclose(tiled, whole, atol=1e-6)
    with pytest.raises(UsageError):
        restore(m, x, multiple=8, out_scale=s, tile=8, overlap=8)


class Identity3(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.w


def _folder(tmp_path, name, n=2, h=64, w=72):
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        a = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(a).save(d / f"im{i}.png")
    return d


def test_evaluate_rows(tmp_path):
    _folder(tmp_path, "S")
    sets = {"S": load_set("S", tmp_path)}
    cfg = make_task("denoise")
    models = [EvalModel("a", Identity3().eval()), EvalModel("b", Identity3().eval(), 8),
              EvalModel("b", Identity3().eval(), weights_sha256="f00d" * 16)]
    rows = evaluate(models, cfg, sets, metrics=Metrics(cfg, lpips=False),
                    save_images=tmp_path / "out", grid=True, env={"host": "h"})
    per = [r for r in rows if r["image"] is not None]
    means = [r for r in rows if r["image"] is None]
    assert len(per) == 8 and len(means) == 4  # two checkpoints of "b": two mean rows
    assert all(r["kind"] == "quality" and r["host"] == "h" for r in rows)
    for img in ("im0", "im1"):
        shas = {r["input_sha256"] for r in per if r["image"] == img}
        assert len(shas) == 1  # identical inputs for every model, and the input row
        by = {r["model"]: r for r in per if r["image"] == img}
        # the identity model scores exactly like the (quantized) degraded input
        assert by["a"]["psnr"] == pytest.approx(by["input"]["psnr"], abs=1e-6)
    mean_a = next(r for r in means if r["model"] == "a")
    assert mean_a["n_images"] == 2 and mean_a["dataset"] == "S"
    assert mean_a["psnr"] == pytest.approx(np.mean([r["psnr"] for r in per if r["model"] == "a"]))
    assert mean_a["lpips"] is None and mean_a["lpips_status"].startswith("unavailable")
    assert (tmp_path / "out" / "a" / "S" / "im0.png").is_file()
    grid = Image.open(tmp_path / "out" / "grid" / "S" / "im1.png")
    assert grid.size[0] == 5 * 72 + 4 * 4  # input | a | b | b | GT
    assert (tmp_path / "out" / "b@f00df00d-2" / "S" / "im0.png").is_file()
    json.dumps(rows, allow_nan=False)


def test_eval_refuses_training_images(tmp_path):
    _folder(tmp_path, "S")
    recs = load_set("S", tmp_path)
    from bench.quality.data import record_summary
    m = EvalModel("a", Identity3(), train_images=[record_summary(recs[0])])
    with pytest.raises(UsageError, match="overlap"):
        check_train_overlap([m], {"S": recs})
    problems = check_train_overlap([m], {"S": recs}, allow=True)
    assert len(problems) == 1 and "trained on 1 image(s) of S" in problems[0]


@pytest.mark.parametrize("args,msg", [
    (["--eval-set", "Nope"], "no image set 'Nope'"),
    (["--eval-set", "Empty"], "holds no images"),
    (["--eval-set", "Bad"], "cannot read image"),
    (["--eval-set", "S", "--weights", "missing.pt"], "weights file not found"),
])
def test_cli_usage_errors_exit_2(tmp_path, capsys, args, msg):
    from bench.cli import main

    _folder(tmp_path, "S", n=1)
    (tmp_path / "Empty").mkdir()
    (tmp_path / "Bad").mkdir()
    (tmp_path / "Bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "nafnet", "--task", "deblur", "--data-root", str(tmp_path),
              "--no-progress", *args])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_official_style_weights_load_into_a_registered_model(tmp_path):
    from bench.quality.evaluate import load_eval_model

    cfg = make_task("deblur")
    small = {"width": 8, "enc_blk_nums": [1], "dec_blk_nums": [1], "middle_blk_num": 1}
    from bench import create_model
    torch.manual_seed(1)
    ref = create_model("nafnet", task="deblur", **small).eval()
    torch.save({"params": ref.state_dict()}, tmp_path / "official.pth")
    m = load_eval_model("nafnet", cfg, str(tmp_path / "official.pth"), overrides=small)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m.module(x), ref(x))
    assert m.weights_sha256 and m.train_budget is None
    with pytest.raises(UsageError, match="does not fit"):
        load_eval_model("nafnet", cfg, str(tmp_path / "official.pth"), overrides={"width": 16})


def test_bicubic_baseline_reproduces_published_set5_psnr():
    """End to end (MATLAB bicubic, mod-crop, border, BT.601 Y, pyiqa PSNR): the `input` row of
    SR on Set5 is the published bicubic baseline (EDSR/RCAN/SwinIR tables: 33.66, 28.42, 24.40
    dB at x2/x4/x8; they round Y to 8 bits, we do not: within 0.05 dB)."""
    import os
    from pathlib import Path

    import pyiqa

    from bench.quality.tasks import eval_pair
    root = Path(os.environ.get("SERPENT_BENCH_DATA")
                or Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    if not (root / "Set5").is_dir():
        pytest.skip("shared image data not found")
    from bench.quality.data import to_tensor
    recs = load_set("Set5", root)
    for s, published in ((2, 33.66), (4, 28.42), (8, 24.40)):
        m = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr",
                                crop_border=s, device="cpu")
        vals = []
        for r in recs:
            gt, _, shown = eval_pair(to_tensor(r.array)[None], r.id, make_task("sr", scale=s),
                                     upsampler=True)
            vals.append(m(quantize(shown), gt).item())
        assert np.mean(vals) == pytest.approx(published, abs=0.05), s
