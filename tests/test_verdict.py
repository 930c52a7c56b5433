"""Compare verdicts at and around the minimum effect, with intervals one can reason about.

Constructed samples make the bootstrap interval known without running it in one's head: a
constant baseline (every resampled median is the same number), and a current run of only two
values, 11 copies of `low` and 10 of `high` (n = 21, odd): the median of any resample is then
exactly `low` or `high`, each with probability far above 2.5%, so the 95% percentile interval
of the ratio is exactly [low / base, high / base]. The interval then lies inside the minimum
effect, straddles it, or lies beyond it, in either direction.
"""
import pytest

from bench.compare.verdict import compare_config, compare_metric, load_rules

BASE_MS = 10.0


def two_valued(low, high):
    return [low] * 11 + [high] * 10


def rows(cur_samples, base_samples=None):
    base_samples = base_samples or [BASE_MS] * 21
    def row(s):
        return {"model": "m", "status": "ok", "latency_samples_ms": s,
                "latency_ms_median": sorted(s)[len(s) // 2],
                "throughput_img_s": 1e3 / sorted(s)[len(s) // 2]}
    return row(base_samples), row(cur_samples)


def judge(metric, cur_samples, min_effect=None, base_samples=None):
    rules = load_rules()
    rule = dict(rules["metrics"][metric])
    if min_effect is not None:
        rule["min_effect"] = min_effect
    base, cur = rows(cur_samples, base_samples)
    return compare_metric(metric, rule, base, cur, rules["bootstrap"])


# (current samples, CI of the latency change, latency status, throughput status)
CASES = {
    "inside": (two_valued(9.8, 10.3), (-0.02, 0.03), "ok", "ok"),
    "straddles slower": (two_valued(10.3, 10.7), (0.03, 0.07), "ok", "ok"),
    "beyond slower": (two_valued(10.6, 10.9), (0.06, 0.09), "regression", "regression"),
    "straddles faster": (two_valued(9.3, 9.7), (-0.07, -0.03), "ok", "ok"),
    "beyond faster": (two_valued(9.1, 9.4), (-0.09, -0.06), "improvement", "improvement"),
}


@pytest.mark.parametrize("case", CASES)
def test_latency_interval_inside_straddling_and_beyond_the_minimum_effect(case):
    cur, (lo, hi), status, _ = CASES[case]
    m = judge("latency_ms_median", cur)
    assert m.method == "bootstrap" and m.threshold == 0.05
    assert m.ci == pytest.approx((lo, hi))  # the interval the construction promises
    assert m.status == status
    assert m.fail is (status == "regression")  # an improvement of latency never fails


@pytest.mark.parametrize("case", CASES)
def test_throughput_is_judged_in_the_opposite_direction(case):
    """Throughput (higher is better) from the reciprocal samples: slower latency = lower
    throughput; its interval is [base/high - 1, base/low - 1]."""
    cur, _, _, status = CASES[case]
    low, high = cur[0], cur[-1]
    m = judge("throughput_img_s", cur)
    assert m.ci == pytest.approx((BASE_MS / high - 1, BASE_MS / low - 1))
    assert m.status == status
    assert m.fail is (status == "regression")


# Exactly at the minimum effect: 1/16 is exact in binary, so 10 * (1 +- 1/16) is too and the
# interval ends sit exactly on the threshold. "Beyond" is strict: the end on it does not count.
AT = 0.0625


@pytest.mark.parametrize("cur, status", [
    ([BASE_MS * (1 + AT)] * 21, "ok"),                   # [+t, +t]: on the threshold
    ([BASE_MS * (1 + AT) + 0.01] * 21, "regression"),    # just beyond
    ([BASE_MS * (1 + AT) - 0.01] * 21, "ok"),            # just inside
    ([BASE_MS * (1 - AT)] * 21, "ok"),                   # [-t, -t]
    ([BASE_MS * (1 - AT) - 0.01] * 21, "improvement"),
    ([BASE_MS * (1 - AT) + 0.01] * 21, "ok"),
    (two_valued(BASE_MS * (1 + AT), 11.5), "ok"),          # [+t, +15%]: lower end on it
    (two_valued(BASE_MS * (1 + AT) + 0.01, 11.5), "regression"),
    (two_valued(8.5, BASE_MS * (1 - AT)), "ok"),           # [-15%, -t]: upper end on it
    (two_valued(8.5, BASE_MS * (1 - AT) - 0.01), "improvement"),
])
def test_latency_at_and_around_the_minimum_effect(cur, status):
    m = judge("latency_ms_median", cur, min_effect=AT)
    assert m.method == "bootstrap" and m.status == status, m.ci


@pytest.mark.parametrize("latency, status", [
    (BASE_MS / (1 - AT), "ok"),          # throughput exactly -t
    (BASE_MS / (1 - AT) + 0.01, "regression"),
    (BASE_MS / (1 + AT), "ok"),          # throughput exactly +t
    (BASE_MS / (1 + AT) - 0.01, "improvement"),
])
def test_throughput_at_and_around_the_minimum_effect(latency, status):
    # base 10 ms = 100 img/s; 1/(1 -+ t) latency factors put the throughput change on -+t
    # (the reciprocals round: an ulp either side of t, so t + 1e-12 stands for "on t"; the
    # strictness itself is checked exactly on latency above)
    m = judge("throughput_img_s", [latency] * 21, min_effect=AT + 1e-12)
    assert m.status == status, m.ci


def test_median_rule_without_samples_uses_the_same_strict_threshold():
    """Too few samples on one side: the point change is judged against the minimum effect."""
    rules = load_rules()
    base = {"latency_samples_ms": [10.0] * 4, "latency_ms_median": 10.0, "throughput_img_s": 100.0}
    for median, status in ((10.0 * (1 + AT), "ok"), (10.0 * (1 + AT) + 0.01, "regression"),
                           (10.0 * (1 - AT), "ok"), (10.0 * (1 - AT) - 0.01, "improvement")):
        cur = {"latency_samples_ms": [median] * 30, "latency_ms_median": median}
        rule = {**rules["metrics"]["latency_ms_median"], "min_effect": AT}
        m = compare_metric("latency_ms_median", rule, base, cur, rules["bootstrap"])
        assert (m.method, m.status) == ("median", status)


def test_minimum_sample_count_boundary():
    """min_samples (5) valid samples on both sides: bootstrap; one fewer: medians only."""
    rules = load_rules()
    rule = rules["metrics"]["latency_ms_median"]
    base = {"latency_samples_ms": [10.0] * 5, "latency_ms_median": 10.0}
    for n, method in ((5, "bootstrap"), (4, "median")):
        cur = {"latency_samples_ms": [10.2] * n, "latency_ms_median": 10.2}
        assert compare_metric("latency_ms_median", rule, base, cur, rules["bootstrap"]).method \
            == method
    bad = {"latency_samples_ms": [10.2] * 4 + [0.0], "latency_ms_median": 10.2}  # a 0 ms sample
    assert compare_metric("latency_ms_median", rule, base, bad, rules["bootstrap"]).method \
        == "median"


@pytest.mark.parametrize("case, status, fail", [
    ("straddles slower", "ok", False), ("beyond slower", "regression", True),
    ("straddles faster", "ok", False), ("beyond faster", "improvement", False),
])
def test_config_verdict_follows_the_latency_interval(case, status, fail):
    """The config's status and pass/fail as `bench compare` reports them."""
    base, cur = rows(CASES[case][0])
    result = compare_config(("m",), ("cpu", "2", None), base, cur, load_rules())
    assert (result.status, result.fail) == (status, fail)


# --------------------------------------------------------------------------- the other rules

def _metric(metric, rule, base, cur, **boot):
    rules = load_rules()
    return compare_metric(metric, {**rules["metrics"].get(metric, {}), **rule}, base, cur,
                          {**rules["bootstrap"], **boot})


@pytest.mark.parametrize("cur, status", [(17.0, "ok"), (17.01, "improvement"), (15.0, "ok"),
                                         (14.99, "regression")])
def test_higher_is_better_point_change_exactly_at_the_threshold(cur, status):
    """Throughput without samples: 16 -> 17 img/s is exactly +1/16; beyond is strict."""
    m = _metric("throughput_img_s", {"min_effect": AT}, {"throughput_img_s": 16.0},
                {"throughput_img_s": cur})
    assert (m.method, m.status) == ("median", status)


def test_relative_change_from_a_zero_or_unit_baseline():
    rule = {"rule": "relative", "tolerance": 0.02, "better": "lower", "fail_on_improvement": False}
    for base, cur, change, status in ((0.0, 0.0, 0.0, "ok"), (0.0, 5.0, float("inf"), "regression"),
                                      (0.0, -5.0, float("-inf"), "improvement"),
                                      (1.0, 2.0, 1.0, "regression")):
        m = _metric("mem", rule, {"mem": base}, {"mem": cur})
        assert (m.change, m.status, m.method) == (change, status, "relative")


def test_exact_rule_notes_and_threshold():
    same = _metric("params", {}, {"params": 10}, {"params": 10})
    assert (same.status, same.fail, same.note, same.threshold, same.ci) == ("ok", False, "", 0.0,
                                                                             None)
    fewer = _metric("params", {}, {"params": 10}, {"params": 9})
    assert (fewer.status, fewer.fail) == ("improvement", True)
    assert fewer.note == "changed: update the baseline if intended"


def test_improvement_note_follows_the_median_note():
    m = _metric("latency_ms_median", {"fail_on_improvement": True},
                {"latency_ms_median": 10.0}, {"latency_ms_median": 5.0})
    assert (m.status, m.fail) == ("improvement", True)
    assert m.note == ("no latency_samples_ms (or fewer than 5 valid) on one side: compared the "
                      "medians only, with the minimum effect; changed: update the baseline if "
                      "intended")


@pytest.mark.parametrize("base, cur, side", [({}, {"params": 1}, "baseline"),
                                             ({"params": 1}, {}, "current")])
def test_metric_on_one_side_only(base, cur, side):
    m = _metric("params", {}, base, cur)
    assert (m.status, m.fail, m.method, m.note) == ("not_compared", False, "exact",
                                                     f"missing in {side}")


def test_bootstrap_settings_reach_the_bootstrap():
    import numpy as np

    from bench.compare.verdict import bootstrap_ratio

    rng = np.random.default_rng(5)
    b, c = list(rng.gamma(20, 0.5, 30)), list(rng.gamma(20, 0.52, 30))
    boot = {"resamples": 300, "confidence": 0.8, "seed": 7}
    m = _metric("latency_ms_median", {}, {"latency_samples_ms": b, "latency_ms_median": 1.0},
                {"latency_samples_ms": c, "latency_ms_median": 2.0}, **boot)
    ratio, (lo, hi) = bootstrap_ratio(b, c, **boot)
    assert m.ci == (lo - 1, hi - 1) and m.change == ratio - 1
    assert (m.baseline, m.current) == (1.0, 2.0)


def _cfg(base, cur):
    return compare_config(("m",), ("cpu", "2", None), base, cur, load_rules())


def test_config_status_changes_and_their_notes():
    long = "E" * 300
    assert (_cfg({}, {}).status, _cfg({}, {}).note) == ("ok", "")  # no status = ok
    r = _cfg({}, {})
    assert (r.baseline_status, r.current_status) == ("ok", "ok")
    r = _cfg({"status": "ok"}, {"status": "error", "message": long})
    assert (r.status, r.fail) == ("regression", True)
    assert r.note == "newly failing: ok -> error: " + "E" * 200
    assert (r.baseline_status, r.current_status) == ("ok", "error")
    r = _cfg({}, {"status": "error"})  # no message: no trailing colon
    assert r.note == "newly failing: ok -> error"
    r = _cfg({"status": "error"}, {"status": "ok", "message": "warm"})
    assert (r.status, r.fail, r.note) == ("improvement", False, "now ok: error -> ok")
    r = _cfg({"status": "oom"}, {"status": "skipped", "message": "too small"})
    assert (r.status, r.fail, r.note) == ("ok", False, "status changed: oom -> skipped: too small")
    r = _cfg({"status": "oom"}, {"status": "error", "message": "boom"})
    assert (r.status, r.fail, r.note) == ("regression", True, "now an error: oom -> error: boom")
    r = _cfg({"status": "oom"}, {"status": "oom", "message": "again"})
    assert (r.status, r.fail, r.note) == ("ok", False, "")


def _one_draw_bootstrap(base, cur, resamples, confidence, seed):
    """The same percentile bootstrap without chunks: one (resamples, n) draw per side, base
    first, from one generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    meds = [np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
            for x in (np.asarray(base, float), np.asarray(cur, float))]
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(meds[1] / meds[0], [alpha, 1 - alpha])
    return float(np.median(cur) / np.median(base)), (float(lo), float(hi))


@pytest.mark.parametrize("kw, max_elems", [({}, None), ({"resamples": 500, "confidence": 0.9,
                                                        "seed": 4}, 100)])
def test_bootstrap_in_chunks_equals_one_draw(kw, max_elems):
    """Chunking (for memory) changes nothing: same generator stream, same interval; and the
    defaults are 2000 resamples, 95%, seed 0."""
    import numpy as np

    from bench.compare.verdict import bootstrap_ratio

    rng = np.random.default_rng(9)
    base, cur = rng.gamma(20, 0.5, 23), rng.gamma(20, 0.55, 31)
    got = bootstrap_ratio(base, cur, **kw, **({"max_elems": max_elems} if max_elems else {}))
    ref = _one_draw_bootstrap(base, cur, kw.get("resamples", 2000), kw.get("confidence", 0.95),
                              kw.get("seed", 0))
    assert got == ref


def test_result_fields_of_each_rule():
    rel = _metric("mem", {"rule": "relative", "tolerance": 0.02, "better": "lower",
                          "fail_on_improvement": False}, {"mem": 100.0}, {"mem": 101.0})
    assert (rel.method, rel.baseline, rel.current, rel.threshold, rel.note, rel.status) == (
        "relative", 100.0, 101.0, 0.02, "", "ok")
    med = _metric("latency_ms_median", {}, {"latency_ms_median": 10.0},
                  {"latency_ms_median": 12.0})
    assert (med.method, med.baseline, med.current, med.threshold, med.status) == (
        "median", 10.0, 12.0, 0.05, "regression")
    exact = _metric("params", {}, {"params": 8}, {"params": 9})
    assert (exact.method, exact.baseline, exact.current, exact.change) == ("exact", 8, 9, 0.125)
    one_sided = _metric("params", {}, {"params": 10}, {})
    assert (one_sided.baseline, one_sided.current) == (10, None)
    one_sided = _metric("params", {}, {}, {"params": 12})
    assert (one_sided.baseline, one_sided.current) == (None, 12)
    exact_higher = {"rule": "exact", "better": "higher", "fail_on_improvement": True}
    higher = _metric("score", exact_higher, {"score": 3}, {"score": 4})
    assert (higher.status, higher.fail) == ("improvement", True)  # exact: any change fails
    assert _metric("score", exact_higher, {"score": 3}, {"score": 2}).status == "regression"


def test_non_finite_numbers_are_missing_values():
    m = _metric("params", {}, {"params": float("nan")}, {"params": 10})
    assert (m.status, m.note) == ("not_compared", "missing in baseline")
    m = _metric("params", {}, {"params": 10}, {"params": float("inf")})
    assert (m.status, m.note) == ("not_compared", "missing in current")


def test_sub_millisecond_samples_are_valid():
    """GPU latencies below 1 ms are samples like any other (only 0 or negative ones are not)."""
    m = _metric("latency_ms_median", {}, {"latency_samples_ms": [0.5] * 21},
                {"latency_samples_ms": two_valued(0.53, 0.545)})
    assert m.method == "bootstrap" and m.ci == pytest.approx((0.06, 0.09))
    assert m.status == "regression"
