"""Report tables: pandas pivots of model x resolution (efficiency) and model x dataset (quality),
written as Markdown (tabulate), LaTeX (booktabs) and CSV.

A cell says what happened: a number, "OOM" (the card ran out of memory), "error"/"skipped"
(footnote gives the message), "n/a" (not measured / unavailable, footnote says which) or "–"
(configuration not run). Ratio columns are model ÷ reference at the same resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

NOT_RUN = "–"


@dataclass(frozen=True)
class Metric:
    key: str  # row column
    name: str
    unit: str = ""
    factor: float = 1.0  # display = value * factor
    card: bool = True  # depends on the GPU (never mixed across cards)
    note: str = ""

    def header(self, res) -> str:
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.name}{unit} @{res}²"


METRICS = {
    "gflops": Metric("gflops", "GFLOPs", card=False,
                     note="GFLOPs: one forward pass of one image, 1 multiply-add = 2 FLOPs "
                          "(fvcore with our handles, selective scan included)."),
    "latency": Metric("latency_ms_median", "latency", "ms",
                      note="latency: median over the timed iterations (CUDA events after "
                           "warm-up); IQR and min are in the results rows."),
    "throughput": Metric("throughput_img_s", "throughput", "img/s",
                         note="throughput: batch ÷ median latency."),
    "memory": Metric("mem_peak_alloc_mb", "peak memory", "GiB", factor=1 / 1024,
                     note="peak memory: torch.cuda.max_memory_allocated after warm-up "
                          "(1 GiB = 1024 MiB)."),
    "activation_memory": Metric("mem_activation_mb", "activation memory", "GiB",
                                factor=1 / 1024,
                                note="activation memory: peak memory minus what was allocated "
                                     "before the timed calls (weights and inputs; for a "
                                     "training step also gradients and optimizer state)."),
}


@dataclass
class Table:
    name: str  # file stem
    title: str
    headers: list[str]  # flat, unique (Markdown, CSV)
    cells: list[list[str]]  # display text
    values: list[list]  # CSV values: numbers where there is one, else the display text
    footnotes: list[str] = field(default_factory=list)
    bold: set = field(default_factory=set)  # (row, col) cells to emphasise
    # LaTeX: a grouped two-row header, [(group text, span)] over `subheaders`
    groups: list = field(default_factory=list)
    subheaders: list = field(default_factory=list)

    def add_note(self, text: str) -> None:
        if text and text not in self.footnotes:
            self.footnotes.append(text)


def fmt(v) -> str:
    """About three significant digits, thousands separated: 12000 -> 12,000; 0.1234 -> 0.123."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1 or a == 0:
        return f"{v:.2f}"
    return f"{v:#.3g}"


def num(v) -> float | None:
    """A finite-or-inf float, or None for missing/NaN/non-numbers."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


# ----------------------------------------------------------------------------- efficiency


def efficiency_table(rows, metric: Metric, *, order: list[str], reference: str | None,
                     name: str, title: str) -> Table:
    """Model x resolution pivot of one metric (one setting; one card if the metric needs it)."""
    if metric.card:
        cards = set(rows["device_name"])
        if len(cards) > 1:  # callers split by card; this guards the rule itself
            raise ValueError(f"{metric.name} table would mix cards {sorted(cards)}")
    resolutions = sorted(int(r) for r in rows["res"].unique())
    present = set(rows["label"])
    labels = [lb for lb in order if lb in present]
    by = {(r["label"], int(r["res"])): r for r in rows.to_dict("records")}
    show_params = not metric.card
    ref = reference if reference in present else None
    headers = ["model"] + (["params (M)"] if show_params else [])
    subheaders = list(headers)
    groups = [("", 1)] * len(headers)
    for res in resolutions:
        headers.append(metric.header(res))
        subheaders.append(metric.unit or metric.name)
        if ref:
            headers.append(f"vs {ref} @{res}²")
            subheaders.append(f"vs {ref}")
        groups.append((f"{res}×{res}", 2 if ref else 1))
    table = Table(name=name, title=title, headers=headers, cells=[], values=[], groups=groups,
                  subheaders=subheaders)
    table.add_note(_timer_note(metric.note, rows))
    for lb in labels:
        cells, values = [lb], [lb]
        if show_params:
            p = _latest_params(rows, lb)
            cells.append(fmt(p / 1e6) if p is not None else "n/a")
            values.append(p / 1e6 if p is not None else "n/a")
        for res in resolutions:
            row = by.get((lb, res))
            text, value = _value_cell(row, metric, table, lb, res)
            cells.append(text)
            values.append(value)
            if ref:
                text, value = _ratio_cell(row, by.get((ref, res)), metric, table, ref)
                cells.append(text)
                values.append(value)
        table.cells.append(cells)
        table.values.append(values)
    if ref:
        table.add_note(f"vs {ref}: ratio model ÷ {ref} at the same resolution "
                       f"(> 1: higher {metric.name} than {ref}).")
    return table


def _timer_note(note: str, rows) -> str:
    """A latency note names the timer that ran: CUDA events on a GPU, perf_counter on a CPU."""
    if "CUDA events" not in note:
        return note
    devices = [str(d) for d in rows["device_name"].dropna()]
    if devices and all(d.startswith("cpu") for d in devices):
        return note.replace("CUDA events", "time.perf_counter around each call, on the CPU")
    return note


def _latest_params(rows, label):
    p = rows[(rows["label"] == label) & rows["params"].notna()]
    return None if p.empty else float(p.sort_values("time")["params"].iloc[-1])


def _metric_value(row, metric: Metric):
    if row is None:
        return None
    v = num(row.get(metric.key))
    return None if v is None else v * metric.factor


def _value_cell(row, metric: Metric, table: Table, label: str, res: int):
    if row is None:
        table.add_note(f"{NOT_RUN}: configuration not in the results.")
        return NOT_RUN, NOT_RUN
    v = _metric_value(row, metric)
    status = row.get("status") or "ok"
    if v is not None and (status == "ok" or not metric.card):
        return fmt(v), v  # FLOPs are counted before the run: an OOM row still has them
    if status == "oom":
        table.add_note("OOM: out of memory on this card (the row's status is oom).")
        return "OOM", "OOM"
    if status in ("error", "skipped"):
        msg = str(row.get("message") or "").strip().splitlines()
        table.add_note(f"{status}: {label} @{res}²: {msg[0][:160] if msg else 'no message'}")
        return status, status
    table.add_note(f"n/a: {metric.name} not measured in these rows.")
    return "n/a", "n/a"


def _ratio_cell(row, ref_row, metric: Metric, table: Table, ref: str):
    if row is None:
        return NOT_RUN, NOT_RUN
    v, r = _metric_value(row, metric), _metric_value(ref_row, metric)
    ref_ok = ref_row is not None and r and (ref_row.get("status") == "ok" or not metric.card)
    status = row.get("status") or "ok"
    if status == "oom" and metric.card:
        limit = num(row.get("device_mem_mb"))
        if metric.key == "mem_peak_alloc_mb" and limit and ref_ok:
            bound = limit * metric.factor / r
            table.add_note(f">N×: the model ran out of memory, so it needs more than the "
                           f"card's memory, i.e. more than N × {ref}'s.")
            return f">{fmt(bound)}×", f">{bound:.6g}"
        return "OOM", "OOM"
    if v is None or (status != "ok" and metric.card):
        return "n/a", "n/a"
    if not ref_ok:
        table.add_note(f"ratio n/a: {ref} has no {metric.name} at that resolution.")
        return "n/a", "n/a"
    return f"{fmt(v / r)}×", v / r


# ----------------------------------------------------------------------------- quality


def _budget_text(budget) -> str:
    if budget:
        it, crop, batch = (budget.get(k) for k in ("iters", "crop", "batch"))
        parts = []
        if it is not None:
            parts.append(f"{int(it):,} it")
        if batch is not None:
            parts.append(f"batch {int(batch)}")
        if crop is not None:
            parts.append(f"crop {int(crop)}²")
        return ", ".join(parts)
    return "n/a"


def quality_table(rows, *, order: list[str], name: str, title: str) -> Table:
    """Model x dataset PSNR/SSIM/LPIPS with the training budget; SR on the Y channel."""
    task = rows["task"].iloc[0]
    y = task == "sr"
    suffix = "-Y" if y else ""
    datasets = sorted(rows["dataset"].unique(), key=str)
    metrics = [("psnr_y" if y else "psnr", f"PSNR{suffix} (dB) ↑", max),
               ("ssim_y" if y else "ssim", f"SSIM{suffix} ↑", max),
               ("lpips", "LPIPS ↓", min)]
    headers = ["model"] + [f"{ds} {h}" for ds in datasets for _, h, _ in metrics] + [
        "training budget"]
    table = Table(name=name, title=title, headers=headers, cells=[], values=[],
                  groups=[("", 1)] + [(ds, len(metrics)) for ds in datasets] + [("", 1)],
                  subheaders=["model", *(h for _ in datasets for _, h, _ in metrics),
                              "training budget"])
    by = {(r["label"], r["dataset"]): r for r in rows.to_dict("records")}
    present = set(rows["label"])
    labels = (["input"] if "input" in present else []) + [lb for lb in order if lb in present]
    for lb in labels:
        is_input = lb == "input"
        cells, values = ["input (degraded)" if is_input else lb], [lb]
        for ds in datasets:
            row = by.get((lb, ds))
            for key, _, _ in metrics:
                v = num(row.get(key)) if row else None
                if row is None:
                    cells.append(NOT_RUN)
                    values.append(NOT_RUN)
                    table.add_note(f"{NOT_RUN}: model not evaluated on that set.")
                elif v is None:
                    cells.append("n/a")
                    values.append("n/a")
                    status = row.get("lpips_status") if key == "lpips" else None
                    reason = status if isinstance(status, str) and status != "ok" else "not recorded"
                    table.add_note(f"n/a: {key.upper().replace('_Y', '-Y')} {reason}.")
                else:
                    cells.append(f"{v:.2f}" if key.startswith("psnr") else f"{v:.4f}")
                    values.append(v)
        first = next(by[(lb, ds)] for ds in datasets if (lb, ds) in by)
        text = "—" if is_input else _budget_text(first.get("budget"))
        if text == "n/a" and "weights" in first and first["weights"] is None:
            text = "none (random init)"
            table.add_note("none (random init): evaluated without trained weights.")
        elif text == "n/a":
            table.add_note("training budget n/a: not recorded in the rows (e.g. official weights).")
        cells.append(text)
        values.append(text)
        table.cells.append(cells)
        table.values.append(values)
    # emphasise the best model per column (the degraded input does not compete)
    for j in range(1, len(headers) - 1):
        best = metrics[(j - 1) % len(metrics)][2]
        scored = [(i, table.values[i][j]) for i, lb in enumerate(labels)
                  if lb != "input" and isinstance(table.values[i][j], float)]
        if len(scored) > 1:
            top = best(v for _, v in scored)
            table.bold |= {(i, j) for i, v in scored if v == top}
    counts = rows.groupby("dataset")["n_images"].max()
    table.add_note("images per set: " + ", ".join(
        f"{ds} {int(n)}" for ds, n in counts.items() if n == n))
    table.add_note("bold: best model per column." if table.bold else "")
    if y:
        table.add_note("PSNR-Y/SSIM-Y: on the Y channel of YCbCr (BT.601), SR border cropped.")
    return table


# ----------------------------------------------------------------------------- writers


def to_markdown(table: Table) -> str:
    from tabulate import tabulate

    cells = [[f"**{c}**" if (i, j) in table.bold else c for j, c in enumerate(row)]
             for i, row in enumerate(table.cells)]
    align = ["left"] + ["right"] * (len(table.headers) - 1)
    if table.headers[-1] == "training budget":
        align[-1] = "left"
    body = tabulate(cells, headers=table.headers, tablefmt="github", colalign=align,
                    disable_numparse=True)
    notes = "".join(f"\n<sub>{n}</sub>  " for n in table.footnotes)
    return f"**{table.title}**\n\n{body}\n{notes}\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "×": r"$\times$", "²": r"$^2$", "↑": r"$\uparrow$",
                  "↓": r"$\downarrow$", "÷": r"$\div$", "–": "--", "—": "---", ">": r"$>$",
                  "≥": r"$\geq$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in str(text))


def to_latex(table: Table) -> str:
    """A booktabs table float (needs \\usepackage{booktabs})."""
    spec = "l" + "r" * (len(table.headers) - 1)
    if table.headers[-1] == "training budget":
        spec = spec[:-1] + "l"
    lines = ["% generated by `bench report`; needs \\usepackage{booktabs}",
             "\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{{latex_escape(table.title)}}}",
             f"\\label{{tab:{table.name}}}",
             f"\\begin{{tabular}}{{{spec}}}", "\\toprule", *_latex_header(table), "\\midrule"]
    for i, row in enumerate(table.cells):
        cells = [f"\\textbf{{{latex_escape(c)}}}" if (i, j) in table.bold else latex_escape(c)
                 for j, c in enumerate(row)]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.footnotes:
        lines.append("\\par\\smallskip{\\footnotesize " + " \\\\ ".join(
            latex_escape(n) for n in table.footnotes) + "}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def _latex_header(table: Table) -> list[str]:
    """Two rows (resolution or dataset groups over short units) where the table has groups."""
    if not table.groups or all(span == 1 for _, span in table.groups):
        return [" & ".join(latex_escape(h) for h in table.headers) + " \\\\"]
    top, rules, col = [], [], 1
    for text, span in table.groups:
        if text:
            top.append(f"\\multicolumn{{{span}}}{{c}}{{{latex_escape(text)}}}")
            rules.append(f"\\cmidrule(lr){{{col}-{col + span - 1}}}")
        else:
            top += [""] * span
        col += span
    return [" & ".join(top) + " \\\\", "".join(rules),
            " & ".join(latex_escape(h) for h in table.subheaders) + " \\\\"]


def to_csv(table: Table) -> str:
    import pandas as pd

    return pd.DataFrame(table.values, columns=table.headers).to_csv(index=False)
