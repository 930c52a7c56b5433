"""Training loop: exact resume, NaN guard, overlap and size checks, logs, CLI, CPU smoke run."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bench.errors import UsageError
from bench.quality.tasks import make_task
from bench.train.loop import ModelSpec, TrainConfig, TrainingDiverged, lr_factor, train

REPO = Path(__file__).resolve().parent.parent


class Tiny(nn.Module):
    """Conv net with dropout, so resuming must restore the global torch RNG too."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Dropout(0.2),
                                  nn.Conv2d(8, 3, 3, padding=1))
        self.calls, self.nan_at = 0, nan_at

    def forward(self, x):
        self.calls += 1
        y = x + self.body(x)
        return y * float("nan") if self.calls == self.nan_at else y


def _images(tmp_path, name="T", sizes=((48, 56), (52, 64), (60, 48)), seed=0):
    """Smooth random images (like photos, unlike white noise, they have a stable thumbnail)."""
    d = tmp_path / name
    d.mkdir()
    for i, (h, w) in enumerate(sizes):
        a = np.random.default_rng(seed + i).integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(a).resize((w, h), Image.BICUBIC).save(d / f"im{i}.png")
    return d


def _cfg(tmp_path, out, **kw):
    base = dict(model="tiny", task="denoise", train_sets=["T"], iters=4, crop=16, batch=2,
                out_dir=str(tmp_path / out), workers=0, data_root=str(tmp_path), ckpt_every=2,
                log_every=1, progress=False, seed=7, warmup=1)
    return TrainConfig(**{**base, **kw})


def _spec(nan_at=None):
    torch.manual_seed(0)
    return ModelSpec(Tiny(nan_at))


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(i, 100, 10, 0.01) for i in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.505)
    assert f[100] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_resume_continues_bit_identically(tmp_path):
    _images(tmp_path)
    task = make_task("denoise")
    full = train(_cfg(tmp_path, "full"), task, _spec())
    part = train(_cfg(tmp_path, "part", stop_at=2), task, _spec())
    assert full["iteration"] == 4 and part["iteration"] == 2 and not part["finished"]
    assert _ckpt(tmp_path / "part" / "last.pt")["iteration"] == 2
    resumed = train(_cfg(tmp_path, "part", resume="auto"), task, _spec())
    assert resumed["iteration"] == 4 and resumed["finished"]
    a, b = _ckpt(tmp_path / "full" / "last.pt"), _ckpt(tmp_path / "part" / "last.pt")
    assert a["iteration"] == b["iteration"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # a 2-iteration run does differ (the check above can fail)
    c = _ckpt(tmp_path / "full" / "last.pt")["model"]
    assert any(not torch.equal(c[k], v) for k, v in _spec().module.state_dict().items())
    with open(tmp_path / "part" / "train_log.csv", newline="") as f:
        assert [int(r["iter"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    config = json.loads((tmp_path / "part" / "train_config.json").read_text())
    assert config["resumed_from"]["iteration"] == 2
    # a changed budget is refused
    with pytest.raises(UsageError, match="crop"):
        train(_cfg(tmp_path, "part", resume="auto", crop=24), task, _spec())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    _images(tmp_path)
    task = make_task("denoise")
    train(_cfg(tmp_path, "ref", stop_at=2), task, _spec())
    with pytest.raises(TrainingDiverged, match=r"loss became nan at iteration 3; .*last\.pt "
                                               r"\(iteration 2\)"):
        train(_cfg(tmp_path, "bad"), task, _spec(nan_at=3))
    bad, ref = _ckpt(tmp_path / "bad" / "last.pt"), _ckpt(tmp_path / "ref" / "last.pt")
    assert bad["iteration"] == 2
    for k, v in bad["model"].items():
        assert torch.isfinite(v).all() and torch.equal(v, ref["model"][k])
    assert not list((tmp_path / "bad").glob("*.tmp*"))


def test_log_config_and_data_wait(tmp_path):
    _images(tmp_path)
    _images(tmp_path, "V", sizes=((40, 40),), seed=10)
    train(_cfg(tmp_path, "run", val_sets=["V"], val_every=2),
              make_task("denoise"), _spec())
    with open(tmp_path / "run" / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["iter", "loss", "lr", "data_wait_fraction", "step_time",
                             "val_psnr", "elapsed_s", "train_s"]
    assert all(0 <= float(r["data_wait_fraction"]) <= 1 for r in rows)
    assert [r["val_psnr"] != "" for r in rows] == [False, True, False, True]


def test_overlap_with_val_is_refused_or_dropped(tmp_path):
    d = _images(tmp_path)
    (tmp_path / "V").mkdir()
    a = np.asarray(Image.open(d / "im1.png"))
    Image.fromarray(a[:-1, 1:]).save(tmp_path / "V" / "crop.png")  # a cropped copy of im1
    task = make_task("denoise")
    with pytest.raises(UsageError, match=r"T/im1 = V/crop.*--drop-overlap"):
        train(_cfg(tmp_path, "o", val_sets=["V"]), task, _spec())
    s = train(_cfg(tmp_path, "o", val_sets=["V"], drop_overlap=True, iters=1), task, _spec())
    assert any("dropping 1 training image" in w for w in s["warnings"])
    config = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert config["n_train_images"] == 2 and config["dropped_overlap"] == ["T/im1"]
    ids = [r["id"] for r in json.loads((tmp_path / "o" / "train_images.json").read_text())]
    assert ids == ["T/im0", "T/im2"]


def test_small_images_are_skipped_with_a_warning(tmp_path):
    _images(tmp_path, sizes=((48, 56), (20, 64)))
    s = train(_cfg(tmp_path, "s", crop=32, iters=1), make_task("denoise"), _spec())
    assert any("smaller than the 32x32 crop: T/im1" in w for w in s["warnings"])
    with pytest.raises(UsageError, match="no training image"):
        train(_cfg(tmp_path, "s2", crop=64, iters=1), make_task("denoise"), _spec())


def test_cli_divergence_exits_nonzero(tmp_path, monkeypatch, capsys):
    import bench.train.loop
    from bench.cli import main

    def boom(*a, **k):
        raise TrainingDiverged("training stopped: loss became nan at iteration 3; ...")

    monkeypatch.setattr(bench.train.loop, "train", boom)
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "nafnet", "--task", "deblur", "--train-set", "T",
              "--iters", "4", "--out-dir", str(tmp_path / "x")])
    assert e.value.code == 1
    assert "loss became nan" in capsys.readouterr().err


def _shared_data():
    p = Path(os.environ.get("SERPENT_BENCH_DATA") or REPO.parent / "shared" / "data")
    return p if (p / "Set5").is_dir() else None


def _tiny_registered():
    from bench import list_models

    if "serpent_t" in list_models():
        return "serpent_t", ["embed_dim=8", "depths=[1,1]", "dec_depths=[1]", "d_state=4",
                             "num_scales=2"]
    return "nafnet", ["width=8", "enc_blk_nums=[1]", "dec_blk_nums=[1]", "middle_blk_num=1"]


@pytest.mark.skipif(_shared_data() is None, reason="shared image data not found")
def test_cpu_smoke_train_then_eval_on_set5(tmp_path, monkeypatch, capsys):
    from bench.cli import main
    from bench.results import read_rows

    monkeypatch.setenv("SERPENT_BENCH_DATA", str(_shared_data()))
    model, sets = _tiny_registered()
    overrides = [x for s in sets for x in ("--set", s)]
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", model, "--task", "sr", "--scale", "4", "--train-set", "Set5",
              "--iters", "3", "--crop", "32", "--batch", "2", "--out-dir", str(run),
              "--workers", "0", "--no-progress", *overrides])
    assert e.value.code == 0, capsys.readouterr().err
    config = json.loads((run / "train_config.json").read_text())
    assert config["iters"] == 3 and config["crop"] == 32 and config["batch"] == 2
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", model, "--weights", str(run), "--task", "sr", "--scale", "4",
              "--eval-set", "Set5", "--images", "butterfly", "--out", str(tmp_path / "q.jsonl"),
              "--no-progress", "--no-lpips", "--allow-overlap"])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    assert "WARNING: train/eval overlap" in err  # trained and scored on Set5: flagged loudly
    rows = read_rows(tmp_path / "q.jsonl")
    assert {r["model"] for r in rows} == {"input", model}
    mine = [r for r in rows if r["model"] == model]
    assert all(r["kind"] == "quality" and r["train_budget"]["iters"] == 3 for r in mine)
    assert all(r["train_overlap"] == 1 for r in mine)
    from bench.quality.evaluate import file_sha256
    assert mine[0]["weights_sha256"] == file_sha256(run / "last.pt")
    assert all(np.isfinite(r["psnr_y"]) for r in rows)


def test_worker_processes_do_not_change_the_data(tmp_path):
    _images(tmp_path)
    task = make_task("denoise")
    train(_cfg(tmp_path, "w0", iters=2), task, _spec())
    train(_cfg(tmp_path, "w2", iters=2, workers=2), task, _spec())
    a, b = _ckpt(tmp_path / "w0" / "last.pt"), _ckpt(tmp_path / "w2" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
