"""Report sections of the quality study and the large-image sweep: aliases meet their network,
time-to-quality curves, quality vs measured latency, largest image per model, activation
memory, and no memory shown for CUDA-graph rows (capture allocations are not a peak)."""
import csv
import io
import json

import pytest

from bench.report.build import build_report

CARD = "NVIDIA H200"


def _eff(model, res, *, status="ok", mode="infer", dtype="bf16", graph=False, gflops=None,
         latency=10.0, peak=1000.0, static=100.0, message=""):
    return {"kind": "efficiency", "model": model, "task": "deblur", "scale": 1, "res": res,
            "batch": 1, "dtype": dtype, "mode": mode, "cuda_graph": graph, "status": status,
            "message": message, "params": 1e6, "gflops": gflops if gflops else res * res / 1e3,
            "latency_ms_median": latency if status == "ok" else None,
            "mem_peak_alloc_mb": peak if status == "ok" else None,
            "mem_static_mb": static if status == "ok" else None,
            "device_name": CARD, "time": "2026-12-02T00:00:00"}


def _quality(model, psnr, dataset="Kodak24"):
    return {"kind": "quality", "model": model, "task": "deblur", "scale": 1,
            "degradation": "deblur:sigma=3,ksize=61,noise=0.01", "dataset": dataset,
            "psnr": psnr, "ssim": 0.8, "psnr_y": psnr + 1, "ssim_y": 0.81, "lpips": None,
            "n_images": 24, "time": "2026-12-02T00:00:00"}


def _val(model, point, train_s, psnr):
    return {"kind": "validation", "model": model, "task": "deblur", "scale": 1,
            "degradation": "deblur:sigma=3,ksize=61,noise=0.01", "val_sets": ["Set5"],
            "iteration": 100 * point, "images_seen": 1600 * point, "train_s": train_s,
            "val_s": 2.0 * point, "time_budget_s": 360.0, "point": point, "psnr": psnr,
            "ssim": 0.7, "psnr_y": psnr + 1, "ssim_y": 0.72, "val_psnr": psnr,
            "device_name": CARD, "time": f"2026-12-02T00:00:0{point}", "status": "ok"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    rows = [
        # FLOPs and latency under the networks' names; quality under their aliases
        _eff("serpent_s", 256, gflops=25.0, latency=3.0), _eff("nafnet_w64", 256, gflops=500.0,
                                                            latency=30.0),
        _quality("serpent", 28.0), _quality("nafnet", 28.5),
        # a sweep to 4096 px: nafnet_w64 runs out of memory there
        *[_eff("serpent_s", r, peak=100.0 * r / 256, static=20.0) for r in (512, 1024, 2048, 4096)],
        *[_eff("nafnet_w64", r) for r in (512, 1024, 2048)], _eff("nafnet_w64", 4096, status="oom",
                                                                 message="CUDA out of memory"),
        # CUDA-graph rows: latency shown, memory not
        _eff("serpent_s", 256, graph=True, peak=5000.0), _eff("nafnet_w64", 256, graph=True),
        # training curves
        *[_val("serpent_s", k, 36.0 * k, 24.0 + k / 10) for k in range(1, 11)],
        *[_val("nafnet_w32", k, 36.0 * k, 24.5 + k / 20) for k in range(1, 11)],
    ]
    path = tmp_path_factory.mktemp("rows") / "study.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_report([str(path)], tmp_path_factory.mktemp("rep") / "study", formats=("png",),
                        dpi=40)


def _table(report, name):
    text = (report.out / "tables" / f"{name}.csv").read_text()
    return {r["model"]: r for r in csv.DictReader(io.StringIO(text))}


def test_aliases_meet_their_networks_in_the_quality_figures(report):
    figures = {p.stem for p in (report.out / "figures").iterdir()}
    assert "quality_vs_gflops_deblur_kodak24" in figures  # needs both points: serpent, nafnet
    assert "quality_vs_latency_deblur_kodak24_nvidia-h200" in figures


def test_time_to_quality_curves_and_final_validation(report):
    assert (report.out / "figures" / "train_curve_deblur_set5_nvidia-h200.png").is_file()
    final = _table(report, "train_final_deblur_set5_nvidia-h200")
    assert set(final) == {"serpent_s", "nafnet_w32"}
    assert float(final["serpent_s"]["training (s)"]) == 360.0
    assert float(final["serpent_s"]["psnr"]) == pytest.approx(25.0)
    assert int(final["nafnet_w32"]["images seen"]) == 16000


def test_largest_image_per_model(report):
    t = _table(report, "largest_deblur_bf16_infer_b1_nvidia-h200")
    assert t["serpent_s"]["largest side that ran"] == "4096"
    assert t["serpent_s"]["next size"] == "larger not tried"
    assert t["nafnet_w64"]["largest side that ran"] == "2048"
    assert t["nafnet_w64"]["next size"] == "4096: oom"
    assert float(t["serpent_s"]["peak memory there (GiB)"]) == pytest.approx(1600 / 1024)
    assert (report.out / "figures" / "largest_deblur_bf16_infer_b1_nvidia-h200.png").is_file()


def test_activation_memory_is_peak_minus_static(report):
    t = _table(report, "activation_memory_deblur_bf16_infer_b1_nvidia-h200")
    assert float(t["serpent_s"]["activation memory (GiB) @1024²"]) == pytest.approx(
        (400.0 - 20.0) / 1024, rel=1e-3)


def test_no_memory_for_cuda_graph_rows(report):
    tables = {p.stem for p in (report.out / "tables").glob("*.csv")}
    assert "latency_deblur_bf16_infer_b1_graph_nvidia-h200" in tables
    assert not {t for t in tables if "graph" in t and "memory" in t}
    figures = {p.stem for p in (report.out / "figures").iterdir()}
    assert not {f for f in figures if "graph" in f and "memory" in f}
