"""`bench report`: tables and figures for a paper from results files, in one folder.

    build_report(["results/h100.jsonl"], "reports/h100", reference="serpent_s")

writes reports/h100/{README.md, tables/*.{md,tex,csv}, figures/*.{pdf,png,svg}}. The folder is
built next to its destination and renamed into place only when complete, so a failure never
leaves a half report that looks finished. Card-dependent numbers are split per `device_name`.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import UsageError
from bench.files import slug
from bench.report.data import (SETTING_KEYS, ReportData, base_model, matches, parse_filters,
                               prepare)
from bench.report.figures import (Canvas, gflops_vs_res, headline, largest_image,
                                  memory_vs_res, model_styles, quality_vs_cost,
                                  quality_vs_train_time, throughput_vs_res)
from bench.report.tables import (METRICS, Table, efficiency_table, fmt, num, quality_table,
                                 to_csv, to_latex, to_markdown)

FORMATS = ("pdf", "png", "svg")
MARKER_FILE = ".bench-report"  # marks a folder this command may replace
CARD_METRICS = ("latency", "throughput", "memory", "activation_memory")
MEMORY_METRICS = ("memory", "activation_memory")
LARGEST_FROM = 2048  # a setting swept to this side gets a "largest image per model" table


@dataclass
class Section:
    title: str
    intro: str = ""
    items: list = field(default_factory=list)  # Table | Figure, in display order


@dataclass
class Report:
    out: Path
    sections: list[Section]
    files: list[str]  # relative to `out`


def command_line(paths, out, *, reference=None, filters=(), formats=FORMATS, dpi=300,
                 headline_filters=(), flops_res=None) -> str:
    """The `bench report` invocation equivalent to these arguments (quoted for a shell)."""
    args = ["bench", "report", *map(str, paths), "--out", str(out)]
    if reference:
        args += ["--relative-to", reference]
    for f in filters:
        args += ["--filter", f]
    for f in headline_filters:
        args += ["--headline", f]
    if flops_res:
        args += ["--flops-res", str(flops_res)]
    if tuple(formats) != FORMATS:
        args += ["--formats", ",".join(formats)]
    if dpi != 300:
        args += ["--dpi", str(dpi)]
    return shlex.join(args)


def parse_formats(spec: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(s.strip().lower() for s in spec.split(",") if s.strip()))
    bad = [s for s in items if s not in FORMATS]
    if bad or not items:
        raise UsageError(f"--formats: unknown {', '.join(bad) or repr(spec)}; "
                         f"choose from {','.join(FORMATS)}")
    return items


def build_report(paths, out, *, reference: str | None = None, filters=(), formats=FORMATS,
                 dpi: int = 300, headline_filters=(), flops_res: int | None = None) -> Report:
    """Load, filter, tabulate, plot, and write the report folder atomically."""
    out = Path(out)
    formats = tuple(formats)
    if dpi < 20:
        raise UsageError(f"--dpi {dpi} is too small for a readable figure (use 100-600)")
    _check_replaceable(out)
    data = prepare(paths, filters, reference)
    command = command_line(paths, out, reference=reference, filters=filters, formats=formats,
                           dpi=dpi, headline_filters=headline_filters, flops_res=flops_res)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sections = _build(data, stage, formats, dpi, headline_filters, flops_res)
        table_files = _write_tables(sections, stage / "tables")
        readme = render_readme(out.name, data, sections, command, paths, formats)
        (stage / "README.md").write_text(readme, encoding="utf-8")
        (stage / MARKER_FILE).write_text(command + "\n", encoding="utf-8")
        figure_files = [f for s in sections for it in s.items if not isinstance(it, Table)
                        for f in it.files]
        _swap_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return Report(out=out, sections=sections,
                  files=sorted(["README.md", *table_files, *figure_files]))


# ----------------------------------------------------------------------------- assembling


def _task_text(task, scale) -> str:
    return f"{task} ×{int(scale)}"


def _task_slug(task, scale) -> str:
    return f"{task}-x{int(scale)}" if task == "sr" else str(task)


def setting_text(s: dict) -> str:
    mode = {"infer": "inference", "train": "training step"}.get(s["mode"], s["mode"])
    parts = [_task_text(s["task"], s["scale"]), s["dtype"], mode, f"batch {int(s['batch'])}"]
    if s.get("compile"):
        parts.append("torch.compile")
    if s.get("channels_last"):
        parts.append("channels_last")
    if s.get("cuda_graph"):
        parts.append("CUDA graph")
    return ", ".join(parts)


def setting_slug(s: dict) -> str:
    return slug(_task_slug(s["task"], s["scale"]), s["dtype"], s["mode"], f"b{int(s['batch'])}",
                "compile" if s.get("compile") else "", "cl" if s.get("channels_last") else "",
                "graph" if s.get("cuda_graph") else "")


def flops_rows(eff, task, scale):
    """One row per (label, res) for card-independent numbers: the latest row that has FLOPs."""
    part = eff[(eff["task"] == task) & (eff["scale"] == scale)]
    part = part.assign(_has=part["gflops"].notna()).sort_values(["_has", "time"], kind="stable")
    return part.drop_duplicates(["label", "res"], keep="last").drop(columns="_has")


def _card_groups(eff):
    """(setting dict, card, rows) for every run-wide setting on every card."""
    for key, rows in eff.groupby([*SETTING_KEYS, "device_name"], sort=True, dropna=False):
        yield dict(zip(SETTING_KEYS, key[:-1])), key[-1], rows


def _has(rows, metric) -> bool:
    return bool(rows[METRICS[metric].key].notna().any())


def _build(data: ReportData, stage: Path, formats, dpi, headline_filters, flops_res):
    eff, qual, ref = data.eff, data.qual, data.reference
    styles = model_styles(data.order)
    canvas = Canvas(stage / "figures", formats, dpi)
    kw = {"order": data.order, "styles": styles, "reference": ref}
    tasks = sorted({(t, int(s)) for t, s in zip(eff["task"], eff["scale"])}) if len(eff) else []
    head = Section("Headline", f"What {ref} saves against every other model, per resolution."
                   if ref else "")
    flops = Section("FLOPs and parameters", "Counted on meta tensors; independent of the card.")
    cards = Section("Latency, throughput and peak memory",
                    "Measured per card; rows from different cards are never mixed.")
    quality = Section("Quality")
    training = Section("Training curves", "Validation quality against training time (the "
                       "clock counts data loading and optimizer steps; validation and "
                       "checkpoints are timed apart), from `bench train` validation rows.")
    largest = Section("Largest image per model", "The biggest output each model ran at on one "
                      "card, per setting, and what stopped the next size.")
    groups = list(_card_groups(eff)) if len(eff) else []
    heads = _headline_memory(groups, tasks, ref, headline_filters) if ref else {}
    for task, scale in tasks:
        rows = flops_rows(eff, task, scale)
        if not rows["gflops"].notna().any():
            continue
        ts = _task_slug(task, scale)
        flops.items.append(efficiency_table(
            rows, METRICS["gflops"], name=f"flops_{ts}", reference=ref, order=data.order,
            title=f"Parameters and forward GFLOPs per image, {_task_text(task, scale)}"))
        flops.items.append(gflops_vs_res(canvas, rows, name=f"gflops_vs_res_{ts}",
                                         title=_task_text(task, scale), **kw))
    for setting, card, rows in groups:
        stem = f"{setting_slug(setting)}_{slug(card)}"
        label = f"{setting_text(setting)} — {card}"
        # a CUDA-graph row's memory is what the capture allocated, not a peak during replay
        graph = bool(setting.get("cuda_graph"))
        for metric in CARD_METRICS:
            if _has(rows, metric) and not (graph and metric in MEMORY_METRICS):
                m = METRICS[metric]
                unit = f" ({m.unit})" if m.unit else ""
                cards.items.append(efficiency_table(
                    rows, m, name=f"{metric}_{stem}", reference=ref, order=data.order,
                    title=f"{m.name.capitalize()}{unit}, {label}"))
        if _has(rows, "memory") and not graph:
            cards.items.append(memory_vs_res(canvas, rows, name=f"memory_vs_res_{stem}",
                                             title=(setting_text(setting), card), **kw))
        if _has(rows, "throughput"):
            cards.items.append(throughput_vs_res(canvas, rows, name=f"throughput_vs_res_{stem}",
                                                 title=(setting_text(setting), card), **kw))
    for (task, scale), mem in heads.items():
        rows = flops_rows(eff, task, scale)
        if (rows["label"] == ref).any() and rows["gflops"].notna().any():
            mem_title = ""
            if mem:
                setting, card, _ = mem
                mem_title = setting_text(setting).split(", ", 1)[1] + f", {card}"
            head.items.append(headline(
                canvas, rows, mem[2] if mem else None, name=f"headline_{_task_slug(task, scale)}",
                title=_task_text(task, scale), mem_title=mem_title, **kw))
        if rows["res"].max() >= LARGEST_FROM:
            _largest(largest, canvas, rows, setting, card, kw)
    if len(qual):
        _quality(quality, canvas, data, styles, flops_res)
    if len(data.val):
        _training(training, canvas, data, styles)
    return [s for s in (head, flops, cards, largest, quality, training) if s.items]


def _headline_memory(groups, tasks, ref, headline_filters) -> dict:
    """{(task, scale): (setting, card, rows) or None}: the memory setting each headline shows.
    --headline filters narrow the choice; then inference first, the setting covering the most
    models, the smallest batch (deterministic)."""
    wanted = parse_filters(headline_filters)
    cands: dict = {t: [] for t in tasks}
    for setting, card, rows in groups:
        info = {**setting, "device_name": card}
        task = (setting["task"], int(setting["scale"]))
        if task not in cands or not _has(rows, "memory"):
            continue
        if not all(matches(info.get(k), v) for k, v in wanted.items()):
            continue
        ok = rows[rows["mem_peak_alloc_mb"].notna() | (rows["status"] == "oom")]
        if (ok["label"] == ref).any() and ok["label"].nunique() >= 2:
            key = (setting["mode"] != "infer", -ok["label"].nunique(), int(setting["batch"]),
                   str(setting["dtype"]), str(card))
            cands[task].append((key, (setting, card, rows)))
    if wanted and not any(cands.values()):
        raise UsageError(f"--headline {' '.join(headline_filters)}: no memory rows of {ref} and "
                         f"another model match (keys: {', '.join(SETTING_KEYS)}, device_name)")
    return {t: min(c, key=lambda x: x[0])[1] if c else None for t, c in cands.items()}


def _network(label: str) -> str:
    """The label of the network a label measures: an alias (nafnet = nafnet_w64, serpent =
    serpent_s) maps to its network, so quality rows under one name meet cost rows under the
    other. Labels that are not registered models (input) stay as they are."""
    from bench.registry import model_info

    base = base_model(label)
    try:
        target = model_info(base).alias_of
    except UsageError:
        return label
    return target + label[len(base):] if target else label


def _cost_rows(eff, task, scale, res) -> dict:
    """{(card, network label): inference row at `res`, batch 1, no compile/graph/channels_last},
    bf16 preferred (the study's precision), else fp32: what the quality-vs-latency figure
    plots."""
    part = eff[(eff["task"] == task) & (eff["scale"] == scale) & (eff["res"] == res)
               & (eff["mode"] == "infer") & (eff["batch"] == 1) & (eff["status"] == "ok")
               & ~eff["compile"] & ~eff["channels_last"] & ~eff["cuda_graph"]
               & eff["latency_ms_median"].notna()]
    out = {}
    for r in part.sort_values("dtype", key=lambda s: s != "bf16").to_dict("records"):
        out.setdefault((r["device_name"], _network(r["label"])), r)
    return out


def _quality(section: Section, canvas: Canvas, data: ReportData, styles, flops_res):
    qual, eff = data.qual, data.eff
    tasks = qual.groupby(["task", "scale", "degradation"], sort=True)
    several = qual.groupby(["task", "scale"])["degradation"].nunique()
    for (task, scale, degr), rows in tasks:
        ts = _task_slug(task, scale)
        if several[(task, scale)] > 1:
            ts = slug(ts, degr)
        title = f"Quality, {_task_text(task, scale)}" + (f" ({degr})" if degr else "")
        section.items.append(quality_table(rows, order=data.order, name=f"quality_{ts}",
                                           title=title))
        fl = flops_rows(eff, task, scale) if len(eff) else None
        if fl is None or not fl["gflops"].notna().any():
            continue
        avail = sorted(int(r) for r in fl.loc[fl["gflops"].notna(), "res"].unique())
        if flops_res is not None and flops_res not in avail:
            raise UsageError(f"--flops-res {flops_res}: no GFLOPs rows at that resolution for "
                             f"{_task_text(task, scale)}; available: {avail}")
        res = flops_res or (256 if 256 in avail else avail[0])
        cost = {_network(r["label"]): r for r in fl[fl["res"] == res].to_dict("records")}
        latency = _cost_rows(eff, task, scale, res)
        cards = sorted({card for card, _ in latency})
        metric_key = "psnr_y" if task == "sr" else "psnr"
        metric = "PSNR-Y (dB)" if task == "sr" else "PSNR (dB)"
        for ds, part in rows.groupby("dataset", sort=True):
            scored = [(lb, q) for lb, q in zip(part["label"], part[metric_key].map(num))
                      if q is not None]
            points = [(lb, cost[_network(lb)]["gflops"], q, num(cost[_network(lb)]["params"]))
                      for lb, q in scored
                      if _network(lb) in cost and num(cost[_network(lb)]["gflops"])]
            where = f"{_task_text(task, scale)}, {ds}"
            if len(points) >= 2:
                section.items.append(quality_vs_cost(
                    canvas, points, styles=styles, reference=data.reference,
                    name=f"quality_vs_gflops_{ts}_{slug(ds)}", title=where, metric=metric,
                    cost="GFLOPs", xlabel=f"GFLOPs per image at {res}×{res} (log scale)"))
            for card in cards:
                pts = [(lb, r["latency_ms_median"], q, num(r["params"])) for lb, q in scored
                       if (r := latency.get((card, _network(lb))))]
                if len(pts) < 2:
                    continue
                dtype = {latency[(card, _network(lb))]["dtype"] for lb, *_ in pts}
                section.items.append(quality_vs_cost(
                    canvas, pts, styles=styles, reference=data.reference,
                    name=f"quality_vs_latency_{ts}_{slug(ds)}_{slug(card)}",
                    title=f"{where}, {card}", metric=metric, cost="measured latency",
                    xlabel=f"{'/'.join(sorted(dtype))} inference latency at {res}×{res} (ms, "
                           "log scale)"))


def _training(section: Section, canvas: Canvas, data: ReportData, styles):
    """Time-to-quality curves and the final validation of each run, per task and card."""
    val = data.val
    keys = ["task", "scale", "degradation", "val_sets", "device_name"]
    for (task, scale, degr, sets, card), rows in val.groupby(keys, sort=True):
        key = "psnr_y" if task == "sr" and "psnr_y" in rows and rows["psnr_y"].notna().any() \
            else ("psnr" if "psnr" in rows and rows["psnr"].notna().any() else "val_psnr")
        metric = {"psnr_y": "PSNR-Y (dB)", "psnr": "PSNR (dB)", "val_psnr": "PSNR (dB)"}[key]
        where = f"{_task_text(task, scale)}, validation on {sets}, {card}"
        stem = slug(_task_slug(task, scale), sets, card)
        section.items.append(quality_vs_train_time(
            canvas, rows, order=data.order, styles=styles, reference=data.reference,
            name=f"train_curve_{stem}", title=where, metric=metric, key=key))
        headers = ["model", "budget (s)", "training (s)", "validation (s)", "iterations",
                   "images seen", *[m for m in ("psnr", "ssim", "psnr_y", "ssim_y")
                                     if m in rows and rows[m].notna().any()]]
        cells, values = [], []
        for lb in [lb for lb in data.order if lb in set(rows["label"])]:
            last = rows[rows["label"] == lb].sort_values("train_s").iloc[-1]
            vals = [lb, num(last.get("time_budget_s")), num(last["train_s"]),
                    num(last.get("val_s")), int(last["iteration"]), int(last["images_seen"]),
                    *[num(last[m]) for m in headers[6:]]]
            values.append(vals)
            cells.append([vals[0], *[fmt(v) if isinstance(v, float) or v is None else str(v)
                                     for v in vals[1:]]])
        section.items.append(Table(
            f"train_final_{stem}", f"Last validation of each run, {where}", headers, cells,
            values, footnotes=["Scores: pyiqa PSNR/SSIM on RGB and on Y (BT.601), outputs "
                               "clamped and quantized to 8 bits; validation images are whole."]))


def _largest(section: Section, canvas: Canvas, rows, setting: dict, card: str, kw: dict):
    """Largest side each model ran at in this setting on this card, and what stopped the
    next size (an OOM row, an error such as the per-call time limit, or not tried)."""
    where = f"{setting_text(setting)}, {card}"
    table, cells, values = [], [], []
    for lb in [lb for lb in kw["order"] if lb in set(rows["label"])]:
        mine = rows[rows["label"] == lb].sort_values("res")
        ok = mine[mine["status"] == "ok"]
        big = int(ok["res"].max()) if len(ok) else None
        after = mine[(mine["res"] > (big or 0)) & (mine["status"] != "ok")]
        stop = after.iloc[0] if len(after) else None
        at = ok[ok["res"] == big].iloc[0] if big else None
        why = (f"{int(stop['res'])}: {stop['status']}" + (f" ({str(stop['message'])[:60]})"
               if stop["status"] in ("error", "skipped") and stop.get("message") else "")
               if stop is not None else "larger not tried")
        vals = [lb, big, num(at["latency_ms_median"]) if at is not None else None,
                num(at["mem_peak_alloc_mb"]) / 1024 if at is not None and
                num(at["mem_peak_alloc_mb"]) else None, why]
        values.append(vals)
        cells.append([lb, f"{big}²" if big else "none", fmt(vals[2]), fmt(vals[3]), why])
        table.append((lb, big, int(stop["res"]) if stop is not None else None))
    stem = f"{setting_slug(setting)}_{slug(card)}"
    section.items.append(Table(
        f"largest_{stem}", f"Largest image per model, {where}",
        ["model", "largest side that ran", "latency there (ms)", "peak memory there (GiB)",
         "next size"], cells, values,
        footnotes=["A size 'ran' when its row ended ok; the sweep stops growing a model at its "
                   "first OOM, or when one call exceeds the per-call time limit."]))
    section.items.append(largest_image(canvas, table, name=f"largest_{stem}",
                                       title=(setting_text(setting), card), **kw))


# ----------------------------------------------------------------------------- writing


def _write_tables(sections, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for table in (it for s in sections for it in s.items if isinstance(it, Table)):
        for ext, render in (("md", to_markdown), ("tex", to_latex), ("csv", to_csv)):
            (folder / f"{table.name}.{ext}").write_text(render(table), encoding="utf-8")
            files.append(f"tables/{table.name}.{ext}")
    return files


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / MARKER_FILE).exists())):
        raise UsageError(f"--out {out} exists and is not a folder written by bench report; "
                         "choose another --out or remove it")


def _swap_into_place(stage: Path, out: Path) -> None:
    """Rename the finished folder into place; an older report is moved aside, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(stage, out)
    except OSError:
        if old is not None:
            os.rename(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _uniq(series) -> str:
    vals = sorted({str(v) for v in series if v is not None and v == v and str(v) != ""})
    return ", ".join(vals) if vals else "n/a"


def environment_table(raw) -> str:
    """Per card: memory, driver, torch, CUDA, mamba-ssm, scan backends, commits, hosts, rows."""
    from tabulate import tabulate

    def col(part, c):
        return _uniq(part[c]) if c in part.columns else "n/a"

    def span(part):
        times = sorted(str(t)[:16] for t in part.get("time", []) if isinstance(t, str) and t)
        return f"{times[0]} … {times[-1]}" if times else "n/a"

    body = []
    cards = raw["device_name"] if "device_name" in raw else raw["kind"].map(lambda _: None)
    for card, part in raw.groupby(cards.fillna("unknown device"), sort=True):
        mem = part["device_mem_mb"].dropna() if "device_mem_mb" in part else []
        kinds = ", ".join(f"{n} {k}" for k, n in part["kind"].value_counts().sort_index().items())
        body.append([card, f"{float(max(mem)) / 1024:.1f}" if len(mem) else "n/a",
                     col(part, "driver"), col(part, "torch"), col(part, "cuda"),
                     col(part, "mamba_ssm"), col(part, "scan_backend"),
                     col(part, "git_commit"), col(part, "host"), kinds, span(part)])
    return tabulate(body, headers=["card", "memory (GiB)", "driver", "torch", "CUDA", "mamba-ssm",
                                   "scan backend", "git commit", "host", "rows", "time (UTC)"],
                    tablefmt="github", disable_numparse=True)


SERPENT_NOTE = ("Serpent (serpent, serpent_t/s/b) is this project's reading of arXiv 2403.17902: "
                "the authors' code and weights cannot be reached from our machines, so every "
                "Serpent number here is of our implementation (serpent/MODEL_CARD.md).")


def render_readme(name: str, data: ReportData, sections, command: str, paths, formats) -> str:
    lines = [f"# Benchmark report: {name}", "",
             "Generated by serpent-bench from the results files below with:", "",
             "```sh", command, "```", "",
             "Tables: `tables/` (Markdown, LaTeX booktabs, CSV). Figures: `figures/` "
             f"({', '.join(f.upper() for f in formats)}; one color and marker per model "
             "throughout)."]
    if data.reference:
        lines += ["", f"Ratios are relative to **{data.reference}** (model ÷ {data.reference} "
                      "at the same resolution)."]
    if "model" in data.raw and data.raw["model"].astype(str).str.startswith("serpent").any():
        lines += ["", SERPENT_NOTE]
    lines += ["", "## Environment", "", environment_table(data.raw), "",
              "| results file | rows | sha256 (12) |", "|---|---:|---|"]
    counts = data.raw["source"].value_counts()
    for p in paths:
        lines.append(f"| `{p}` | {int(counts.get(str(p), 0))} | `{_sha(p)}` |")
    for section in sections:
        lines += ["", f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        for it in section.items:
            if isinstance(it, Table):
                lines += [to_markdown(it).rstrip(), "",
                          f"<sub>Files: [md](tables/{it.name}.md) · "
                          f"[tex](tables/{it.name}.tex) · [csv](tables/{it.name}.csv)</sub>", ""]
            else:
                shown = next((f for f in it.files if f.endswith(".png")),
                             next((f for f in it.files if f.endswith(".svg")), None))
                if shown:
                    lines.append(f"![{it.name}]({shown})")
                lines += ["", f"*{it.caption}* " + " · ".join(
                    f"[{f.rsplit('.', 1)[1]}]({f})" for f in it.files), ""]
    lines += ["## Notes", "",
              "- FLOPs: one forward pass of one image, 1 multiply-add = 2 FLOPs; params and FLOPs "
              "do not depend on the card.",
              "- Latency: median of the timed iterations after warm-up (CUDA events on a GPU, "
              "time.perf_counter on a CPU); "
              "throughput = batch ÷ median. Peak memory: max allocated after warm-up.",
              "- Cells: OOM = out of memory on that card; n/a = not measured or unavailable "
              "(footnotes say which); – = configuration not in the results."]
    lines += [f"- {n}" for n in data.notes]
    return "\n".join(lines) + "\n"
