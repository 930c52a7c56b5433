"""Timing statistics (median, IQR, min) against hand-computed values.

Enough samples that the quartile branch runs (>= 4; even and odd counts), unsorted and skewed so
that a mean for the median, a median for a quartile, or a lost sort gives another number. The
reference quartiles are written out by hand for the "inclusive" method (linear interpolation
between order statistics at position p*(n-1), numpy's default percentile), and cross-checked
with numpy.
"""
import numpy as np
import pytest

from bench.measure.timing import Timing

# 8 samples, sorted: 1 2 3 4 5 6 8 30 (one slow outlier, as real timings have)
EVEN = [5.0, 30.0, 1.0, 4.0, 8.0, 2.0, 6.0, 3.0]
# 9 samples, sorted: 1 2 3 4 5 6 8 30 100
ODD = [100.0, 5.0, 30.0, 1.0, 4.0, 8.0, 2.0, 6.0, 3.0]


@pytest.mark.parametrize("samples, median, q1, q3", [
    # n=8: median = (4+5)/2; Q1 at position 0.25*7 = 1.75 -> 2 + 0.75*(3-2);
    #      Q3 at position 0.75*7 = 5.25 -> 6 + 0.25*(8-6)
    (EVEN, 4.5, 2.75, 6.5),
    # n=9: median = 5th value; Q1 at position 2 -> 3; Q3 at position 6 -> 8
    (ODD, 5.0, 3.0, 8.0),
    # n=4 (smallest count of the quartile branch): sorted 1 2 4 10; Q1 at 0.75 -> 1.75,
    #      Q3 at 2.25 -> 4 + 0.25*6
    ([10.0, 1.0, 4.0, 2.0], 3.0, 1.75, 5.5),
])
def test_median_iqr_min_against_hand_computed_quartiles(samples, median, q1, q3):
    t = Timing(list(samples), warmup=2)
    assert t.median_ms == median
    assert t.iqr_ms == pytest.approx(q3 - q1, abs=1e-12)
    assert t.min_ms == 1.0
    assert t.iters == len(samples)
    np_q1, np_q3 = np.percentile(samples, [25, 75])  # independent implementation
    assert (np_q1, np_q3) == pytest.approx((q1, q3))
    assert t.median_ms != pytest.approx(float(np.mean(samples)))  # skewed: mean would differ


def test_fewer_than_four_samples_iqr_is_the_range():
    assert Timing([3.0, 1.0, 2.5]).iqr_ms == 2.0
    assert Timing([7.0]).iqr_ms == 0.0
    assert Timing([3.0, 1.0, 2.5]).median_ms == 2.5


def test_row_fields_follow_the_statistics():
    t = Timing([s + 0.123456789 for s in EVEN], warmup=3)  # more digits than the row keeps
    row = t.as_row(batch=2, pixels=64 * 64)
    median = 4.623456789
    assert row["latency_ms_median"] == pytest.approx(median, rel=1e-15)
    assert row["latency_ms_min"] == pytest.approx(1.123456789, rel=1e-15)
    assert row["latency_ms_iqr"] == pytest.approx(3.75, rel=1e-12)
    assert row["iters"] == 8 and row["warmup"] == 3
    assert row["throughput_img_s"] == pytest.approx(2 / (median / 1e3), rel=1e-12)
    assert row["throughput_mpix_s"] == pytest.approx(2 * 64 * 64 / (median / 1e3) / 1e6, rel=1e-12)
    # samples rounded to 10 ns (5 decimals of a millisecond)
    assert row["latency_samples_ms"] == [5.12346, 30.12346, 1.12346, 4.12346, 8.12346, 2.12346,
                                         6.12346, 3.12346]
