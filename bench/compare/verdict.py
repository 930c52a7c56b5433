"""Regression verdict between two efficiency results files: a committed baseline and a new run.

Why the rules differ per metric: parameters and FLOPs are deterministic, so any change is an
architecture change; peak memory is nearly deterministic (allocator rounding, cudnn workspace
choice), so a small relative tolerance; latency is noisy, so it is judged on the repeated samples
every row stores: a bootstrap confidence interval of the ratio of medians (current / baseline)
must lie entirely beyond a minimum effect size before it counts. That keeps CI quiet on noise
and loud on real slowdowns.

Rows are compared only within one environment key (device, torch, CUDA): timings from different
cards or software stacks are never compared. Rows that measured only params/FLOPs (meta tensors,
no device involved) share one device-independent key, so the CPU gate works on any CI machine.
Only numpy is imported here; rendering lives in bench.compare.render.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.errors import UsageError
from bench.files import atomic_write, slug
from bench.results import json_safe, config_dict, config_key, read_rows

# Device label of rows that measured only params/flops: their numbers do not depend on the device.
DEVICE_INDEPENDENT = "params/flops only (device-independent)"
_DEVICE_FREE_MEASURES = {"params", "flops"}
ENV_FIELDS = ("device_name", "torch", "cuda")

DEFAULT_RULES: dict = {
    "bootstrap": {"confidence": 0.95, "resamples": 2000, "seed": 0, "min_samples": 5},
    "metrics": {
        "params": {"rule": "exact"},
        "gflops": {"rule": "exact"},
        "gmacs": {"rule": "exact"},
        "gflops_torch": {"rule": "exact"},
        "mem_peak_alloc_mb": {"rule": "relative", "tolerance": 0.02},
        "mem_peak_reserved_mb": {"rule": "relative", "tolerance": 0.02},
        "latency_ms_median": {"rule": "bootstrap", "samples": "latency_samples_ms",
                              "min_effect": 0.05},
        "throughput_img_s": {"rule": "bootstrap", "samples": "latency_samples_ms",
                             "transform": "reciprocal", "better": "higher", "min_effect": 0.05},
    },
}
_RULE_KEYS = {
    "exact": {"rule", "better", "fail_on_improvement"},
    "relative": {"rule", "better", "tolerance", "fail_on_improvement"},
    "bootstrap": {"rule", "better", "samples", "transform", "min_effect", "fail_on_improvement"},
}
DEFAULT_TOLERANCE = {"tolerance": 0.02, "min_effect": 0.05}  # for metrics a rules file adds
_BOOTSTRAP_KEYS = {"confidence", "resamples", "seed", "min_samples"}


# ----------------------------------------------------------------------------- rules

def load_rules(path: str | os.PathLike | None = None) -> dict:
    """Default rules, overridden by a JSON file (parsed as data, never executed).

    The file may set any of `bootstrap.*` and `metrics.<column>`; a metric given as null is
    dropped from the comparison; a metric rule replaces the default rule of that metric.
    """
    rules = copy.deepcopy(DEFAULT_RULES)
    if path is None:
        return validate_rules(rules)
    try:
        user = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"rules file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"rules file {path} is not valid JSON: {e}") from None
    if (not isinstance(user, dict) or set(user) - {"bootstrap", "metrics"}
            or not all(isinstance(user.get(k, {}), dict) for k in ("bootstrap", "metrics"))):
        raise UsageError(f"rules file {path}: expected an object with keys 'bootstrap' and/or "
                         "'metrics' (see `bench baseline rules` for the defaults)")
    rules["bootstrap"].update(user.get("bootstrap", {}))
    for metric, rule in user.get("metrics", {}).items():
        if rule is None:
            rules["metrics"].pop(metric, None)
        else:
            rules["metrics"][metric] = rule
    return validate_rules(rules, source=str(path))


def validate_rules(rules: dict, source: str = "default rules") -> dict:
    """Check every key and value, so a typo in a rules file is an error, not a silent default."""
    def bad(msg):
        raise UsageError(f"{source}: {msg}")

    boot = rules["bootstrap"]
    if set(boot) - _BOOTSTRAP_KEYS:
        bad(f"unknown bootstrap key(s) {sorted(set(boot) - _BOOTSTRAP_KEYS)}")
    if not 0.5 <= _num(boot["confidence"], -1) < 1:
        bad("bootstrap.confidence must be in [0.5, 1)")
    for key, low in (("resamples", 100), ("min_samples", 2)):
        if not isinstance(boot[key], int) or boot[key] < low:
            bad(f"bootstrap.{key} must be an integer >= {low}")
    if not isinstance(boot["seed"], int):
        bad("bootstrap.seed must be an integer")
    for metric, rule in rules["metrics"].items():
        if not isinstance(rule, dict) or rule.get("rule") not in _RULE_KEYS:
            bad(f"metric {metric!r}: 'rule' must be one of {sorted(_RULE_KEYS)}")
        extra = set(rule) - _RULE_KEYS[rule["rule"]]
        if extra:
            bad(f"metric {metric!r}: key(s) {sorted(extra)} not valid for rule {rule['rule']!r} "
                f"(valid: {sorted(_RULE_KEYS[rule['rule']])})")
        rule.setdefault("better", "lower")
        rule.setdefault("fail_on_improvement", rule["rule"] == "exact")
        if rule["better"] not in ("lower", "higher"):
            bad(f"metric {metric!r}: 'better' must be 'lower' or 'higher'")
        if not isinstance(rule["fail_on_improvement"], bool):
            bad(f"metric {metric!r}: 'fail_on_improvement' must be true or false")
        key = {"relative": "tolerance", "bootstrap": "min_effect"}.get(rule["rule"])
        if key:
            rule.setdefault(key, DEFAULT_TOLERANCE[key])
            if not 0 <= _num(rule[key], -1) < 10:
                bad(f"metric {metric!r}: {key!r} must be a fraction >= 0 (0.02 = 2%)")
        if rule["rule"] == "bootstrap":
            rule.setdefault("samples", "latency_samples_ms")
            rule.setdefault("transform", "none")
            if rule["transform"] not in ("none", "reciprocal"):
                bad(f"metric {metric!r}: 'transform' must be 'none' or 'reciprocal'")
    return rules


def _num(value, default=None):
    """A finite number (bools and strings are not numbers here), else `default`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return value if math.isfinite(value) else default


# ----------------------------------------------------------------------------- keys

def is_device_independent(row: dict) -> bool:
    measured = row.get("measured")
    return isinstance(measured, list) and bool(measured) and set(measured) <= _DEVICE_FREE_MEASURES


def environment_key(row: dict) -> tuple:
    """(device_name, torch, cuda); params/FLOPs-only rows get one device-free key (torch kept,
    without its local build tag, because FLOP counting goes through torch's op decompositions)."""
    if is_device_independent(row):
        torch_v = str(row.get("torch") or "").split("+")[0] or None
        return (DEVICE_INDEPENDENT, torch_v, None)
    return tuple(row.get(f) for f in ENV_FIELDS)


def env_label(env: tuple) -> str:
    device, torch_v, cuda = env
    return f"{device or '?'} | torch {torch_v or '?'} | CUDA {cuda or 'none'}"


def env_dict(env: tuple) -> dict:
    return dict(zip(ENV_FIELDS, env))


def baseline_filename(env: tuple) -> str:
    """File name of the committed baseline for one environment key, e.g.
    `cpu-flops.jsonl` or `nvidia-h100-80gb-hbm3_torch2.11.0_cuda13.0.jsonl`."""
    device, torch_v, cuda = env
    if device == DEVICE_INDEPENDENT:
        return "cpu-flops.jsonl"
    parts = [slug(device, keep=".") or "unknown-device"]
    if torch_v:
        parts.append("torch" + str(torch_v).split("+")[0])
    if cuda:
        parts.append(f"cuda{cuda}")
    return "_".join(parts) + ".jsonl"


# ----------------------------------------------------------------------------- loading

@dataclass
class RowSet:
    """The efficiency rows of one file, one row per (environment, config): the last one wins."""

    path: str
    rows: dict[tuple, dict[tuple, dict]]  # env key -> config key -> row
    notes: list[str] = field(default_factory=list)

    def count(self, env: tuple) -> int:
        return len(self.rows.get(env, {}))


def load_rowset(path: str | os.PathLike, what: str) -> RowSet:
    path = str(path)
    if not Path(path).is_file():
        raise UsageError(f"{what} file not found: {path}")
    rows = read_rows(path)
    if not rows:
        raise UsageError(f"{what} file {path} has no rows (empty, or no complete JSON line)")
    eff = [r for r in rows if r.get("kind", "efficiency") == "efficiency" and "model" in r]
    if not eff:
        raise UsageError(f"{what} file {path} has no efficiency rows (only quality or foreign rows)")
    notes = []
    if len(eff) < len(rows):
        notes.append(f"{what}: ignored {len(rows) - len(eff)} non-efficiency row(s)")
    grouped: dict[tuple, dict[tuple, dict]] = {}
    for r in eff:
        grouped.setdefault(environment_key(r), {})[config_key(r)] = r
    dupes = len(eff) - sum(len(v) for v in grouped.values())
    if dupes:
        notes.append(f"{what}: {dupes} row(s) superseded by a later row of the same config "
                     "(the last one is used)")
    return RowSet(path, grouped, notes)


# ----------------------------------------------------------------------------- judging

@dataclass
class MetricResult:
    metric: str
    status: str  # ok | regression | improvement | not_compared
    fail: bool
    method: str  # exact | relative | bootstrap | median (bootstrap rule without samples)
    baseline: float | None = None
    current: float | None = None
    change: float | None = None  # current / baseline - 1 (point estimate)
    ci: tuple[float, float] | None = None  # confidence interval of `change` (bootstrap only)
    threshold: float = 0.0  # tolerance or minimum effect, as a fraction
    note: str = ""

    def to_json(self) -> dict:
        d = self.__dict__.copy()
        d["ci"] = list(self.ci) if self.ci else None
        return json_safe(d)


@dataclass
class ConfigResult:
    config: tuple
    env: tuple
    status: str  # ok | regression | improvement | missing | new
    fail: bool
    baseline_status: str | None
    current_status: str | None
    metrics: list[MetricResult] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        return {"config": config_dict(self.config), "environment": env_dict(self.env),
                "status": self.status, "fail": self.fail, "baseline_status": self.baseline_status,
                "current_status": self.current_status, "note": self.note,
                "metrics": {m.metric: m.to_json() for m in self.metrics}}


@dataclass
class Comparison:
    baseline_path: str
    current_path: str
    rules: dict
    configs: list[ConfigResult]
    envs_compared: list[tuple]
    baseline_only: dict[tuple, int]  # environment key -> rows not comparable
    current_only: dict[tuple, int]
    notes: list[str]

    @property
    def passed(self) -> bool:
        return not any(c.fail for c in self.configs)

    def summary(self) -> dict:
        counts = {s: sum(c.status == s for c in self.configs)
                  for s in ("ok", "regression", "improvement", "missing", "new")}
        counts["compared"] = sum(c.status not in ("missing", "new") for c in self.configs)
        counts["failing"] = sum(c.fail for c in self.configs)
        counts["not_comparable_rows"] = {"baseline": sum(self.baseline_only.values()),
                                         "current": sum(self.current_only.values())}
        return counts

    def to_json(self) -> dict:
        def envs(d):
            return [{**env_dict(e), "rows": n} for e, n in d.items()]
        return {"verdict": "pass" if self.passed else "fail", "exit_code": 0 if self.passed else 1,
                "baseline": self.baseline_path, "current": self.current_path,
                "summary": self.summary(), "rules": self.rules,
                "environments": {"compared": [env_dict(e) for e in self.envs_compared],
                                 "baseline_only": envs(self.baseline_only),
                                 "current_only": envs(self.current_only)},
                "notes": self.notes, "configs": [c.to_json() for c in self.configs]}


def bootstrap_ratio(base, cur, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                    max_elems: int = 4_000_000) -> tuple[float, tuple[float, float]]:
    """Ratio of medians median(cur)/median(base) and its percentile bootstrap interval.

    Both sample sets are resampled independently (vectorized; in chunks of at most `max_elems`
    numbers so ten-thousand-sample timings stay within memory). Fixed seed: same input, same
    verdict.
    """
    rng = np.random.default_rng(seed)
    medians = []
    for x in (np.asarray(base, dtype=float), np.asarray(cur, dtype=float)):
        n, out = x.size, np.empty(resamples)
        step = max(1, max_elems // n)
        for start in range(0, resamples, step):
            k = min(step, resamples - start)
            out[start:start + k] = np.median(x[rng.integers(0, n, size=(k, n))], axis=1)
        medians.append(out)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(medians[1] / medians[0], [alpha, 1.0 - alpha])
    return float(np.median(cur) / np.median(base)), (float(lo), float(hi))


def _samples(row: dict, rule: dict, min_samples: int):
    raw = row.get(rule["samples"])
    if not isinstance(raw, list) or len(raw) < min_samples:
        return None
    values = [_num(v) for v in raw]
    if any(v is None or v <= 0 for v in values):
        return None
    arr = np.asarray(values, dtype=float)
    return 1.0 / arr if rule["transform"] == "reciprocal" else arr


def _beyond(rule: dict, lo: float, hi: float, threshold: float) -> tuple[bool, bool]:
    """(worse, better): the whole interval [lo, hi] of the change lies beyond the threshold in
    the bad (or good) direction of this metric."""
    if rule["better"] == "lower":
        return lo > threshold, hi < -threshold
    return hi < -threshold, lo > threshold


def _judged(metric: str, rule: dict, method: str, base, cur, change: float, worse: bool,
            better: bool, *, ci=None, threshold: float = 0.0, note: str = "") -> MetricResult:
    status = "regression" if worse else "improvement" if better else "ok"
    fail = worse or (better and rule["fail_on_improvement"])
    if better and rule["fail_on_improvement"]:
        note = (note + "; " if note else "") + "changed: update the baseline if intended"
    return MetricResult(metric, status, fail, method, base, cur, change, ci, threshold, note)


def _relative_change(base: float, cur: float) -> float:
    if base == 0:
        return 0.0 if cur == 0 else math.copysign(math.inf, cur)
    return cur / base - 1.0


def compare_metric(metric: str, rule: dict, base_row: dict, cur_row: dict,
                   boot: dict) -> MetricResult | None:
    """Judge one metric of one config; None when neither row has it (nothing to say)."""
    base, cur = _num(base_row.get(metric)), _num(cur_row.get(metric))
    if rule["rule"] == "bootstrap":
        bs = _samples(base_row, rule, boot["min_samples"])
        cs = _samples(cur_row, rule, boot["min_samples"])
        if bs is not None and cs is not None:
            ratio, (lo, hi) = bootstrap_ratio(bs, cs, resamples=boot["resamples"],
                                              confidence=boot["confidence"], seed=boot["seed"])
            ci = (lo - 1.0, hi - 1.0)
            return _judged(metric, rule, "bootstrap", base, cur, ratio - 1.0,
                           *_beyond(rule, *ci, rule["min_effect"]), ci=ci,
                           threshold=rule["min_effect"])
    if base is None and cur is None:
        return None
    if base is None or cur is None:
        side = "baseline" if base is None else "current"
        return MetricResult(metric, "not_compared", False, rule["rule"], base, cur,
                            note=f"missing in {side}")
    change = _relative_change(base, cur)
    if rule["rule"] == "exact":
        # Compare the numbers themselves, not a ratio: +1 FLOP in 1e12 must count.
        up, down = cur > base, cur < base
        worse, better = (up, down) if rule["better"] == "lower" else (down, up)
        return _judged(metric, rule, "exact", base, cur, change, worse, better)
    threshold = rule["tolerance"] if rule["rule"] == "relative" else rule["min_effect"]
    note = "" if rule["rule"] == "relative" else (
        f"no {rule['samples']} (or fewer than {boot['min_samples']} valid) on one side: "
        "compared the medians only, with the minimum effect")
    method = "relative" if rule["rule"] == "relative" else "median"
    return _judged(metric, rule, method, base, cur, change,
                   *_beyond(rule, change, change, threshold), threshold=threshold, note=note)


def _status_change(base_status: str, cur_status: str) -> tuple[str, bool, str]:
    """(status, fail, note) from the row statuses alone."""
    if base_status == cur_status:
        return "ok", False, ""
    arrow = f"{base_status} -> {cur_status}"
    if base_status == "ok":
        return "regression", True, f"newly failing: {arrow}"
    if cur_status == "ok":
        return "improvement", False, f"now ok: {arrow}"
    if cur_status == "error":
        return "regression", True, f"now an error: {arrow}"
    return "ok", False, f"status changed: {arrow}"


def compare_config(key: tuple, env: tuple, base_row: dict, cur_row: dict,
                   rules: dict) -> ConfigResult:
    b_status, c_status = base_row.get("status", "ok"), cur_row.get("status", "ok")
    status, fail, note = _status_change(b_status, c_status)
    metrics = [m for name, rule in rules["metrics"].items()
               if (m := compare_metric(name, rule, base_row, cur_row, rules["bootstrap"]))]
    if c_status != "ok" and c_status != b_status:
        message = str(cur_row.get("message") or "")[:200]
        note = f"{note}: {message}" if message else note
    if any(m.status == "regression" for m in metrics):
        status = "regression"
    elif status == "ok" and any(m.status == "improvement" for m in metrics):
        status = "improvement"
    fail = fail or any(m.fail for m in metrics)
    return ConfigResult(key, env, status, fail, b_status, c_status, metrics, note)


def compare_rowsets(base: RowSet, cur: RowSet, rules: dict) -> Comparison:
    common = [e for e in base.rows if e in cur.rows]
    if not common:
        raise UsageError(
            "no comparable rows: the files share no environment key (device, torch, CUDA). "
            f"Baseline {base.path} has: {_env_list(base)}; current {cur.path} has: "
            f"{_env_list(cur)}. Compare runs from the same card and software, or write a new "
            "baseline with `bench baseline update`")
    configs = []
    for env in common:
        b_rows, c_rows = base.rows[env], cur.rows[env]
        for key, b_row in b_rows.items():
            if key in c_rows:
                configs.append(compare_config(key, env, b_row, c_rows[key], rules))
            else:
                configs.append(ConfigResult(key, env, "missing", True, b_row.get("status", "ok"),
                                            None, note="in the baseline, not in the current run"))
        configs += [ConfigResult(key, env, "new", False, None, row.get("status", "ok"),
                                 note="not in the baseline")
                    for key, row in c_rows.items() if key not in b_rows]
    base_only = {e: base.count(e) for e in base.rows if e not in cur.rows}
    cur_only = {e: cur.count(e) for e in cur.rows if e not in base.rows}
    notes = base.notes + cur.notes
    for side, envs in (("baseline", base_only), ("current", cur_only)):
        for env, n in envs.items():
            notes.append(f"not comparable: {n} {side} row(s) of environment [{env_label(env)}] "
                         f"have no counterpart in the other file")
    return Comparison(base.path, cur.path, rules, configs, common, base_only, cur_only, notes)


def _env_list(rs: RowSet) -> str:
    return "; ".join(f"[{env_label(e)}] ({rs.count(e)} rows)" for e in rs.rows)


def compare_files(baseline: str | os.PathLike, current: str | os.PathLike,
                  rules: dict | None = None) -> Comparison:
    """Load both files and compare them; UsageError when they cannot be compared at all."""
    rules = rules if rules is not None else load_rules()
    return compare_rowsets(load_rowset(baseline, "baseline"), load_rowset(current, "current"),
                           rules)


# ----------------------------------------------------------------------------- baselines

def baseline_groups(path: str | os.PathLike) -> tuple[dict[tuple, list[dict]], list[str]]:
    """Rows of a results file grouped by environment key, one (the last) per config, every
    status kept (a baseline `oom` row is what lets compare see `oom -> ok`, and vice versa)."""
    rs = load_rowset(path, "results")
    return {env: list(rows.values()) for env, rows in rs.rows.items()}, rs.notes


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict], *, force: bool = False) -> None:
    """Write rows to `path` via a temporary file and os.replace: readers never see half a file."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to replace it")
    atomic_write(path, "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows))
