"""Issue 15 (a user's first hour), in-process parts: adaptive call counts and the noisy flag,
FLOPs counted once per network, phase timings, report input hygiene, aliases, tables, figures,
compare notes, `bench models`, `bench data`, train/eval guards, the package API."""
import itertools
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import bench
from bench.errors import UsageError
from bench.measure import timing
from bench.measure.timing import Timing, measure

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- timing


class FakeClock:
    """Stands in for the `time` module inside bench.measure.timing: calls advance it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def perf_counter_ns(self):
        return int(round(self.now * 1e9))


@pytest.fixture()
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timing, "time", c)
    return c


def calls_taking(clock, durations_ms):
    """A function whose successive calls take these many milliseconds (the last repeats)."""
    it = itertools.chain(durations_ms, itertools.repeat(durations_ms[-1]))
    made = []

    def fn():
        ms = next(it)
        made.append(ms)
        clock.now += ms / 1e3

    return fn, made


def test_median_ci_is_the_exact_binomial_interval():
    """Against a plain reference: the largest j with P(Binomial(n, 1/2) < j) <= 2.5%."""
    for n in (1, 2, 5, 6, 9, 10, 20, 37, 100, 257):
        xs = [float(i) for i in range(1, n + 1)]
        random.Random(n).shuffle(xs)
        j = 0
        while j < n and sum(math.comb(n, i) for i in range(j + 1)) / 2 ** n <= 0.025:
            j += 1
        j = max(j, 1)
        assert timing.median_ci(xs) == (j, n + 1 - j), n
    assert timing.median_ci(list(range(1, 21))) == (6, 15)  # the textbook table entry for n = 20


def test_fixed_counts_without_a_budget(clock):
    fn, made = calls_taking(clock, [50, 40, 10, 30, 10])
    t = measure(fn, device=CPU, warmup=2, iters=3, budget_s=0)
    assert (t.warmup, t.iters, t.stop) == (2, 3, "iters") and len(made) == 5


def test_warm_up_goes_on_until_two_calls_agree(clock):
    """A fresh process's first calls are slow (issue 15: 552 ms then 36 ms on a CPU)."""
    fn, made = calls_taking(clock, [500, 200, 60, 37, 36, 36])
    t = measure(fn, device=CPU, warmup=2, iters=10, budget_s=30)
    assert t.warmup == 5  # 37 and 36 agree within 10%
    assert t.samples_ms == [36] * 10 and t.stop == "stable"
    assert t.warmup_s == pytest.approx(0.833)


def test_stable_calls_stop_at_the_minimum(clock):
    fn, _ = calls_taking(clock, [10, 10])
    t = measure(fn, device=CPU, warmup=2, iters=10, budget_s=30)
    assert t.iters == 10 and t.stop == "stable" and t.median_ci_rel == 0


def test_unstable_calls_go_on_until_the_budget_and_keep_every_sample(clock):
    rng = random.Random(0)
    fn, made = calls_taking(clock, [10.0, 10.0] + [rng.uniform(5, 15) for _ in range(10_000)])
    t = measure(fn, device=CPU, warmup=2, iters=10, budget_s=2.0)
    assert t.stop == "budget" and 2.0 <= clock.now < 2.0 * 1.6
    assert t.iters == len(made) - t.warmup and t.iters > 100  # every timed call is a sample
    assert t.noisy  # IQR ~ 50% of the median


def test_a_stable_estimate_needs_fewer_calls_than_a_noisy_one(clock):
    rng = random.Random(1)
    quiet, _ = calls_taking(clock, [10 * (1 + rng.uniform(-0.003, 0.003)) for _ in range(10_000)])
    t_quiet = measure(quiet, device=CPU, warmup=2, iters=10, budget_s=5.0)
    loud, _ = calls_taking(clock, [10 * (1 + rng.uniform(-0.1, 0.1)) for _ in range(10_000)])
    t_loud = measure(loud, device=CPU, warmup=2, iters=10, budget_s=5.0)
    assert t_quiet.stop == t_loud.stop == "stable"
    assert t_quiet.iters == 10 < t_loud.iters
    assert t_loud.median_ci_rel <= 0.01 < Timing(t_loud.samples_ms[:10]).median_ci_rel


def test_slow_calls_stop_at_the_budget_with_at_least_five(clock):
    """SwinIR at 1024 px (1.5 s a call) must not take 10 + 50 calls (issue 15: ~100 s)."""
    fn, _ = calls_taking(clock, [1500, 1600, 1500, 1700])
    t = measure(fn, device=CPU, warmup=2, iters=10, budget_s=2.0)
    assert t.iters == timing.MIN_SAMPLES == 5 and t.stop == "budget"


def test_noisy_flag_at_ten_percent_iqr():
    assert not Timing([100, 100, 104, 108, 100]).noisy
    row = Timing([100, 100, 112, 120, 100, 95, 130]).as_row(1, 64)
    assert row["noisy"] and row["latency_ms_iqr"] > 10


def test_noisy_rows_are_flagged_in_the_run_table_and_cpu_latency_names_its_timer():
    from bench.report.console import run_table

    base = {"model": "m", "task": "deblur", "scale": 1, "res": 32, "batch": 1, "dtype": "fp32",
            "mode": "infer", "status": "ok", "device_name": "cpu: some CPU",
            "latency_ms_median": 10.0, "latency_ms_iqr": 3.0}
    text = run_table([{**base, "noisy": True}, {**base, "model": "n", "noisy": False}])
    lines = {line.split()[0]: line for line in text.splitlines() if line[:1] in "mn"}
    assert lines["m"].rstrip().endswith("ok, noisy") and lines["n"].rstrip().endswith("ok")
    assert "perf_counter" in text and "CUDA events" not in text


# ----------------------------------------------------------------------------- one config


def test_flops_are_counted_once_per_network_and_resolution(tmp_path):
    """dtype, mode and batch change neither params nor FLOPs (one image, meta tensors)."""
    from bench.measure.config import plan_sweep
    from bench.measure.row import _counted, counted_row

    _counted.cache_clear()
    configs = plan_sweep(models="serpent_t", res="16,32", batch="1,2", dtype="fp32,bf16",
                         mode="both", device="cpu", measure="params,flops")
    assert len(configs) == 16
    rows = [counted_row(c) for c in configs]
    assert _counted.cache_info().misses == 2  # one count per resolution
    by_res = {(c.res, json.dumps(r, sort_keys=True)) for c, r in zip(configs, rows)}
    assert len(by_res) == 2
    rows[0]["flops_by_op_gmacs"]["conv"] = -1  # a caller's edit does not reach the cache
    assert counted_row(configs[0])["flops_by_op_gmacs"]["conv"] > 0


def test_row_records_where_its_seconds_went():
    from bench.measure.config import plan_sweep
    from bench.measure.row import measure_config

    cfg = plan_sweep(models="nafnet_w32", res="16", device="cpu", warmup=1, iters=2, budget=0)[0]
    row = measure_config(cfg)
    assert row["status"] == "ok", row["message"]
    assert set(row["phase_s"]) == {"flops", "device_init", "build", "warmup", "timed"}
    assert all(v >= 0 for v in row["phase_s"].values())
    given = {"params": 7, "gflops": 1.0, "flops_s": 0.25}  # what a sweep's parent counted
    row = measure_config(cfg, given)
    assert row["params"] == 7 and row["gflops"] == 1.0 and row["phase_s"]["flops"] == 0.25


def test_plan_sweep_timing_defaults_and_limits():
    from bench.measure.config import TIMING_DEFAULTS, plan_sweep

    cfg = plan_sweep(models="serpent_t", res="32", device="cpu")[0]
    cpu = TIMING_DEFAULTS["cpu"]
    assert (cfg.warmup, cfg.iters, cfg.budget) == (cpu.warmup, cpu.iters, cpu.budget)
    assert cpu.iters >= timing.MIN_SAMPLES and cpu.warmup >= 2 and cpu.budget > 0
    with pytest.raises(UsageError, match="--iters must be >= 1"):
        plan_sweep(models="serpent_t", res="32", device="cpu", iters=0)
    with pytest.raises(UsageError, match="--budget must be >= 0"):
        plan_sweep(models="serpent_t", res="32", device="cpu", budget=-1)


# ----------------------------------------------------------------------------- report input


def _eff(model, res, **kw):
    return {"kind": "efficiency", "model": model, "task": "deblur", "scale": 1, "res": res,
            "batch": 1, "dtype": "fp32", "mode": "infer", "status": "ok", "gflops": 1.0 * res,
            "params": 1000, "device_name": "GPU X", "time": f"2026-01-01T00:00:{res % 60:02d}",
            **kw}


def test_report_warns_with_line_numbers_and_ignores_foreign_rows(tmp_path):
    from bench.report.data import load_rows

    p = tmp_path / "r.jsonl"
    lines = [json.dumps(_eff("serpent_s", 64)), "garbage", json.dumps({"foo": 1}),
             json.dumps(_eff("swinir", 64)), json.dumps([1, 2]), '{"model": "serpent_s", "re']
    p.write_text("\n".join(lines))
    with pytest.warns(UserWarning) as caught:
        df = load_rows([str(p)])
    text = " ".join(str(w.message) for w in caught)
    assert "lines 2, 5, 6" in text and "not bench rows (line 3)" in text
    assert sorted(df["model"]) == ["serpent_s", "swinir"]


def test_report_cli_prints_the_warning(tmp_path):
    from bench.cli import cli

    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(_eff("serpent_s", 64)) + "\n" + json.dumps({"foo": 1}) + "\n")
    result = CliRunner().invoke(cli, ["report", str(p), "--out", str(tmp_path / "rep"),
                                      "--formats", "png", "--dpi", "50"])
    assert result.exit_code == 0, result.output
    assert "not bench rows (line 2)" in result.output
    assert "unknown device" not in (tmp_path / "rep" / "README.md").read_text()


def test_an_alias_is_one_series_with_its_network():
    import pandas as pd

    from bench.report.data import efficiency_rows, label_of, resolve_reference

    df = pd.DataFrame([_eff("serpent", 64), _eff("serpent_s", 128), _eff("nafnet", 64),
                       _eff("swinir", 64)])
    eff, _ = efficiency_rows(df)
    assert sorted(set(eff["label"])) == ["nafnet_w64", "serpent_s", "swinir"]
    assert label_of("serpent", {"x": 1}) == "serpent_s [x=1]" and label_of("input", None) == "input"
    assert resolve_reference("serpent", {"serpent_s", "swinir"}) == "serpent_s"


def test_throughput_axis_ends_at_the_data(tmp_path):
    """An OOM at 1024 px has no throughput: the axis must not run on to 1024."""
    import pandas as pd

    from bench.report import figures

    rows = pd.DataFrame([_eff("a", 256, throughput_img_s=100.0), _eff("a", 512, throughput_img_s=25.0),
                         _eff("a", 1024, status="oom", throughput_img_s=None)])
    rows["label"] = rows["model"]
    limits = []

    class Canvas(figures.Canvas):
        def save(self, fig, figure):
            limits.append(fig.axes[0].get_xlim())
            return super().save(fig, figure)

    figures.throughput_vs_res(Canvas(tmp_path, ("png",), 50), rows, order=["a"],
                              styles=figures.model_styles(["a"]), reference=None, name="t",
                              title=("infer", "GPU X"))
    lo, hi = limits[0]
    assert lo <= 256 and 512 <= hi < 1024


def test_cpu_latency_tables_name_perf_counter():
    import pandas as pd

    from bench.report.tables import METRICS, efficiency_table

    rows = pd.DataFrame([_eff("a", 32, latency_ms_median=5.0, device_name="cpu: EPYC")])
    rows["label"] = rows["model"]
    cpu = efficiency_table(rows, METRICS["latency"], order=["a"], reference=None, name="t", title="t")
    assert any("perf_counter" in n for n in cpu.footnotes)
    assert not any("CUDA events" in n for n in cpu.footnotes)
    rows["device_name"] = "NVIDIA H200"
    gpu = efficiency_table(rows, METRICS["latency"], order=["a"], reference=None, name="t", title="t")
    assert any("CUDA events" in n for n in gpu.footnotes)


def test_compare_notes_are_never_cut_mid_word():
    from bench.compare.render import table
    from bench.compare.verdict import ConfigResult
    from bench.results import config_key

    words = [f"word{i}" for i in range(60)]
    cfg = ConfigResult(config_key(_eff("m", 64)), ("GPU X", "2.11", "13.0"), "missing", True,
                       "ok", None, note=" ".join(words))
    _, rows = table([cfg])
    assert rows[0][-1].split() == words  # wrapped at spaces, nothing dropped
    assert max(len(line) for line in rows[0][-1].splitlines()) <= 60
    _, md = table([cfg], note_width=None)
    assert md[0][-1] == " ".join(words)


# ----------------------------------------------------------------------------- commands


def test_models_reference_column_is_short():
    from bench.cli import cli

    result = CliRunner().invoke(cli, ["models", "serpent*"])
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()[2:]
    assert rows and max(len(line) for line in result.output.splitlines()) < 160
    assert all("Sepehri et al., arXiv 2403.17902" in line for line in rows)


def _png(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_data_lists_the_sets_with_counts_and_sizes(tmp_path, monkeypatch):
    from bench.cli import cli

    _png(tmp_path / "A" / "a1.png", 40, 30)
    _png(tmp_path / "A" / "a2.png", 40, 30)
    _png(tmp_path / "B" / "b1.png", 16, 24)
    (tmp_path / "B" / "notes.txt").write_text("not an image")
    monkeypatch.setenv("SERPENT_BENCH_DATA", str(tmp_path))
    result = CliRunner().invoke(cli, ["data"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.output.splitlines() if line[:1] in "AB"}
    assert lines["A"][1:3] == ["2", "40x30"] and lines["B"][1:3] == ["1", "16x24"]


def test_data_without_a_root_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from bench.cli import main

    monkeypatch.delenv("SERPENT_BENCH_DATA", raising=False)
    for args, needle in ((["data"], "no data root: pass --data-root DIR or set SERPENT_BENCH_DATA"),
                         (["data", "--data-root", str(tmp_path / "nope")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err


def test_train_help_and_default_workers(monkeypatch):
    from bench.cli import cli
    from bench.cli.train import default_workers

    text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "5% of --iters" in text and "5%%" not in text
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 1


def test_run_dir_guard(tmp_path):
    from bench.train.checkpoint import check_run_dir, clear_run_dir

    check_run_dir(tmp_path / "new", resume=None, overwrite=False)  # nothing there: fine
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.md").write_text("mine")
    check_run_dir(run, resume=None, overwrite=False)  # a folder without a run: fine
    (run / "last.pt").write_bytes(b"x")
    (run / "best.pt").write_bytes(b"x")
    with pytest.raises(UsageError, match="already holds a training run.*--resume.*--overwrite"):
        check_run_dir(run, resume=None, overwrite=False)
    check_run_dir(run, resume="auto", overwrite=False)
    check_run_dir(run, resume=None, overwrite=True)
    assert clear_run_dir(run) == ["last.pt", "best.pt"] and (run / "notes.md").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        check_run_dir(tmp_path / "f", resume=None, overwrite=False)


def test_eval_accepts_the_checkpoint_of_an_alias_network(tmp_path):
    """README: `serpent` is `serpent_s`, so serpent_s weights load as `serpent` (and back)."""
    from bench.quality.evaluate import load_eval_model
    from bench.quality.tasks import make_task
    from bench.train.checkpoint import CKPT_FORMAT, TRAIN_CONFIG, save_checkpoint

    task = make_task("denoise")
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(3)
    trained = bench.create_model("serpent_s", task="denoise")
    config = {"model": "serpent_s", "task": "denoise", "scale": 1, "model_overrides": {}}
    save_checkpoint({"format": CKPT_FORMAT, "model": trained.state_dict(), "config": config},
                    run / "last.pt")
    (run / TRAIN_CONFIG).write_text(json.dumps(config))
    loaded = load_eval_model("serpent", task, str(run))
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v), k
    with pytest.raises(UsageError, match="were trained for"):
        load_eval_model("serpent_t", task, str(run))


def test_load_results_at_package_level(tmp_path):
    from bench.results import append_rows

    p = tmp_path / "r.jsonl"
    append_rows(p, [_eff("serpent_s", 64)])
    df = bench.load_results(p)
    assert list(df["model"]) == ["serpent_s"] and "load_results" in bench.__all__
