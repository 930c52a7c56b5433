"""Report figures (matplotlib Agg, seaborn's colorblind palette), sized for one paper column.

Every model keeps one color and marker in every figure of a report: the style comes from the
model's place among the report's models sorted by name (the registry's order), not from which
models one figure shows, so no two models of a report share a color (up to 10 models; beyond,
a color repeats with another marker). A variant with constructor overrides shares its base model's
color and marker, drawn hollow and dashed. Card-dependent figures (memory, throughput) are drawn
per card by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.report.data import base_model

COLUMN_WIDTH_IN = 3.3
MARKERS = ["o", "s", "^", "D", "v", "P", "h"]  # 7 is coprime with the 10 colors: 70 pairs
OOM_MARKER = "X"
RC = {
    "font.size": 8, "axes.labelsize": 8, "axes.titlesize": 8, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7,
    "lines.linewidth": 1.2, "lines.markersize": 4.5, "axes.linewidth": 0.6,
    "xtick.major.width": 0.6, "ytick.major.width": 0.6, "grid.linewidth": 0.4,
    "grid.alpha": 0.5, "axes.grid": True, "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path", "svg.hashsalt": "bench-report",
    "font.family": "DejaVu Sans",
}
# Drop the creation date so regenerating a report from the same rows gives the same files.
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}


def palette() -> list[str]:
    """seaborn's colorblind palette, gray aside (kept for reference lines): its 8 most distinct
    colors first (sky blue before brown, which is close to orange), then black, then its yellow
    (light on white, so last)."""
    import seaborn as sns

    c = sns.color_palette("colorblind").as_hex()
    return [c[0], c[1], c[2], c[3], c[4], c[9], c[5], c[6], "#000000", c[8]]


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    linestyle: str = "-"
    hollow: bool = False

    def line_kw(self, emphasis: bool = False) -> dict:
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle,
                "markerfacecolor": "white" if self.hollow else self.color,
                "markeredgecolor": self.color, "linewidth": 2.0 if emphasis else 1.2,
                "zorder": 3 if emphasis else 2}


def model_styles(order: list[str]) -> dict[str, Style]:
    """Style per label; `order` is the report's label order (`report_data.label_order`)."""
    colors = palette()
    bases = list(dict.fromkeys(base_model(lb) for lb in order))
    styles = {}
    for lb in order:
        i = bases.index(base_model(lb))
        variant = lb != base_model(lb)
        styles[lb] = Style(colors[i % len(colors)], MARKERS[i % len(MARKERS)],
                           "--" if variant else "-", variant)
    return styles


@dataclass
class Figure:
    name: str
    caption: str
    files: list[str] = field(default_factory=list)  # relative to the report folder


class Canvas:
    """Creates figures in the report style and saves them in every requested format."""

    def __init__(self, out_dir: Path, formats: tuple[str, ...], dpi: int):
        import matplotlib

        matplotlib.use("Agg", force=True)
        self.out_dir, self.formats, self.dpi = out_dir, formats, dpi

    def figure(self, n_axes: int = 1, height: float = 2.1, sharex: bool = False):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(n_axes, 1, figsize=(COLUMN_WIDTH_IN, height), sharex=sharex,
                                 layout="constrained", squeeze=False)
        return fig, list(axes[:, 0])

    def save(self, fig, figure: Figure) -> Figure:
        import matplotlib.pyplot as plt

        self.out_dir.mkdir(parents=True, exist_ok=True)
        for ext in self.formats:
            path = self.out_dir / f"{figure.name}.{ext}"
            fig.savefig(path, format=ext, dpi=self.dpi, metadata=_METADATA[ext])
            figure.files.append(f"{self.out_dir.name}/{path.name}")
        plt.close(fig)
        return figure


def rc_context():
    import matplotlib.pyplot as plt
    import seaborn as sns

    ctx = sns.axes_style("ticks")
    ctx.update(RC)
    return plt.rc_context(ctx)


# ----------------------------------------------------------------------------- helpers


def _res_axis(ax, resolutions) -> None:
    from matplotlib.ticker import NullLocator

    res = sorted(set(int(r) for r in resolutions))
    ax.set_xscale("log", base=2)
    ax.set_xticks(res, [str(r) for r in res])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(res[0] / 1.3, res[-1] * 1.3)
    ax.set_xlabel("output resolution R (px, R×R image)")


def plain_log_ticks(ax, axis: str = "y") -> None:
    """Log axis labelled 1, 10, 100 (or 1-2-5 steps when the range is short), not 10^k."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    get, set_ = (ax.get_ylim, ax.set_ylim) if axis == "y" else (ax.get_xlim, ax.set_xlim)
    lo, hi = sorted(max(v, 1e-12) for v in get())
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    steps = [m * 10.0 ** k for k in decades for m in (1, 2, 5)]
    for mults in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [m * 10.0 ** k for k in decades for m in mults if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:  # a narrow range: widen it to the neighbouring 1-2-5 values
        ticks = [max(t for t in steps if t <= lo), min(t for t in steps if t >= hi)]
        set_(ticks[0] / 1.05, ticks[1] * 1.05)
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
    target.set_minor_locator(NullLocator())


def _legend(fig, handles, labels, title=None, max_cols: int = 2) -> None:
    """Below the axes, outside the data area, so it never covers a point."""
    if not handles:
        return
    ncol = min(max_cols, len(handles))
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False,
               title=title, handlelength=2.2, columnspacing=1.2, borderaxespad=0.2)


def _legend_height(n: int, cols: int = 2, title: bool = False) -> float:
    return 0.16 * math.ceil(n / cols) + (0.16 if title else 0) + 0.1


def _series(rows, label, key, factor=1.0):
    """(res, value) of the ok rows of one label, sorted by resolution."""
    part = rows[(rows["label"] == label) & (rows["status"] == "ok") & rows[key].notna()]
    part = part.sort_values("res")
    return part["res"].astype(int).tolist(), (part[key].astype(float) * factor).tolist()


def _labels_in(rows, order):
    present = set(rows["label"])
    return [lb for lb in order if lb in present]


# ----------------------------------------------------------------------------- figures


def gflops_vs_res(canvas: Canvas, rows, *, order, styles, reference, name, title) -> Figure:
    labels = _labels_in(rows, order)
    with rc_context():
        fig, (ax,) = canvas.figure(height=2.0 + _legend_height(len(labels)))
        handles = []
        for lb in labels:
            part = rows[(rows["label"] == lb) & rows["gflops"].notna()].sort_values("res")
            (h,) = ax.plot(part["res"], part["gflops"], label=lb,
                           **styles[lb].line_kw(lb == reference))
            handles.append(h)
        ax.set_yscale("log")
        _res_axis(ax, rows["res"])
        plain_log_ticks(ax)
        ax.set_ylabel("GFLOPs per image\n(1 MAC = 2 FLOPs)")
        ax.set_title(title)
        _legend(fig, handles, labels)
        return canvas.save(fig, Figure(name, f"Forward GFLOPs per image vs output resolution, "
                                             f"{title} (log scale)."))


def memory_vs_res(canvas: Canvas, rows, *, order, styles, reference, name, title) -> Figure:
    """Peak memory; OOM drawn at the card's memory with an X, the card's memory as a line.
    `title` is (setting, card)."""
    labels = _labels_in(rows, order)
    limit_mb = rows["device_mem_mb"].dropna()
    limit = float(limit_mb.max()) / 1024 if len(limit_mb) else None
    ooms = rows[rows["status"] == "oom"]
    extra = 1 if len(ooms) else 0
    with rc_context():
        fig, (ax,) = canvas.figure(height=2.0 + _legend_height(len(labels) + extra))
        handles, names = [], []
        top = 0.0
        dodge = _dodge(ooms, labels)
        for lb in labels:
            res, mem = _series(rows, lb, "mem_peak_alloc_mb", 1 / 1024)
            if not res and lb not in set(ooms["label"]):
                continue
            (h,) = ax.plot(res, mem, label=lb, **styles[lb].line_kw(lb == reference))
            handles.append(h)
            names.append(lb)
            top = max([top, *mem])
            oom_res = [r * dodge.get((lb, r), 1.0)
                       for r in sorted(ooms[ooms["label"] == lb]["res"].astype(int))]
            if oom_res and limit:
                if res:  # dotted: the curve runs into the card's memory
                    ax.plot([res[-1], oom_res[0]], [mem[-1], limit], color=styles[lb].color,
                            linestyle=":", linewidth=1.0, zorder=1)
                ax.plot(oom_res, [limit] * len(oom_res), linestyle="none", marker=OOM_MARKER,
                        markersize=7, color=styles[lb].color, markeredgecolor="black",
                        markeredgewidth=0.6, zorder=4)
        ax.set_yscale("log")
        # the card's memory line, unless every point is far below it (it would squash them)
        if limit and (len(ooms) or top >= limit / 8):
            ax.axhline(limit, color="#949494", linestyle="--", linewidth=0.8, zorder=1)
            ax.text(0.02, limit, f" card memory {limit:.1f} GiB", va="bottom", ha="left",
                    transform=ax.get_yaxis_transform(), fontsize=7, color="#555555")
            top = max(top, limit)
            ax.set_ylim(top=top * 2.2)
        if len(ooms):
            from matplotlib.lines import Line2D

            handles.append(Line2D([], [], linestyle="none", marker=OOM_MARKER, markersize=7,
                                  color="white", markeredgecolor="black"))
            names.append("OOM (drawn at card memory)" if limit else "OOM")
        _res_axis(ax, rows["res"])
        plain_log_ticks(ax)
        ax.set_ylabel("peak memory (GiB)")
        ax.set_title("\n".join(title))
        _legend(fig, handles, names)
        return canvas.save(fig, Figure(name, f"Peak allocated GPU memory vs output resolution, "
                                             f"{', '.join(title)} (log scale; OOM marked at the card's "
                                             "memory)."))


def _dodge(ooms, labels) -> dict:
    """Spread OOM markers that share a resolution sideways (x factor) so none hides another."""
    out = {}
    for r, part in ooms.groupby("res"):
        names = [lb for lb in labels if lb in set(part["label"])]
        for k, lb in enumerate(names):
            out[(lb, int(r))] = 2 ** (0.13 * (k - (len(names) - 1) / 2))
    return out


def scaling_exponent(res, throughput) -> float | None:
    """alpha in throughput ∝ pixels^alpha (least squares in log-log); None under 2 points."""
    if len(res) < 2:
        return None
    px = np.log(np.asarray(res, float) ** 2)
    return float(np.polyfit(px, np.log(np.asarray(throughput, float)), 1)[0])


def throughput_vs_res(canvas: Canvas, rows, *, order, styles, reference, name, title) -> Figure:
    labels = _labels_in(rows, order)
    with rc_context():
        fig, (ax,) = canvas.figure(height=2.0 + _legend_height(len(labels), title=True))
        handles, names, drawn = [], [], set()
        for lb in labels:
            res, thr = _series(rows, lb, "throughput_img_s")
            if not res:
                continue
            drawn.update(res)
            alpha = scaling_exponent(res, thr)
            text = lb if alpha is None else f"{lb} (α = {alpha:.2f})".replace("= -", "= −")
            (h,) = ax.plot(res, thr, **styles[lb].line_kw(lb == reference))
            handles.append(h)
            names.append(text)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _res_axis(ax, sorted(drawn) or rows["res"])  # OOM-only resolutions have no point to show
        plain_log_ticks(ax)
        ax.set_ylabel("throughput (img/s)")
        ax.set_title("\n".join(title))
        _legend(fig, handles, names, title=r"fit: throughput ∝ pixels$^{\alpha}$")
        return canvas.save(fig, Figure(name, f"Throughput vs output resolution, {', '.join(title)} "
                                             "(log-log; α: least-squares slope against the "
                                             "pixel count, -1 = linear cost)."))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by one with fewer (or equal) FLOPs and higher (or equal) quality."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def quality_vs_cost(canvas: Canvas, points, *, styles, reference, name, title, metric,
                    cost: str, xlabel: str) -> Figure:
    """points: [(label, cost, quality, params)]; marker area ∝ parameters; the Pareto front of
    (lower cost, higher quality) dashed. `cost` names the x quantity in the caption."""
    from matplotlib.lines import Line2D

    pmax = max((p for *_, p in points if p), default=1.0)

    def area(p):
        return 25 + 200 * (p or 0) / pmax

    with rc_context():
        fig, (ax,) = canvas.figure(height=2.2 + _legend_height(len(points) + 3))
        handles, names = [], []
        for lb, x, y, p in points:
            st = styles[lb]
            ax.scatter([x], [y], s=area(p), marker=st.marker, color=st.color,
                       facecolors="white" if st.hollow else st.color, edgecolors=st.color,
                       linewidths=1.5 if lb == reference else 0.8, zorder=3, alpha=0.9)
            handles.append(Line2D([], [], linestyle="none", marker=st.marker, color=st.color,
                                  markerfacecolor="white" if st.hollow else st.color,
                                  markersize=5))
            names.append(lb)
        front = pareto_front([(x, y) for _, x, y, _ in points])
        if len(front) > 1:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", color="#949494", linestyle="--", linewidth=0.9,
                    zorder=1)
        handles.append(Line2D([], [], color="#949494", linestyle="--", linewidth=0.9))
        names.append("Pareto front")
        for p in _size_examples(pmax):
            handles.append(Line2D([], [], linestyle="none", marker="o", color="#bbbbbb",
                                  markersize=math.sqrt(area(p))))
            names.append(f"{p / 1e6:g}M params")
        ax.set_xscale("log")
        xs = [x for _, x, _, _ in points]
        ys = [y for _, _, y, _ in points]
        ax.set_xlim(min(xs) / 1.8, max(xs) * 1.8)
        pad = max(0.1, (max(ys) - min(ys)) * 0.15)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
        plain_log_ticks(ax, "x")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_title(title)
        _legend(fig, handles, names, max_cols=3)
        return canvas.save(fig, Figure(name, f"{metric} vs {cost}, {title}: marker area ∝ "
                                             "parameters; dashed: Pareto front (no model costs "
                                             "less and scores higher)."))


def quality_vs_train_time(canvas: Canvas, rows, *, order, styles, reference, name, title,
                          metric: str, key: str) -> Figure:
    """Validation quality against training seconds, one line per model (the equal-budget
    study's time-to-quality curves)."""
    with rc_context():
        labels = _labels_in(rows, order)
        fig, (ax,) = canvas.figure(height=2.2 + _legend_height(len(labels)))
        for lb in labels:
            part = rows[rows["label"] == lb].sort_values("train_s")
            ax.plot(part["train_s"], part[key], label=lb, markersize=3.5,
                    **styles[lb].line_kw(lb == reference))
        budgets = sorted({float(b) for b in rows["time_budget_s"].dropna()})
        for b in budgets:
            ax.axvline(b, color="#949494", linestyle=":", linewidth=0.9, zorder=1)
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(metric)
        ax.set_xlim(left=0)
        ax.set_title(title)
        handles, names = ax.get_legend_handles_labels()
        _legend(fig, handles, names)
        budget = (f"; dotted: the time budget ({', '.join(f'{b:g} s' for b in budgets)})"
                  if budgets else "")
        return canvas.save(fig, Figure(name, f"{metric} on the validation images against "
                                             f"training time (data loading and steps; "
                                             f"validation and checkpoints excluded), "
                                             f"{title}{budget}."))


def largest_image(canvas: Canvas, table_rows, *, order, styles, reference, name, title: tuple
                  ) -> Figure:
    """Largest output side each model ran at on one card (bars, log2 scale); table_rows:
    [(label, largest side or None, first failing side or None)]."""
    with rc_context():
        rows = [r for r in table_rows if r[1]]
        labels = [lb for lb in order if lb in {r[0] for r in rows}]
        fig, (ax,) = canvas.figure(height=0.6 + 0.22 * max(1, len(labels)))
        side = {r[0]: r[1] for r in rows}
        for i, lb in enumerate(labels):
            st = styles[lb]
            ax.barh(i, side[lb], color=st.color, height=0.6,
                    edgecolor="black" if lb == reference else st.color)
            ax.text(side[lb] * 1.08, i, f"{side[lb]}²", va="center", fontsize=6)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(side.values()) / 4, max(side.values()) * 4)
        ax.set_xlabel("largest output side that ran (px, log2 scale)")
        ax.set_title("\n".join(title))
        return canvas.save(fig, Figure(name, f"Largest image per model on one card, "
                                             f"{', '.join(title)}: "
                                             "the biggest resolution whose measurement ended ok "
                                             "(the next size ran out of memory, hit the per-call "
                                             "time limit, or was not tried)."))


def _size_examples(pmax: float) -> list[float]:
    """Two round parameter counts for the size legend: about pmax and a tenth of it."""
    top = 10 ** math.floor(math.log10(pmax)) if pmax > 0 else 1e6
    top = max(t for t in (top, 2 * top, 5 * top) if t <= pmax) if top <= pmax else top
    return [top / 10, top] if top >= 1e6 else [top]


def headline(canvas: Canvas, flops_rows, mem_rows, *, order, styles, reference, name, title,
             mem_title) -> Figure:
    """Each other model ÷ the reference: GFLOPs (top) and peak memory (bottom) vs resolution.
    An OOM gives the lower bound card memory ÷ reference (X marker)."""
    import textwrap

    from matplotlib.lines import Line2D

    panels = 2 if mem_rows is not None else 1
    others = [lb for lb in order if lb != reference and (
        lb in set(flops_rows["label"]) or (mem_rows is not None and lb in set(mem_rows["label"])))]
    ooms = mem_rows[mem_rows["status"] == "oom"] if mem_rows is not None else None
    limit = (mem_rows["device_mem_mb"].dropna().max() if mem_rows is not None else None)
    limit = float(limit) if limit == limit and limit is not None else None
    oom_seen = bool(limit and ooms is not None and len(ooms))
    mem_head = textwrap.fill(f"(b) peak memory, {mem_title}", 42)
    with rc_context():
        fig, axes = canvas.figure(n_axes=panels, sharex=True, height=1.55 * panels + 0.3
                                  + 0.12 * mem_head.count("\n")
                                  + _legend_height(len(others) + oom_seen))
        handles = {}
        ref_fl = _ref_map(flops_rows, reference, "gflops")
        for lb in others:
            res, fl = _series(flops_rows.assign(status="ok"), lb, "gflops")
            pts = [(r, g / ref_fl[r]) for r, g in zip(res, fl) if r in ref_fl]
            if pts:
                (handles[lb],) = axes[0].plot(*zip(*pts), **styles[lb].line_kw())
        axes[0].set_ylabel(f"GFLOPs ÷\n{reference}")
        axes[0].set_title(f"(a) FLOPs, {title}", loc="left")
        if mem_rows is not None:
            ax = axes[1]
            ref_mem = _ref_map(mem_rows, reference, "mem_peak_alloc_mb")
            dodge = _dodge(ooms, others)
            for lb in others:
                res, mem = _series(mem_rows, lb, "mem_peak_alloc_mb")
                pts = [(r, m / ref_mem[r]) for r, m in zip(res, mem) if r in ref_mem]
                if pts:
                    (h,) = ax.plot(*zip(*pts), **styles[lb].line_kw())
                    handles.setdefault(lb, h)
                for r in sorted(ooms[ooms["label"] == lb]["res"].astype(int)):
                    if r not in ref_mem or not limit:
                        continue
                    bound = limit / ref_mem[r]
                    if pts:  # dotted: runs into the card's memory
                        ax.plot([pts[-1][0], r * dodge[(lb, r)]], [pts[-1][1], bound],
                                color=styles[lb].color, linestyle=":", linewidth=1.0, zorder=1)
                    ax.plot([r * dodge[(lb, r)]], [bound], linestyle="none", marker=OOM_MARKER,
                            markersize=7, color=styles[lb].color, markeredgecolor="black",
                            markeredgewidth=0.6, zorder=4)
            ax.set_ylabel(f"peak memory ÷\n{reference}")
            ax.set_title(mem_head, loc="left")
        for ax in axes:
            ax.set_yscale("log")
            ax.axhline(1.0, color="#949494", linestyle="--", linewidth=0.8, zorder=1)
        _res_axis(axes[-1], flops_rows["res"])
        for ax in axes:
            plain_log_ticks(ax)
            ax.label_outer()
        labels = [lb for lb in order if lb in handles]
        hs = [handles[lb] for lb in labels]
        if oom_seen:
            hs.append(Line2D([], [], linestyle="none", marker=OOM_MARKER, markersize=7,
                             color="white", markeredgecolor="black"))
            labels.append("OOM (≥ card memory ÷ ref.)")
        _legend(fig, hs, labels)
        memory = f" and peak memory (b, {mem_title})" if mem_rows is not None else ""
        return canvas.save(fig, Figure(name, f"Other models' FLOPs (a){memory} as multiples of "
                                             f"{reference}'s, vs output resolution, {title} "
                                             f"(> 1: {reference} needs less; dashed: parity)."))


def _ref_map(rows, reference, key) -> dict[int, float]:
    part = rows[(rows["label"] == reference) & rows[key].notna()]
    if "status" in part and key != "gflops":
        part = part[part["status"] == "ok"]
    return {int(r): float(v) for r, v in zip(part["res"], part[key]) if float(v) > 0}
