"""`bench report` on tests/fixtures/results_small.jsonl (numbers in make_results_small.py).

Expected values are computed by hand from the fixture's round numbers, not by the report code.
"""
import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from bench.cli import main
from bench.errors import UsageError
from bench.report.build import _card_groups, _headline_memory, build_report
from bench.report.data import apply_filters, load_rows, parse_filters, prepare
from bench.report.figures import model_styles, pareto_front, scaling_exponent
from bench.report.tables import METRICS, efficiency_table

FIXTURE = Path(__file__).parent / "fixtures" / "results_small.jsonl"
H100 = "nvidia-h100-80gb-hbm3"
H100_MEM_MB = 81559.0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "small"
    return build_report([str(FIXTURE)], out, formats=("png",), dpi=40)  # PDF/SVG: below


def _csv(report, name):
    text = (report.out / "tables" / f"{name}.csv").read_text()
    return {row["model"]: row for row in csv.DictReader(io.StringIO(text))}


def _md_rows(report, name):
    """Markdown table body as {model: [cells]}."""
    lines = (report.out / "tables" / f"{name}.md").read_text().splitlines()
    rows = [ln for ln in lines if ln.startswith("|") and not ln.startswith("|--")][1:]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    return {c[0]: c[1:] for c in cells}


def test_every_table_and_figure_is_written_and_non_empty(report):
    out = report.out
    expected_tables = {"flops_deblur", "flops_sr-x8", "quality_deblur", "quality_sr-x8"} | {
        f"{m}_deblur_bf16_{mode}_b1_{card}"
        for m in ("latency", "throughput", "memory", "activation_memory")
        for mode, card in (("infer", H100), ("train", H100), ("infer", "nvidia-h200"))}
    expected_figures = {"gflops_vs_res_deblur", "gflops_vs_res_sr-x8", "headline_deblur",
                        "headline_sr-x8", "quality_vs_gflops_deblur_kodak24",
                        "quality_vs_gflops_deblur_cbsd68", "quality_vs_gflops_sr-x8_set14"} | {
        f"{f}_vs_res_deblur_bf16_{mode}_b1_{card}" for f in ("memory", "throughput")
        for mode, card in (("infer", H100), ("train", H100), ("infer", "nvidia-h200"))} | {
        f"quality_vs_latency_deblur_{ds}_{card}" for ds in ("kodak24", "cbsd68")
        for card in (H100, "nvidia-h200")}
    tables = {p.stem for p in (out / "tables").iterdir()}
    figures = {p.stem for p in (out / "figures").iterdir()}
    assert tables == expected_tables
    assert figures == expected_figures
    for stem in expected_tables:
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{stem}.{ext}").stat().st_size > 100
    for stem in expected_figures:
        png = (out / "figures" / f"{stem}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    readme = (out / "README.md").read_text()
    for stem in expected_figures:
        assert f"](figures/{stem}.png)" in readme
    for stem in expected_tables:
        assert f"(tables/{stem}.tex)" in readme
    # environment and the exact command
    assert f"bench report {FIXTURE} --out {out}" in readme
    for text in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "2.5.1+cu124", "12.4", "a1b2c3d4e5f6"):
        assert text in readme
    assert "reading of arXiv 2403.17902" in readme  # the fixture has Serpent rows
    assert sorted(report.files) == sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                          if p.is_file() and p.name != ".bench-report")


def test_flops_ratios_and_params(report):
    rows = _csv(report, "flops_deblur")
    # fixture GFLOPs at 256/512/1024: serpent_s 10/40/160, swinir 750/3000/12000,
    # restormer 141/564/2256, serpent_t 4/16/64
    for res in (256, 512, 1024):
        assert float(rows["swinir"][f"vs serpent_s @{res}²"]) == pytest.approx(75.0)
        assert float(rows["restormer"][f"vs serpent_s @{res}²"]) == pytest.approx(14.1)
        assert float(rows["serpent_t"][f"vs serpent_s @{res}²"]) == pytest.approx(0.4)
        assert float(rows["serpent_s"][f"vs serpent_s @{res}²"]) == 1.0
    assert float(rows["swinir"]["GFLOPs @1024²"]) == 12000
    assert float(rows["nafnet_w64"]["params (M)"]) == pytest.approx(67.89)
    # FLOPs do not depend on the card, so an OOM row still shows them
    md = _md_rows(report, "flops_deblur")
    assert md["swinir"][:3] == ["11.8", "750", "75.0×"]
    assert md["serpent_t"][2] == "0.400×"
    sr = _csv(report, "flops_sr-x8")  # a FLOPs-only CPU sweep: SR x8 numbers of its own
    assert float(sr["swinir"]["vs serpent_s @512²"]) == pytest.approx(48 / 10)


def test_card_tables_ratios_oom_and_error(report):
    lat = _csv(report, f"latency_deblur_bf16_infer_b1_{H100}")
    assert float(lat["mambair"]["vs serpent_s @512²"]) == pytest.approx(120 / 6)
    # restormer @1024 failed once, then a retry succeeded: the result wins over the error
    assert float(lat["restormer"]["latency (ms) @1024²"]) == 200
    md = _md_rows(report, f"latency_deblur_bf16_infer_b1_{H100}")
    assert md["mambair"][4:] == ["error", "n/a"]
    text = (report.out / "tables" / f"latency_deblur_bf16_infer_b1_{H100}.md").read_text()
    assert "error: mambair @1024²: RuntimeError: selective_scan_cuda" in text
    # a variant with overrides is its own row, not merged with swinir
    assert float(lat["swinir [attn_impl=math]"]["latency (ms) @256²"]) == 55
    assert float(lat["swinir"]["latency (ms) @256²"]) == 40

    thr = _csv(report, f"throughput_deblur_bf16_train_b1_{H100}")
    assert float(thr["swinir"]["vs serpent_s @256²"]) == pytest.approx((1000 / 150) / (1000 / 8))
    md = _md_rows(report, f"throughput_deblur_bf16_train_b1_{H100}")
    assert md["swinir"][4:] == ["OOM", "OOM"]

    mem = _csv(report, f"memory_deblur_bf16_train_b1_{H100}")
    assert float(mem["restormer"]["vs serpent_s @1024²"]) == pytest.approx(70000 / 12800)
    assert float(mem["restormer"]["peak memory (GiB) @1024²"]) == pytest.approx(70000 / 1024)
    md = _md_rows(report, f"memory_deblur_bf16_train_b1_{H100}")
    bound = H100_MEM_MB / 12800  # OOM: needs more than the whole card
    assert md["swinir"][4:] == ["OOM", f">{bound:.2f}×"]
    text = (report.out / "tables" / f"memory_deblur_bf16_train_b1_{H100}.md").read_text()
    assert "OOM: out of memory on this card" in text
    tex = (report.out / "tables" / f"memory_deblur_bf16_train_b1_{H100}.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "serpent\\_s" in tex and "$\\times$" in tex and "_s" not in tex.replace("\\_s", "")
    assert "\\multicolumn{2}{c}{1024$\\times$1024}" in tex and tex.isascii()


def test_two_cards_are_split_never_averaged(report):
    h100 = _csv(report, f"latency_deblur_bf16_infer_b1_{H100}")
    h200 = _csv(report, "latency_deblur_bf16_infer_b1_nvidia-h200")
    assert float(h100["serpent_s"]["latency (ms) @256²"]) == 2.0
    assert float(h200["serpent_s"]["latency (ms) @256²"]) == 1.6
    assert float(h200["swinir"]["latency (ms) @512²"]) == 120
    assert float(h200["swinir"]["vs serpent_s @512²"]) == pytest.approx(120 / 5)
    assert set(h200) == {"serpent_s", "swinir"}
    title = (report.out / "tables" / "latency_deblur_bf16_infer_b1_nvidia-h200.md").read_text()
    assert "NVIDIA H200" in title.splitlines()[0] and "H100" not in title
    # the table builder itself refuses a mix
    data = prepare([str(FIXTURE)])
    mixed = data.eff[(data.eff["mode"] == "infer") & (data.eff["task"] == "deblur")]
    with pytest.raises(ValueError, match="mix cards"):
        efficiency_table(mixed, METRICS["latency"], order=data.order, reference="serpent_s",
                         name="x", title="x")


def test_quality_table_na_budget_and_best(report):
    md = _md_rows(report, "quality_sr-x8")
    assert md["input (degraded)"] == ["22.30", "0.5700", "n/a", "—"]
    assert md["serpent_s"] == ["25.10", "0.6600", "n/a", "20,000 it, batch 8, crop 128²"]
    assert md["swinir"][:2] == ["**25.40**", "**0.6700**"]  # best PSNR-Y / SSIM-Y
    text = (report.out / "tables" / "quality_sr-x8.md").read_text()
    assert "n/a: LPIPS unavailable: LPIPS weights not in the local cache" in text
    deblur = _md_rows(report, "quality_deblur")
    # per-image rows (29.4 / 27.4) are ignored because the mean row (28.40) exists
    assert deblur["serpent_s"][3:6] == ["28.40", "0.8120", "0.2210"]
    assert deblur["restormer"][5] == "**0.2050**"  # LPIPS: lower is better


def test_reference_choice(tmp_path):
    data = prepare([str(FIXTURE)], reference="swinir")
    assert data.reference == "swinir"
    t = efficiency_table(data.eff[data.eff["task"] == "sr"].drop_duplicates(["label", "res"]),
                         METRICS["gflops"], order=data.order, reference="swinir", name="x",
                         title="x")
    row = dict(zip(t.headers, t.values[[v[0] for v in t.values].index("serpent_s")]))
    assert row["vs swinir @256²"] == pytest.approx(2.5 / 12)
    no_ref = prepare([str(FIXTURE)], filters=["model=swinir,restormer"])
    assert no_ref.reference is None and any("--relative-to" in n for n in no_ref.notes)
    with pytest.raises(UsageError, match="no rows for that model"):
        prepare([str(FIXTURE)], reference="serpent_xl")


def test_headline_memory_setting():
    data = prepare([str(FIXTURE)])
    groups = list(_card_groups(data.eff))
    tasks = [("deblur", 1), ("sr", 8)]

    def pick(*filters):
        return {t: (m[0]["mode"], m[1]) if m else None
                for t, m in _headline_memory(groups, tasks, "serpent_s", filters).items()}

    # default: inference, on the card whose rows cover the most models; SR has no memory rows
    assert pick() == {("deblur", 1): ("infer", "NVIDIA H100 80GB HBM3"), ("sr", 8): None}
    assert pick("mode=train")[("deblur", 1)] == ("train", "NVIDIA H100 80GB HBM3")
    assert pick("device_name=*H200")[("deblur", 1)] == ("infer", "NVIDIA H200")
    with pytest.raises(UsageError, match="--headline"):
        pick("dtype=fp16")


def test_filters():
    rows = load_rows([str(FIXTURE)])
    h200 = apply_filters(rows, parse_filters(["device_name=NVIDIA H200"]))
    assert set(h200["device_name"]) == {"NVIDIA H200"}
    globbed = apply_filters(rows, parse_filters(["model=serpent*,swinir", "res=512"]))
    eff = globbed[globbed["kind"] == "efficiency"]
    assert set(eff["model"]) == {"serpent_s", "serpent_t", "swinir"} and set(eff["res"]) == {512}
    # a key only narrows the kinds of rows that have it: quality rows have no `mode`
    train = apply_filters(rows, parse_filters(["mode=train"]))
    assert set(train.loc[train["kind"] == "efficiency", "mode"]) == {"train"}
    assert (train["kind"] == "quality").sum() == (rows["kind"] == "quality").sum()
    assert len(apply_filters(rows, parse_filters(["compile=false"]))) == len(rows)
    with pytest.raises(UsageError, match="no column"):
        apply_filters(rows, parse_filters(["colour=red"]))
    with pytest.raises(UsageError, match="no rows left"):
        apply_filters(rows, parse_filters(["model=nothing"]))
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_filters(["model"])


def test_cli_filter_run_pdf_svg(tmp_path, capsys):
    out = tmp_path / "h200"
    with pytest.raises(SystemExit) as e:
        main(["report", str(FIXTURE), "--out", str(out), "--filter", "device_name=NVIDIA H200",
              "--filter", "kind=efficiency", "--formats", "pdf,svg", "--dpi", "30"])
    assert e.value.code == 0
    tables = sorted(p.name for p in (out / "tables").glob("*.md"))
    assert tables == ["activation_memory_deblur_bf16_infer_b1_nvidia-h200.md", "flops_deblur.md",
                      "latency_deblur_bf16_infer_b1_nvidia-h200.md",
                      "memory_deblur_bf16_infer_b1_nvidia-h200.md",
                      "throughput_deblur_bf16_infer_b1_nvidia-h200.md"]
    stems = {"gflops_vs_res_deblur", "headline_deblur",
             "memory_vs_res_deblur_bf16_infer_b1_nvidia-h200",
             "throughput_vs_res_deblur_bf16_infer_b1_nvidia-h200"}
    assert {p.stem for p in (out / "figures").iterdir()} == stems
    for stem in stems:
        assert (out / "figures" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in (out / "figures" / f"{stem}.svg").read_bytes()[:2000]
        assert not (out / "figures" / f"{stem}.png").exists()
    readme = (out / "README.md").read_text()
    assert "--filter 'device_name=NVIDIA H200'" in readme and "H100" not in readme
    assert "written to" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--relative-to", "serpent_xl"], "no rows for that model"),
    (["--filter", "model=none"], "no rows left"),
    (["--formats", "png,jpg"], "--formats"),
    (["--headline", "mode=nope"], "--headline"),
    (["--flops-res", "300"], "--flops-res 300: no GFLOPs rows"),
])
def test_cli_usage_errors_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        main(["report", str(FIXTURE), "--out", str(out), "--formats", "png", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: error:") and message in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".r.*"))


def test_cli_bad_input_files_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xffnot json\n[1, 2]\n")
    not_report = tmp_path / "mine"
    not_report.mkdir()
    (not_report / "notes.txt").write_text("keep me")
    cases = [([str(tmp_path / "missing.jsonl")], "not found"), ([str(empty)], "no rows"),
             ([str(garbage)], "no readable rows"), ([str(tmp_path)], "is a directory"),
             ([], "Missing argument")]
    for paths, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["report", *paths, "--out", str(tmp_path / "r")])
        assert e.value.code == 2, paths
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["report", str(FIXTURE), "--out", str(not_report)])
    assert e.value.code == 2 and "not a folder written by bench report" in capsys.readouterr().err
    assert (not_report / "notes.txt").read_text() == "keep me"


def test_failure_leaves_previous_report_intact(tmp_path, monkeypatch):
    src = tmp_path / "rows.jsonl"
    shutil.copy(FIXTURE, src)
    out = tmp_path / "rep"
    build_report([str(src)], out, formats=("png",), dpi=30,
                 filters=["kind=efficiency", "device_name=NVIDIA H200"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    import bench.report.build as report_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_mod, "throughput_vs_res", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report([str(src)], out, formats=("png",), dpi=30)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "rows.jsonl"]


def test_scaling_exponent_and_pareto_front():
    res = [256, 512, 1024]
    assert scaling_exponent(res, [1e4 / r**2 for r in res]) == pytest.approx(-1.0)
    assert scaling_exponent(res, [5.0 / r**3 for r in res]) == pytest.approx(-1.5)
    assert scaling_exponent([256], [3.0]) is None
    points = [(10, 28.4), (63, 28.2), (141, 28.9), (750, 28.6), (10, 28.0)]
    assert pareto_front(points) == [(10, 28.4), (141, 28.9)]


def test_styles_fixed_per_model():
    order = ["mambair", "nafnet_w64", "restormer", "serpent_s", "serpent_t", "swinir",
             "swinir [attn_impl=math]"]
    styles = model_styles(order)
    bases = [styles[m] for m in order[:-1]]
    assert len({s.color for s in bases}) == len(bases)  # no two models share a color
    assert len({s.marker for s in bases}) == len(bases)
    variant = styles["swinir [attn_impl=math]"]
    assert (variant.color, variant.marker) == (styles["swinir"].color, styles["swinir"].marker)
    assert variant.hollow and variant.linestyle == "--"
    assert model_styles(order) == styles  # deterministic


def test_rows_without_optional_columns(tmp_path):
    """Old rows: no overrides/compile/device_mem_mb/time, OOM without a known card size."""
    rows = [{"model": "a", "task": "deblur", "scale": 1, "res": r, "batch": 1, "dtype": "fp32",
             "mode": "infer", "params": 1e6, "gflops": g, "status": s,
             "mem_peak_alloc_mb": m, "device_name": "GPU X"}
            for r, g, s, m in ((64, 1.0, "ok", 10.0), (128, 4.0, "oom", None))]
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = build_report([str(path)], tmp_path / "old", formats=("png",), dpi=30)
    md = _md_rows(rep, "memory_deblur_fp32_infer_b1_gpu-x")
    assert md["a"] == ["0.00977", "OOM"]
    assert (rep.out / "figures" / "memory_vs_res_deblur_fp32_infer_b1_gpu-x.png").stat().st_size
