"""Training by time (`bench train --time-budget`): the clock counts training only, validation
points fall at fractions of the budget as result rows, the lr is a cosine to zero over the
budget, resume continues the clock, and `--recipe paper` takes each paper's optimizer."""
import json
import math

import pytest
import torch

from bench.errors import UsageError
from bench.quality.tasks import make_task
from bench.results import read_rows
from bench.train.loop import TrainConfig, VAL_METRICS, time_lr_factor, train
from bench.train.recipes import RECIPES
from tests.test_train import _cfg, _images, _spec

BUDGET_S = 1.2


def _budget_cfg(tmp_path, out, **kw):
    return _cfg(tmp_path, out, iters=None, time_budget_s=BUDGET_S, val_points=3, val_sets=["V"],
                ckpt_every=None, warmup=None, lr=1e-3, **kw)


def test_time_lr_factor_is_a_cosine_to_zero():
    assert time_lr_factor(0) == 1.0 and time_lr_factor(1) == pytest.approx(0, abs=1e-12)
    assert time_lr_factor(0.5) == pytest.approx(0.5) and time_lr_factor(2) == pytest.approx(0, abs=1e-12)
    assert time_lr_factor(0.25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_budget_stops_on_training_time_and_validates_at_fractions(tmp_path):
    _images(tmp_path)
    _images(tmp_path, "V", sizes=((32, 40),), seed=5)
    s = train(_budget_cfg(tmp_path, "b"), make_task("denoise"), _spec())
    assert s["finished"] and s["time_budget_s"] == BUDGET_S
    step = s["mean_step_time"]
    assert BUDGET_S <= s["train_s"] < BUDGET_S + 3 * step  # stops at the first step past it
    assert s["val_s"] > 0 and s["ckpt_s"] > 0  # timed apart from training
    rows = read_rows(tmp_path / "b" / "validation.jsonl")
    assert [r["point"] for r in rows] == [1, 2, 3]
    for k, r in enumerate(rows, 1):
        assert r["kind"] == "validation" and r["time_budget_s"] == BUDGET_S
        assert r["train_s"] >= k * BUDGET_S / 3 and r["budget_fraction"] >= k / 3
        assert r["images_seen"] == r["iteration"] * 2
        assert all(isinstance(r[m], float) for m in VAL_METRICS)
        assert r["optimizer"]["recipe"] == "suite" and "cosine to zero" in r["schedule"]
    assert [r["train_s"] for r in rows] == sorted(r["train_s"] for r in rows)
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == s["iteration"] and ckpt["clock"]["points_done"] == 3
    # the lr of the last logged step follows the cosine of the training time before it
    log = (tmp_path / "b" / "train_log.csv").read_text().splitlines()
    assert float(log[-1].split(",")[2]) <= 1e-3 * time_lr_factor(0.9)


def test_budget_resume_continues_the_clock(tmp_path):
    _images(tmp_path)
    _images(tmp_path, "V", sizes=((32, 40),), seed=5)
    part = train(_budget_cfg(tmp_path, "r", stop_at=3), make_task("denoise"), _spec())
    assert not part["finished"] and part["iteration"] == 3
    saved = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["clock"]
    assert saved["train_s"] == pytest.approx(part["train_s"])
    rest = train(_budget_cfg(tmp_path, "r", resume="auto"), make_task("denoise"), _spec())
    assert rest["finished"] and rest["train_s"] >= BUDGET_S
    rows = read_rows(tmp_path / "r" / "validation.jsonl")
    assert [r["point"] for r in rows] == sorted({r["point"] for r in rows})  # none twice
    assert rows[-1]["point"] == 3
    config = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert config["resumed_from"]["iteration"] == 3


def test_paper_recipe_sets_each_papers_optimizer(tmp_path):
    c = TrainConfig(model="nafnet_w32", task="deblur", train_sets=["T"], iters=10, crop=16,
                    batch=2, out_dir=str(tmp_path), recipe="paper", device="cpu").resolved()
    want = RECIPES["nafnet"]
    assert (c.optimizer, c.lr, c.betas, c.weight_decay) == (
        want.optimizer, want.lr, want.betas, want.weight_decay) == ("adamw", 1e-3, (0.9, 0.9), 1e-3)
    swin = TrainConfig(model="swinir", task="deblur", train_sets=["T"], iters=10, crop=16,
                       batch=2, out_dir=str(tmp_path), recipe="paper", device="cpu").resolved()
    assert (swin.optimizer, swin.lr, swin.betas) == ("adam", 2e-4, (0.9, 0.99))
    alias = TrainConfig(model="serpent", task="deblur", train_sets=["T"], iters=10, crop=16,
                        batch=2, out_dir=str(tmp_path), recipe="paper", device="cpu").resolved()
    assert alias.lr == RECIPES["serpent"].lr


@pytest.mark.parametrize("kw, msg", [(dict(iters=None), "give --iters, or --time-budget"),
                                     (dict(time_budget_s=0.0), "--time-budget must be positive"),
                                     (dict(time_budget_s=1.0, val_points=0), "--val-points"),
                                     (dict(recipe="fast"), "--recipe must be")])
def test_budget_usage_errors(tmp_path, kw, msg):
    with pytest.raises(UsageError, match=msg):
        _cfg(tmp_path, "x", **kw).resolved()
