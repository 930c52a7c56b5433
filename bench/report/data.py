"""Rows for `bench report`: load, filter, label, and pick one row per configuration.

Two rules keep the numbers honest:
- card-dependent numbers (latency, throughput, memory) are only ever grouped within one
  `device_name`; nothing here averages rows;
- when a configuration was measured several times on one card, the latest non-error row wins
  (a `--resume` retry supersedes the error it retried), and the report says how many were dropped.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import UsageError
from bench.results import EFFICIENCY_COLUMNS, VARIANT_FLAGS

# Run-wide settings: rows that differ in any of these never share a table.
SETTING_KEYS = ["task", "scale", "batch", "dtype", "mode", *VARIANT_FLAGS]
QUALITY_KEYS = ["task", "scale", "degradation"]
QUALITY_METRICS = ["psnr", "ssim", "psnr_y", "ssim_y", "lpips"]
_EXTRA_COLUMNS = ["device_mem_mb", "overrides", *VARIANT_FLAGS]


@dataclass
class ReportData:
    eff: "object"  # pandas DataFrame: one row per (label, setting, res, card)
    qual: "object"  # pandas DataFrame: one mean row per (label, task, scale, degradation, dataset)
    val: "object"  # pandas DataFrame: validation rows of `bench train` (training curves)
    reference: str | None
    order: list[str]  # every model label, in the fixed style order (see `label_order`)
    raw: "object"  # all rows after --filter (environment summary)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- loading


def load_rows(paths: list[str]):
    """All bench rows of `paths` as one DataFrame; unreadable input is a UsageError.

    Torn or garbage lines, and JSON lines that are not bench rows (no model, or nothing
    measured), are left out with a warning that names their line numbers, as `bench compare`
    does; they never become rows (an "unknown device" in the environment table).
    """
    import pandas as pd

    from bench.results import is_bench_row, scan_rows

    if not paths:
        raise UsageError("no results file given: bench report RESULTS.jsonl ... --out reports/NAME")
    frames = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "not found"
            raise UsageError(f"results file {p} {what}: give JSONL files written by bench run/eval")
        try:
            numbered, bad = scan_rows(path)
        except (OSError, UnicodeError) as e:
            raise UsageError(f"cannot read results file {p}: {e}") from None
        rows = [r for _, r in numbered if is_bench_row(r)]
        foreign = [n for n, r in numbered if not is_bench_row(r)]
        problems = []
        if bad:
            problems.append(f"skipped {len(bad)} unreadable line(s) {_lines(bad)} (torn write?)")
        if foreign:
            problems.append(f"ignored {len(foreign)} line(s) that are not bench rows "
                            f"{_lines(foreign)}")
        if not rows and path.stat().st_size > 0:
            why = f" ({'; '.join(problems)})" if problems else ""
            raise UsageError(f"{p} holds no readable rows{why}: is it a bench results JSONL file?")
        for problem in problems:
            warnings.warn(f"{p}: {problem}", stacklevel=2)
        for r in rows:
            r.setdefault("kind", "efficiency")
            r["source"] = str(p)
        if rows:
            frames.append(pd.DataFrame(rows))
    if not frames:
        raise UsageError(f"no rows in {', '.join(map(str, paths))}")
    return pd.concat(frames, ignore_index=True)


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:8]))
    return f"(line{'s' if len(numbers) > 1 else ''} {shown}{', ...' if len(numbers) > 8 else ''})"


# ----------------------------------------------------------------------------- --filter


def parse_filters(specs) -> dict[str, list[str]]:
    """`key=v1,v2` strings -> {key: [v1, v2]}; repeating a key adds alternatives (OR)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise UsageError(f"--filter expects KEY=VALUE (e.g. dtype=bf16 or model=serpent*), "
                             f"got {spec!r}")
        out.setdefault(key, []).extend(v.strip() for v in value.split(",") if v.strip())
    return out


def matches(value, wanted: list[str]) -> bool:
    """Does a row value match any wanted text? Numbers compare as numbers, booleans as
    true/false/1/0, text as a glob."""
    if hasattr(value, "item") and not isinstance(value, (str, dict, list)):
        value = value.item()  # numpy scalar -> Python
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    for w in wanted:
        if isinstance(value, bool):
            if w.lower() in (("true", "1", "yes") if value else ("false", "0", "no")):
                return True
        elif isinstance(value, (int, float)):
            try:
                if float(w) == float(value):
                    return True
            except ValueError:
                pass
        elif isinstance(value, (dict, list)):
            if json.dumps(value, sort_keys=True) == w or str(value) == w:
                return True
        elif fnmatch.fnmatchcase(str(value), w):
            return True
    return False


def apply_filters(df, filters: dict[str, list[str]]):
    """Keep rows matching every filter. A key filters the kinds of rows that have it: e.g.
    `mode=train` narrows efficiency rows and leaves quality rows (which have no mode) alone."""
    if not filters:
        return df
    unknown = [k for k in filters if k not in df.columns]
    if unknown:
        cols = ", ".join(sorted(c for c in df.columns if c != "source"))
        raise UsageError(f"--filter: no column {', '.join(unknown)} in the rows; columns: {cols}")
    keep = df["kind"].map(lambda _: True)
    for key, wanted in filters.items():
        for kind, part in df.groupby("kind"):
            if part[key].notna().any():
                keep[part.index] &= part[key].map(lambda v: matches(v, wanted))
    out = df[keep].reset_index(drop=True)
    if out.empty:
        shown = " ".join(f"{k}={','.join(v)}" for k, v in filters.items())
        raise UsageError(f"no rows left after --filter {shown}")
    return out


# ----------------------------------------------------------------------------- labels, order


def _overrides(value) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return {}
    return {}


@functools.lru_cache(maxsize=None)
def network_of(model: str) -> str:
    """The registered network an alias names (`serpent` -> `serpent_s`), else `model`: rows of
    an alias and of its network are one series, never two lines over each other."""
    try:
        from bench.registry import network_name
    except ImportError:  # the models cannot be imported here: names as they are
        return model
    return network_name(model)


def label_of(model: str, overrides) -> str:
    """Network name (aliases resolved), plus constructor overrides when there are any:
    `swinir [attn_impl=math]`."""
    model = network_of(str(model))
    ov = _overrides(overrides)
    if not ov:
        return model
    return f"{model} [{', '.join(f'{k}={v}' for k, v in sorted(ov.items()))}]"


def base_model(label: str) -> str:
    return label.split(" [", 1)[0]


def label_order(labels) -> list[str]:
    """Fixed order: model names sorted (the registry's order), each variant with overrides right
    after its base model. Figure styles and table rows follow it."""
    return sorted(set(labels), key=lambda lb: (base_model(lb), lb != base_model(lb), lb))


# ----------------------------------------------------------------------------- normalising


def _fill(df, column, default):
    if column not in df.columns:
        df[column] = default
    else:
        df[column] = df[column].where(df[column].notna(), default)
    return df


def _bool(v) -> bool:
    return bool(v) if not (isinstance(v, float) and math.isnan(v)) else False


def efficiency_rows(df):
    """Efficiency rows with every public column present, one label each, deduplicated."""
    import pandas as pd

    eff = df[df["kind"] == "efficiency"].copy()
    for c in EFFICIENCY_COLUMNS + _EXTRA_COLUMNS + ["time"]:
        if c not in eff.columns:
            eff[c] = None
    eff = eff[eff["model"].notna() & eff["res"].notna()]  # not a measurement of anything
    if eff.empty:
        return eff, 0
    eff = _fill(eff, "scale", 1)
    eff = _fill(eff, "batch", 1)
    eff = _fill(eff, "status", "ok")
    eff = _fill(eff, "device_name", "unknown device")
    eff = _fill(eff, "time", "")
    for flag in VARIANT_FLAGS:
        eff[flag] = eff[flag].map(_bool)
    for c in ("scale", "batch", "res"):
        eff[c] = pd.to_numeric(eff[c]).astype(int)
    # what the activations took: peak minus what was allocated before the timed calls
    eff["mem_activation_mb"] = (pd.to_numeric(eff["mem_peak_alloc_mb"], errors="coerce")
                                - pd.to_numeric(eff["mem_static_mb"], errors="coerce"))
    eff["label"] = [label_of(m, o) for m, o in zip(eff["model"], eff["overrides"])]
    # latest row per configuration and card; an error never beats a result
    eff["_rank"] = (eff["status"] != "error").astype(int)
    eff = eff.sort_values(["_rank", "time"], kind="stable")
    keys = ["label", *SETTING_KEYS, "res", "device_name"]
    before = len(eff)
    eff = eff.drop_duplicates(keys, keep="last").drop(columns="_rank")
    return eff.sort_values(keys, kind="stable").reset_index(drop=True), before - len(eff)


def _budget(row) -> dict | None:
    nested = row.get("train_budget")
    if isinstance(nested, dict):
        return {k: nested.get(k) for k in ("iters", "crop", "batch")}
    flat = {k: row.get(f"train_{k}") for k in ("iters", "crop", "batch")}
    flat = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in flat.items()}
    return flat if any(v is not None for v in flat.values()) else None


def quality_rows(df):
    """One mean row per (label, task, scale, degradation, dataset): the latest mean row, or the
    mean of the per-image rows where no mean row was written."""
    import pandas as pd

    q = df[df["kind"] == "quality"].copy()
    if q.empty:
        return q, 0
    for c in [*QUALITY_METRICS, "image", "n_images", "lpips_status", "degradation", "dataset",
              "overrides", "time"]:
        if c not in q.columns:
            q[c] = None
    q = _fill(q, "scale", 1)
    q = _fill(q, "degradation", "")
    q = _fill(q, "time", "")
    q["scale"] = pd.to_numeric(q["scale"]).astype(int)
    q["label"] = [label_of(m, o) for m, o in zip(q["model"], q["overrides"])]
    q["budget"] = [_budget(r) for r in q.to_dict("records")]
    keys = ["label", *QUALITY_KEYS, "dataset"]
    per_image = q["image"].notna()
    means = q[~per_image]
    missing = q[per_image].merge(means[keys].drop_duplicates(), on=keys, how="left",
                                 indicator=True)
    missing = missing[missing["_merge"] == "left_only"].drop(columns="_merge")
    derived = []
    for _, g in missing.groupby(keys, dropna=False):
        row = g.sort_values("time").iloc[-1].to_dict()
        for m in QUALITY_METRICS:
            vals = pd.to_numeric(g[m], errors="coerce")
            row[m] = float(vals.mean()) if vals.notna().all() else None
        row.update(image=None, n_images=len(g))
        derived.append(row)
    if derived:
        means = pd.concat([means, pd.DataFrame(derived)], ignore_index=True)
    before = len(means)
    means = means.sort_values("time", kind="stable").drop_duplicates(keys, keep="last")
    return means.sort_values(keys, kind="stable").reset_index(drop=True), before - len(means)


def validation_rows(df):
    """Validation rows of `bench train` runs (kind=validation): one per (label, task, scale,
    degradation, validation sets, iteration, card), the latest kept."""
    import pandas as pd

    v = df[df["kind"] == "validation"].copy() if "kind" in df.columns else df.iloc[:0]
    if v.empty:
        return v
    for c in ("degradation", "overrides", "time", "device_name", "time_budget_s"):
        if c not in v.columns:
            v[c] = None
    v = _fill(v, "scale", 1)
    v = _fill(v, "degradation", "")
    v = _fill(v, "time", "")
    v = _fill(v, "device_name", "unknown device")
    v["scale"] = pd.to_numeric(v["scale"]).astype(int)
    v["val_sets"] = [",".join(s) if isinstance(s, list) else str(s) for s in v["val_sets"]]
    v["label"] = [label_of(m, o) for m, o in zip(v["model"], v["overrides"])]
    keys = ["label", "task", "scale", "degradation", "val_sets", "iteration", "device_name"]
    v = v.sort_values("time", kind="stable").drop_duplicates(keys, keep="last")
    return v.sort_values(keys, kind="stable").reset_index(drop=True)


def resolve_reference(reference: str | None, labels) -> str | None:
    """--relative-to must name a model in the rows; by default serpent_s when present."""
    labels = set(labels)
    if reference is None:
        return "serpent_s" if "serpent_s" in labels else None
    reference = network_of(reference)
    if reference not in labels:
        known = ", ".join(sorted(labels)) or "none"
        raise UsageError(f"--relative-to {reference}: no rows for that model; "
                         f"models in the results: {known}")
    return reference


def prepare(paths, filters=(), reference: str | None = None) -> ReportData:
    raw = apply_filters(load_rows(list(paths)), parse_filters(filters))
    eff, dropped_eff = efficiency_rows(raw)
    qual, dropped_q = quality_rows(raw)
    val = validation_rows(raw)
    labels = set(eff.get("label", [])) | set(qual.get("label", [])) | set(val.get("label", []))
    notes = []
    if dropped_eff:
        notes.append(f"{dropped_eff} efficiency row(s) superseded by a later measurement of the "
                     "same configuration on the same card (an error is superseded by any result).")
    if dropped_q:
        notes.append(f"{dropped_q} quality mean row(s) superseded by a later evaluation of the "
                     "same model, task and set.")
    if len(eff):
        spread = eff.groupby(["label", "task", "scale", "res"])["gflops"].agg(["min", "max"])
        differ = spread[spread["max"] > spread["min"] * 1.001]
        if len(differ):
            shown = ", ".join(f"{lb} @{r}" for lb, _, _, r in differ.index[:5])
            notes.append(f"GFLOPs differ between rows of the same configuration ({shown}): "
                         "the latest row is shown; were they counted by different code?")
    ref = resolve_reference(reference, labels - {"input"})
    if ref is None:
        notes.append("No reference model (serpent_s absent; pass --relative-to MODEL): "
                     "ratio columns and the headline figure are omitted.")
    order = label_order(labels - {"input"})
    return ReportData(eff=eff, qual=qual, val=val, reference=ref, order=order, raw=raw,
                      notes=notes)
