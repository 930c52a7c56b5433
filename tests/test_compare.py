"""`bench compare` / `bench baseline`: the regression gate judges each metric by its rule.

Synthetic rows with known changes; latency samples from a seeded RNG. The bootstrap is checked
against a plain-loop reference implementation.
"""
import json
import random
import statistics
import subprocess
import sys

import numpy as np
import pytest

from bench.cli import main
from bench.compare.verdict import (DEVICE_INDEPENDENT, baseline_filename, bootstrap_ratio, compare_files,
                           environment_key, load_rules)
from bench.errors import UsageError

H100 = {"device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0"}
H200 = {"device_name": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0"}


def samples(median=10.0, n=60, noise=0.03, seed=0):
    """Latency samples (ms) around `median` with multiplicative noise, median set exactly."""
    x = median * (1 + noise * np.random.default_rng(seed).standard_normal(n))
    return list(x - np.median(x) + median)


def row(model="m", res=256, env=H100, **kw):
    lat = kw.pop("latency_samples_ms", samples(seed=hash((model, res)) % 1000))
    r = {"kind": "efficiency", "model": model, "family": "conv", "task": "deblur", "scale": 1,
         "res": res, "batch": 1, "dtype": "fp32", "mode": "infer", "compile": False,
         "channels_last": False, "overrides": {}, "measured": ["params", "flops", "latency", "memory"],
         "params": 1_234_567, "gflops": 123.456789012, "gmacs": 61.728394506, "gflops_torch": 120.5,
         "mem_peak_alloc_mb": 500.0, "mem_peak_reserved_mb": 640.0, "mem_static_mb": 50.0,
         "latency_samples_ms": lat, "latency_ms_median": float(np.median(lat)) if lat else None,
         "throughput_img_s": 1000 / float(np.median(lat)) if lat else None,
         "status": "ok", "message": "", **env}
    r.update(kw)
    return r


def flops_row(model="m", res=256, device="cpu: AMD EPYC", torch_v="2.14.1+cu130", **kw):
    r = row(model, res, env={"device_name": device, "torch": torch_v, "cuda": "13.0"},
            measured=["params", "flops"], latency_samples_ms=None, **kw)
    for k in ("mem_peak_alloc_mb", "mem_peak_reserved_mb", "mem_static_mb"):
        r[k] = None
    return r


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_compare(tmp_path, base_rows, cur_rows, rules=None):
    b = write(tmp_path / "base.jsonl", base_rows)
    c = write(tmp_path / "cur.jsonl", cur_rows)
    return compare_files(b, c, rules)


def metric(cmp, name, model="m", res=256):
    (cfg,) = [c for c in cmp.configs if c.config[0] == model and c.config[3] == res]
    return {m.metric: m for m in cfg.metrics}.get(name)


def cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


BASE = [row("a", 256), row("a", 512), row("b", 256)]


# --------------------------------------------------------------------------- the rules

def test_identical_files_pass(tmp_path):
    cmp = run_compare(tmp_path, BASE, BASE)
    assert cmp.passed
    assert [c.status for c in cmp.configs] == ["ok"] * 3
    statuses = {m.metric: m.status for c in cmp.configs for m in c.metrics}
    assert set(statuses) == {"params", "gflops", "gmacs", "gflops_torch", "mem_peak_alloc_mb",
                             "mem_peak_reserved_mb", "latency_ms_median", "throughput_img_s"}
    assert set(statuses.values()) == {"ok"}
    lat = metric(cmp, "latency_ms_median", "a")
    assert lat.method == "bootstrap" and lat.change == 0 and lat.ci[0] <= 0 <= lat.ci[1]


@pytest.mark.parametrize("field,delta", [("gflops", 1e-9), ("params", 1), ("gflops_torch", 1e-9)])
def test_one_more_flop_or_param_fails(tmp_path, field, delta):
    cur = [dict(r) for r in BASE]
    cur[2][field] += delta  # b@256: +1 FLOP (GFLOPs are in units of 1e9) or +1 parameter
    cmp = run_compare(tmp_path, BASE, cur)
    assert not cmp.passed
    m = metric(cmp, field, "b")
    assert (m.status, m.fail) == ("regression", True)
    assert [c.status for c in cmp.configs] == ["ok", "ok", "regression"]


def test_exact_decrease_is_an_improvement_that_still_fails(tmp_path):
    """An architecture change in either direction must be acknowledged by a baseline update."""
    cur = [dict(r) for r in BASE]
    cur[0]["params"] -= 10
    cmp = run_compare(tmp_path, BASE, cur)
    m = metric(cmp, "params", "a")
    assert (m.status, m.fail) == ("improvement", True)
    assert "update the baseline" in m.note and not cmp.passed
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps({"metrics": {"params": {"rule": "exact",
                                                             "fail_on_improvement": False}}}))
    assert run_compare(tmp_path, BASE, cur, load_rules(rules_file)).passed


@pytest.mark.parametrize("field", ["mem_peak_alloc_mb", "mem_peak_reserved_mb"])
@pytest.mark.parametrize("factor,passes", [(1.01, True), (1.05, False), (0.95, True)])
def test_memory_relative_tolerance(tmp_path, field, factor, passes):
    cur = [dict(r) for r in BASE]
    cur[1][field] *= factor
    cmp = run_compare(tmp_path, BASE, cur)
    assert cmp.passed is passes
    m = metric(cmp, field, "a", 512)
    assert m.change == pytest.approx(factor - 1)
    assert m.status == {1.01: "ok", 1.05: "regression", 0.95: "improvement"}[factor]


def _with_latency(lat):
    return [row("a", 256, latency_samples_ms=lat)]


def test_latency_shift_of_10_percent_fails(tmp_path):
    base = _with_latency(samples(10.0, seed=1))
    cur = _with_latency(samples(11.0, seed=2))  # 10% slower, independent noise
    cmp = run_compare(tmp_path, base, cur)
    assert not cmp.passed
    lat, thr = metric(cmp, "latency_ms_median", "a"), metric(cmp, "throughput_img_s", "a")
    assert lat.status == "regression" and lat.ci[0] > 0.05
    assert lat.ci[0] < 0.10 < lat.ci[1]  # the interval covers the true shift
    assert lat.change == pytest.approx(0.10)
    assert thr.status == "regression" and thr.ci[1] < -0.05
    assert thr.change == pytest.approx(1 / 1.1 - 1, rel=1e-3)  # median of 1/x, n even


def test_latency_equal_median_with_noise_passes(tmp_path):
    base = _with_latency(samples(10.0, noise=0.05, seed=3))
    cur = _with_latency(samples(10.0, noise=0.05, seed=4))  # same median, other noise
    cmp = run_compare(tmp_path, base, cur)
    assert cmp.passed
    lat = metric(cmp, "latency_ms_median", "a")
    assert lat.status == "ok" and lat.ci[0] < 0 < lat.ci[1]


def test_latency_small_real_shift_below_min_effect_passes_and_speedup_is_improvement(tmp_path):
    base = _with_latency(samples(10.0, noise=0.002, seed=5))
    slower = run_compare(tmp_path, base, _with_latency(samples(10.3, noise=0.002, seed=6)))
    assert slower.passed  # 3% slower, measured precisely: below the 5% minimum effect
    assert metric(slower, "latency_ms_median", "a").ci[0] > 0.02
    faster = run_compare(tmp_path, base, _with_latency(samples(9.0, seed=7)))
    assert faster.passed
    assert metric(faster, "latency_ms_median", "a").status == "improvement"
    assert metric(faster, "throughput_img_s", "a").status == "improvement"


def test_latency_without_samples_falls_back_to_medians(tmp_path):
    base = [row("a", 256, latency_samples_ms=None, latency_ms_median=10.0, throughput_img_s=100.0)]
    for median, passes in ((10.3, True), (11.0, False)):
        cur = [row("a", 256, latency_samples_ms=[median] * 3, latency_ms_median=median,
                   throughput_img_s=1000 / median)]  # 3 samples < min_samples: not enough
        cmp = run_compare(tmp_path, base, cur)
        lat = metric(cmp, "latency_ms_median", "a")
        assert lat.method == "median" and "medians only" in lat.note
        assert cmp.passed is passes


def test_bootstrap_matches_a_plain_loop_reference():
    rng = np.random.default_rng(11)
    base, cur = rng.gamma(20, 0.5, 41), rng.gamma(20, 0.55, 57)
    ratio, (lo, hi) = bootstrap_ratio(base, cur, resamples=4000, seed=3, max_elems=1000)
    assert ratio == pytest.approx(statistics.median(cur) / statistics.median(base))
    ref_rng = random.Random(5)
    ref = sorted(statistics.median(ref_rng.choices(list(cur), k=len(cur)))
                 / statistics.median(ref_rng.choices(list(base), k=len(base)))
                 for _ in range(4000))
    assert lo == pytest.approx(ref[int(0.025 * 4000)], rel=0.01)
    assert hi == pytest.approx(ref[int(0.975 * 4000)], rel=0.01)
    assert bootstrap_ratio(base, cur, resamples=4000, seed=3) == (ratio, (lo, hi))  # deterministic


# --------------------------------------------------------------------------- statuses, keys

@pytest.mark.parametrize("before,after,status,passes", [
    ("ok", "oom", "regression", False), ("ok", "error", "regression", False),
    ("oom", "ok", "improvement", True), ("oom", "oom", "ok", True), ("oom", "error", "regression", False),
])
def test_status_changes(tmp_path, before, after, status, passes):
    cur_msg = "CUDA out of memory. Tried to allocate 2 GiB" if after == "oom" else ""
    base = [row("a", 256, status=before), row("b", 256)]
    cur = [row("a", 256, status=after, message=cur_msg, latency_samples_ms=None,
               mem_peak_alloc_mb=None), row("b", 256)]
    cmp = run_compare(tmp_path, base, cur)
    (a,) = [c for c in cmp.configs if c.config[0] == "a"]
    assert (a.status, cmp.passed) == (status, passes)
    if (before, after) == ("ok", "oom"):
        assert "ok -> oom" in a.note and "out of memory" in a.note


def test_missing_config_fails_new_config_is_reported(tmp_path):
    cmp = run_compare(tmp_path, BASE, BASE[:2] + [row("c", 256)])
    by_model = {c.config[0]: c for c in cmp.configs}
    assert (by_model["b"].status, by_model["b"].fail) == ("missing", True)
    assert (by_model["c"].status, by_model["c"].fail) == ("new", False)
    assert not cmp.passed
    assert run_compare(tmp_path, BASE, BASE + [row("c", 256)]).passed


def test_overrides_compile_and_cuda_graph_are_part_of_the_config(tmp_path):
    base = [row("a", 256, overrides={"attn_impl": "sdpa", "depth": 2})]
    same = [row("a", 256, overrides={"depth": 2, "attn_impl": "sdpa"})]  # key order irrelevant
    assert run_compare(tmp_path, base, same).passed
    other = run_compare(tmp_path, base, [row("a", 256, overrides={"attn_impl": "math", "depth": 2})])
    assert sorted(c.status for c in other.configs) == ["missing", "new"]
    compiled = run_compare(tmp_path, base, base + [row("a", 256, compile=True,
                                                       overrides={"attn_impl": "sdpa", "depth": 2})])
    assert sorted(c.status for c in compiled.configs) == ["new", "ok"]
    graphed = run_compare(tmp_path, base, [row("a", 256, cuda_graph=True,
                                               overrides={"attn_impl": "sdpa", "depth": 2})])
    assert sorted(c.status for c in graphed.configs) == ["missing", "new"]


def test_mismatched_environment_keys_are_reported_not_compared(tmp_path):
    base = BASE + [row("a", 256, env=H200)]
    # current: same H100 rows, and an H200 row that would be a huge regression if compared
    cur = BASE + [row("a", 256, env={**H200, "torch": "2.12.0"}, params=1)]
    cmp = run_compare(tmp_path, base, cur)
    assert cmp.passed and len(cmp.configs) == 3
    assert all(c.env == environment_key(BASE[0]) for c in cmp.configs)
    assert list(cmp.baseline_only.values()) == [1] and list(cmp.current_only.values()) == [1]
    assert any("not comparable" in n and "NVIDIA H200" in n for n in cmp.notes)
    verdict = cmp.to_json()["environments"]
    assert verdict["baseline_only"][0]["device_name"] == "NVIDIA H200"
    assert verdict["current_only"][0]["torch"] == "2.12.0"


def test_no_common_environment_is_a_usage_error_naming_both(tmp_path):
    with pytest.raises(UsageError, match="no comparable rows") as e:
        run_compare(tmp_path, BASE, [row("a", 256, env=H200)])
    assert "NVIDIA H100 80GB HBM3" in str(e.value) and "NVIDIA H200" in str(e.value)


def test_cpu_flops_rows_compare_on_any_cpu_and_judge_only_what_they_have(tmp_path):
    base = [flops_row("a", r) for r in (256, 512, 1024)]
    cur = [flops_row("a", r, device="cpu: Intel Xeon", torch_v="2.14.1") for r in (256, 512, 1024)]
    assert environment_key(base[0]) == environment_key(cur[0]) == (DEVICE_INDEPENDENT, "2.14.1", None)
    cmp = run_compare(tmp_path, base, cur)
    assert cmp.passed and len(cmp.configs) == 3
    assert {m.metric for c in cmp.configs for m in c.metrics} == {"params", "gflops", "gmacs",
                                                                 "gflops_torch"}
    cur[1]["gmacs"] += 1e-9
    assert not run_compare(tmp_path, base, cur).passed
    # a timed row is not device-independent: a different CPU is a different environment
    timed = [row("a", 256, env={"device_name": "cpu: Intel Xeon", "torch": "2.14.1", "cuda": None})]
    with pytest.raises(UsageError):
        run_compare(tmp_path, base, timed)


def test_metric_missing_on_one_side_is_not_compared_and_does_not_fail(tmp_path):
    cur = [dict(r) for r in BASE]
    cur[0].update(latency_samples_ms=None, latency_ms_median=None, throughput_img_s=None,
                  mem_peak_reserved_mb=None)
    cmp = run_compare(tmp_path, BASE, cur)
    assert cmp.passed
    for name in ("latency_ms_median", "throughput_img_s", "mem_peak_reserved_mb"):
        m = metric(cmp, name, "a")
        assert (m.status, m.note) == ("not_compared", "missing in current")


def test_duplicate_rows_last_one_wins(tmp_path):
    cur = [row("a", 256, status="error", message="worker died")] + BASE  # then a good retry
    cmp = run_compare(tmp_path, BASE, cur)
    assert cmp.passed and any("superseded" in n for n in cmp.notes)


# --------------------------------------------------------------------------- rules files

def test_rules_file_overrides_and_validation(tmp_path):
    cur = [dict(r) for r in BASE]
    cur[0]["mem_peak_alloc_mb"] *= 1.05
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"metrics": {"mem_peak_alloc_mb": {"rule": "relative",
                                                                   "tolerance": 0.1}}}))
    assert run_compare(tmp_path, BASE, cur, load_rules(rules)).passed
    rules.write_text(json.dumps({"metrics": {"mem_peak_alloc_mb": None}}))
    cmp = run_compare(tmp_path, BASE, cur, load_rules(rules))
    assert cmp.passed and metric(cmp, "mem_peak_alloc_mb", "a") is None
    for bad in ('{"metrics": {"params": {"rule": "exact", "tolerance": 0.1}}}',
                '{"metrics": {"params": {"rule": "fuzzy"}}}', '{"bootstrap": {"confidence": 2}}',
                '{"thresholds": {}}', "__import__('os')", '{"metrics": []}'):
        rules.write_text(bad)
        with pytest.raises(UsageError):
            load_rules(rules)


# --------------------------------------------------------------------------- CLI

def test_cli_exit_codes_json_and_markdown(tmp_path, capsys):
    b = write(tmp_path / "base.jsonl", BASE)
    code, out, _ = cli(["compare", str(b), str(b)], capsys)
    assert code == 0 and "PASS" in out
    cur = [dict(r) for r in BASE]
    cur[2]["gflops"] += 1e-9
    c = write(tmp_path / "cur.jsonl", cur)
    md, js = tmp_path / "out" / "summary.md", tmp_path / "out" / "verdict.json"
    code, out, _ = cli(["compare", str(b), str(c), "--markdown", str(md), "--json", str(js)], capsys)
    assert code == 1 and "FAIL" in out and "REGRESSION" in out
    verdict = json.loads(js.read_text())
    assert (verdict["verdict"], verdict["exit_code"], verdict["summary"]["regression"]) == ("fail", 1, 1)
    (bad,) = [c for c in verdict["configs"] if c["fail"]]
    assert bad["config"]["model"] == "b" and bad["metrics"]["gflops"]["status"] == "regression"
    assert bad["metrics"]["params"]["status"] == "ok"
    assert bad["environment"] == H100
    text = md.read_text()
    assert text.startswith("### :x: bench compare: regression") and "| b " in text


@pytest.mark.parametrize("case", ["missing", "empty", "no-common-env", "bad-rules"])
def test_cli_usage_errors_exit_2(tmp_path, capsys, case):
    b = write(tmp_path / "base.jsonl", BASE)
    args = {"missing": [str(b), str(tmp_path / "nope.jsonl")],
            "empty": [str(b), str(write(tmp_path / "empty.jsonl", []))],
            "no-common-env": [str(b), str(write(tmp_path / "h200.jsonl", [row(env=H200)]))],
            "bad-rules": [str(b), str(b), "--rules", str(tmp_path / "nope.json")]}[case]
    code, _, err = cli(["compare", *args], capsys)
    assert code == 2 and err.startswith("bench: error:") and "Traceback" not in err
    assert {"missing": "not found", "empty": "no rows", "no-common-env": "NVIDIA H200",
            "bad-rules": "rules file not found"}[case] in err


def test_entry_point_exit_code(tmp_path):
    b = write(tmp_path / "base.jsonl", BASE)
    c = write(tmp_path / "cur.jsonl", [dict(BASE[0], params=2)] + BASE[1:])
    proc = subprocess.run([sys.executable, "-m", "bench", "compare", str(b), str(c)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr


def test_baseline_update_keeps_every_status_and_is_atomic(tmp_path, capsys):
    results = write(tmp_path / "run.jsonl", [row("a", 256, status="error", message="x"),
                                             row("a", 256), row("b", 256, status="oom"),
                                             flops_row("a", 256)])
    out_dir = tmp_path / "baselines"
    code, out, _ = cli(["baseline", "update", str(results), "--dir", str(out_dir)], capsys)
    assert code == 0
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["cpu-flops.jsonl", "nvidia-h100-80gb-hbm3_torch2.11.0_cuda13.0.jsonl"]
    gpu = [json.loads(line) for line in (out_dir / names[1]).read_text().splitlines()]
    assert [(r["model"], r["status"]) for r in gpu] == [("a", "ok"), ("b", "oom")]
    assert "superseded" in out
    # it is a valid baseline: the run compared with it passes (the oom row is kept)
    code, _, _ = cli(["compare", str(out_dir / names[1]), str(results)], capsys)
    assert code == 0
    code, _, err = cli(["baseline", "update", str(results), "--dir", str(out_dir)], capsys)
    assert code == 2 and "--force" in err
    code, _, err = cli(["baseline", "update", str(results), "--out", str(tmp_path / "x.jsonl")],
                       capsys)
    assert code == 2 and "environment keys" in err
    single = write(tmp_path / "single.jsonl", [flops_row("z", 512)])
    code, _, _ = cli(["baseline", "update", str(single), "--out", str(out_dir / names[0]),
                      "--force"], capsys)
    assert code == 0 and json.loads((out_dir / names[0]).read_text())["model"] == "z"
    assert sorted(p.name for p in out_dir.iterdir()) == names  # no temporary files left


def test_baseline_filename_and_rules_commands(capsys):
    assert baseline_filename(("NVIDIA H100 80GB HBM3", "2.11.0+cu130", "13.0")) == \
        "nvidia-h100-80gb-hbm3_torch2.11.0_cuda13.0.jsonl"
    assert baseline_filename((DEVICE_INDEPENDENT, "2.14.1", None)) == "cpu-flops.jsonl"
    code, out, _ = cli(["baseline", "rules"], capsys)
    assert code == 0 and json.loads(out)["metrics"]["mem_peak_alloc_mb"]["tolerance"] == 0.02


def test_committed_cpu_baseline_is_a_device_independent_baseline():
    from pathlib import Path

    from bench.compare.verdict import load_rowset

    path = Path(__file__).resolve().parent.parent / "results" / "baselines" / "cpu-flops.jsonl"
    rs = load_rowset(path, "baseline")
    (env,) = rs.rows  # one environment key, and it is the device-independent one
    assert env[0] == DEVICE_INDEPENDENT and not rs.notes  # no duplicates, no foreign rows
    assert baseline_filename(env) == path.name
    assert all(r["gflops"] > 0 and r["params"] > 0 for r in rs.rows[env].values())
