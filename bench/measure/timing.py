"""Latency measurement that a reviewer can defend.

On CUDA every iteration is bracketed by its own pair of CUDA events (device time of that
iteration, launch gaps included), after a warm-up, with one synchronization per block of calls;
on the CPU by perf_counter_ns. We keep every sample: median, IQR and min are derived from them,
and `bench compare` judges regressions on the samples themselves.

How many calls (`measure`): with `budget_s=0`, exactly `warmup` warm-up calls, then at least
`iters` timed calls and `min_time_s` timed seconds. With a budget (what `bench run` uses), the
counts adapt, in the spirit of torch.utils.benchmark's `blocked_autorange`:
- warm-up: at least `warmup` calls, then more while the last two calls differ by more than
  `STEADY` (10%) -- lazy initialisation, allocator growth, caches, clocks -- for at most a
  quarter of the budget;
- timed: at least `iters` calls and `min_time_s`, then more calls (in blocks) only while the
  distribution-free 95% confidence interval of the median (`median_ci`) is wider than
  +-`rel_ci` (1%) of the median, until the budget (warm-up included) is spent. A call so slow
  that `iters` of them overrun the budget gets at least `MIN_SAMPLES` (5, what `bench
  compare`'s bootstrap needs).
A result whose IQR exceeds 10% of its median is `noisy` (torch.utils.benchmark warns at the same
spread): its median is not a number to compare without a rerun.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import torch

STEADY = 0.10  # warm-up is over when two consecutive calls agree within this fraction
NOISY_IQR = 0.10  # IQR / median above this: the row is flagged noisy
MIN_SAMPLES = 5  # fewest timed calls, whatever the budget (bench compare's bootstrap minimum)


def median_ci(samples: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics x_(j) and
    x_(n+1-j), with j the largest rank such that P(B < j) <= (1 - confidence) / 2 for
    B ~ Binomial(n, 1/2) (exact; at least min..max, which covers 93.8% at n = 5)."""
    s = sorted(samples)
    n = len(s)
    num, den = Fraction((1 - confidence) / 2).limit_denominator(10**6).as_integer_ratio()
    total, comb, below, j = 1 << n, 1, 0, 0  # comb = C(n, i); below = sum of C(n, <i)
    for i in range(n // 2 + 1):
        if (below + comb) * den > total * num:
            break
        below += comb
        j = i + 1
        comb = comb * (n - i) // (i + 1)
    j = max(j, 1)
    return s[j - 1], s[n - j]


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)
    warmup: int = 0
    warmup_s: float = 0.0  # wall time of the warm-up calls
    timed_s: float = 0.0  # wall time of the timed phase (timed calls plus synchronisation)
    stop: str = "iters"  # why timing stopped: iters | stable | budget | max_iters

    @property
    def iters(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        if len(self.samples_ms) < 4:
            return max(self.samples_ms) - min(self.samples_ms)
        q = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def median_ci_rel(self) -> float:
        """Half-width of the median's 95% confidence interval, relative to the median."""
        return ci_rel(self.samples_ms)

    @property
    def noisy(self) -> bool:
        return self.iqr_ms > NOISY_IQR * self.median_ms

    def as_row(self, batch: int, pixels: int) -> dict:
        med_s = self.median_ms / 1e3
        return {
            "latency_ms_median": self.median_ms, "latency_ms_iqr": self.iqr_ms,
            "latency_ms_min": self.min_ms, "iters": self.iters, "warmup": self.warmup,
            "throughput_img_s": batch / med_s, "throughput_mpix_s": batch * pixels / med_s / 1e6,
            "latency_samples_ms": [round(s, 5) for s in self.samples_ms],
            "latency_median_ci_rel": self.median_ci_rel, "noisy": self.noisy,
            "timing_stop": self.stop,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(fn, device, calls: int, adaptive: bool, limit_s: float) -> tuple[int, float]:
    """(warm-up calls made, their wall time); see the module doc for the rule."""
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < calls or adaptive:
        if len(times) >= calls:
            steady = len(times) >= 2 and abs(times[-1] - times[-2]) <= STEADY * min(times[-2:])
            if steady or time.perf_counter() - t_start >= limit_s:
                break
        t0 = time.perf_counter()
        fn()
        if adaptive:  # each call's own time decides when warm-up is over
            _sync(device)
        times.append(time.perf_counter() - t0)
    _sync(device)
    return len(times), time.perf_counter() - t_start


def _timed_block(fn, device, n: int) -> list[float]:
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def measure(fn: Callable[[], object], *, device: torch.device, warmup: int = 10,
            iters: int = 50, min_time_s: float = 0.0, max_iters: int = 10_000,
            after_warmup: Callable[[], None] | None = None, budget_s: float = 0.0,
            rel_ci: float = 0.01) -> Timing:
    """Time `fn`: `warmup` calls, then at least `iters` samples and `min_time_s` timed seconds;
    with `budget_s` > 0 the counts adapt (module doc).

    `after_warmup` runs between warm-up and the timed calls (peak-memory reset goes there).
    """
    adaptive = budget_s > 0
    t_start = time.perf_counter()
    n_warm, warm_s = _warm_up(fn, device, warmup, adaptive, budget_s / 4)
    if after_warmup is not None:
        after_warmup()
    samples: list[float] = []
    t_timed = time.perf_counter()
    floor = min(iters, MIN_SAMPLES)
    stop = "max_iters"
    while len(samples) < max_iters:
        n = len(samples)
        timed_enough = sum(samples) / 1e3 >= min_time_s
        if not adaptive:
            if n >= iters and timed_enough:
                stop = "iters"
                break
            block = iters - n if n < iters else max(1, n // 2)
        else:
            if n >= max(iters, 1) and timed_enough and ci_rel(samples) <= rel_ci:
                stop = "stable"
                break
            spent = time.perf_counter() - t_start
            if n >= floor and timed_enough and spent >= budget_s:
                stop = "budget"
                break
            left = _calls_left(samples, budget_s - spent)
            if n < floor:  # the fewest samples, whatever the budget
                block = floor - n
            elif n < iters:
                block = min(iters - n, left)
            else:
                block = min(max(1, n // 2), left)
        samples += _timed_block(fn, device, min(block, max_iters - n))
    return Timing(samples, n_warm, warm_s, time.perf_counter() - t_timed, stop)


def ci_rel(samples: list[float]) -> float:
    """Half-width of the median's 95% confidence interval, relative to the median."""
    lo, hi = median_ci(samples)
    med = statistics.median(samples)
    return (hi - lo) / 2 / med if med > 0 else math.inf


def _calls_left(samples: list[float], seconds: float) -> int:
    """How many more calls of the median's duration fit in `seconds` (at least 1)."""
    med_s = statistics.median(samples) / 1e3 if samples else 0.0
    return max(1, int(seconds / med_s)) if med_s > 0 else 1


def measure_with_memory(fn: Callable[[], object], *, device: torch.device, warmup: int = 10,
                        iters: int = 50, min_time_s: float = 0.0, budget_s: float = 0.0,
                        rel_ci: float = 0.01) -> tuple[Timing, dict]:
    """`measure`, plus CUDA peak memory over the timed calls (statistics reset after warm-up,
    so cudnn autotuning workspaces stay out) and the static part allocated before them.
    The memory dict is empty on a CPU."""
    cuda = device.type == "cuda"
    static = {}

    def after_warmup():
        if cuda:
            static["mem_static_mb"] = torch.cuda.memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)

    timing = measure(fn, device=device, warmup=warmup, iters=iters, min_time_s=min_time_s,
                     after_warmup=after_warmup, budget_s=budget_s, rel_ci=rel_ci)
    if not cuda:
        return timing, {}
    return timing, {"mem_peak_alloc_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                    "mem_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
                    **static}
