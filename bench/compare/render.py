"""How a Comparison reads: a table on screen, and a Markdown summary for a pull-request comment.

Both come from the same rows so the CI log and the PR comment never disagree. ASCII markers only
(`!` fails the gate, `*` improvement) because CI logs are not always UTF-8.
"""
from __future__ import annotations

import textwrap

from bench.compare.verdict import Comparison, ConfigResult, MetricResult, config_dict, env_label
from bench.results import VARIANT_FLAGS

SHORT_NAMES = {
    "params": "params", "gflops": "GFLOPs", "gmacs": "GMACs", "gflops_torch": "GFLOPs (torch)",
    "mem_peak_alloc_mb": "peak alloc", "mem_peak_reserved_mb": "peak reserved",
    "latency_ms_median": "latency", "throughput_img_s": "img/s",
}
STATUS_TEXT = {"ok": "ok", "regression": "REGRESSION", "improvement": "improvement",
               "missing": "MISSING", "new": "new"}
LEGEND = ("Cells: change vs baseline; exact metrics as the absolute difference (and %), "
          "latency/throughput as the change of the median with its bootstrap interval. "
          "'!' fails the gate, '*' improvement, '=' identical.")


def metric_cell(m: MetricResult) -> str:
    if m.status == "not_compared":
        return f"n/a ({m.note})"
    if m.method == "exact":
        text = "=" if m.current == m.baseline else \
            f"{m.current - m.baseline:+,.6g} ({_pct(m.change, 4)})"
    elif m.method == "bootstrap":
        text = f"{_pct(m.change)} [{_pct(m.ci[0])}, {_pct(m.ci[1])}]"
    elif m.current == m.baseline:
        text = "="
    else:
        text = _pct(m.change) + (" (medians)" if m.method == "median" else "")
    return text + (" !" if m.fail else " *" if m.status == "improvement" else "")


def _pct(x: float, digits: int = 1) -> str:
    return f"{x * 100:+.{digits}f}%"


def _variant(cfg: dict) -> str:
    parts = [flag for flag in VARIANT_FLAGS if cfg[flag]]
    parts += [f"{k}={v}" for k, v in sorted(cfg["overrides"].items())]
    return ",".join(parts)


EXACT_COLUMN = "params/FLOPs (exact)"


def _exact_cell(ms: list[MetricResult]) -> str:
    """All exact metrics in one column: '=' when all are identical, else the ones that moved."""
    moved = [m for m in ms if m.status != "ok"]
    if not moved:
        return "="
    return ", ".join(f"{SHORT_NAMES.get(m.metric, m.metric)} {metric_cell(m)}" for m in moved)


NOTE_WIDTH = 60  # characters per line of the note column on screen


def _note(text: str, width: int | None) -> str:
    """The note cell: wrapped at word boundaries on screen (`width`), whole where a line break
    cannot be (Markdown); never cut mid-word."""
    return textwrap.fill(text, width, break_long_words=False) if width else text


def table(configs: list[ConfigResult], *, escape=lambda s: s,
          note_width: int | None = NOTE_WIDTH) -> tuple[list[str], list[list]]:
    """Headers and rows: config columns, status, exact metrics together, one column per other
    judged metric, note."""
    metrics = []
    for c in configs:
        metrics += [m.metric for m in c.metrics if m.method != "exact" and m.metric not in metrics]
    with_exact = any(m.method == "exact" for c in configs for m in c.metrics)
    dicts = [config_dict(c.config) for c in configs]
    with_variant = any(_variant(d) for d in dicts)
    headers = ["model", "task", "res", "batch", "dtype", "mode"] + (["variant"] if with_variant
                                                                   else [])
    headers += ["status"] + ([EXACT_COLUMN] if with_exact else [])
    headers += [SHORT_NAMES.get(m, m) for m in metrics] + ["note"]
    rows = []
    for c, d in zip(configs, dicts):
        task = d["task"] + (f"x{d['scale']}" if d["task"] == "sr" else "")
        row = [d["model"], task, d["res"], d["batch"], d["dtype"], d["mode"]]
        row += [_variant(d)] if with_variant else []
        row.append(STATUS_TEXT[c.status] + (" !" if c.fail and c.status != "regression" else ""))
        exact = [m for m in c.metrics if m.method == "exact"]
        if with_exact:
            row.append(_exact_cell(exact) if exact else "")
        by_name = {m.metric: m for m in c.metrics}
        row += [metric_cell(by_name[m]) if m in by_name else "" for m in metrics]
        notes = [c.note] + [f"{SHORT_NAMES.get(m.metric, m.metric)}: {m.note}"
                            for m in c.metrics if m.note and m.status != "not_compared"]
        row.append(_note("; ".join(n for n in notes if n), note_width))
        rows.append([escape(str(v)) for v in row])
    if not any(r[-1] for r in rows):  # no notes at all: drop the empty column
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    return headers, rows


def _groups(cmp: Comparison, only_changes: bool):
    for env in cmp.envs_compared:
        configs = [c for c in cmp.configs if c.env == env
                   and (not only_changes or c.status != "ok" or c.fail)]
        yield env, configs


def verdict_line(cmp: Comparison) -> str:
    s = cmp.summary()
    counts = (f"{s['compared']} config(s) compared: {s['regression']} regression(s), "
              f"{s['improvement']} improvement(s), {s['missing']} missing, {s['new']} new")
    nc = s["not_comparable_rows"]
    if nc["baseline"] or nc["current"]:
        counts += (f"; not comparable: {nc['baseline']} baseline and {nc['current']} current "
                   "row(s) from other environments")
    if cmp.passed:
        return f"PASS: {counts}"
    return f"FAIL: {s['failing']} config(s) fail the gate; {counts}"


def rules_text(rules: dict) -> str:
    """One phrase per distinct rule, naming the metrics it applies to."""
    boot = rules["bootstrap"]
    groups: dict[str, list[str]] = {}
    for name, rule in rules["metrics"].items():
        if rule["rule"] == "exact":
            desc = "exact: any increase fails" + (
                ", a decrease fails too until the baseline is updated"
                if rule["fail_on_improvement"] else "")
        elif rule["rule"] == "relative":
            desc = f"relative tolerance {rule['tolerance']:.0%}"
        else:
            desc = (f"{boot['confidence']:.0%} bootstrap interval ({boot['resamples']} resamples) "
                    f"of the ratio of medians must lie beyond {rule['min_effect']:.0%}")
        label = SHORT_NAMES.get(name, name) + (" (higher is better)"
                                               if rule["better"] == "higher" else "")
        groups.setdefault(desc, []).append(label)
    return "; ".join(f"{', '.join(names)}: {desc}" for desc, names in groups.items()) + "."


def render_text(cmp: Comparison, *, only_changes: bool = False) -> str:
    from tabulate import tabulate

    out = [f"baseline: {cmp.baseline_path}", f"current:  {cmp.current_path}"]
    for env, configs in _groups(cmp, only_changes):
        out.append(f"\nEnvironment: {env_label(env)}")
        if configs:
            headers, rows = table(configs)
            out.append(tabulate(rows, headers=headers, disable_numparse=True))
        else:
            out.append("(no changes)")
    out.append("\n" + LEGEND)
    out += [f"note: {n}" for n in cmp.notes]
    out.append(verdict_line(cmp))
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(cmp: Comparison) -> str:
    from tabulate import tabulate

    head = "### :white_check_mark: bench compare: no regression" if cmp.passed else \
        "### :x: bench compare: regression"
    out = [head, "", f"Baseline `{cmp.baseline_path}`, current `{cmp.current_path}`.",
           f"**{verdict_line(cmp)}**", ""]
    for env, configs in _groups(cmp, only_changes=False):
        changed = [c for c in configs if c.status != "ok" or c.fail]
        out.append(f"Environment: `{env_label(env)}`")
        out.append("")
        if changed:
            headers, rows = table(changed, escape=_md_escape, note_width=None)
            out.append(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
        else:
            out.append(f"All {len(configs)} configs within the rules.")
        if len(changed) == len(configs):
            out.append("")
            continue
        headers, rows = table(configs, escape=_md_escape, note_width=None)
        out += ["", f"<details><summary>All {len(configs)} configs</summary>", "",
                tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
                "</details>", ""]
    out.append(LEGEND)
    out.append("")
    out.append(f"Rules: {rules_text(cmp.rules)}")
    if cmp.notes:
        out += [""] + [f"- {_md_escape(n)}" for n in cmp.notes]
    return "\n".join(out) + "\n"
