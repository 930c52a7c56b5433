"""The formulation benchmark's pieces that run without a GPU: the summary and its recommended
defaults, the op census (copies per formulation), the op-class profile, rows and the deadline."""
import json

import pytest
import torch

from baselines import channel_norm
from baselines.restormer import LayerNorm, Restormer
from benchmarks import baseline_formulations as bf
from benchmarks import formulation_report as report
from benchmarks import op_census

TINY = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4])


def timing(model, form, res, ms, mb=100.0, dtype="bf16", mode="infer"):
    return {"kind": "timing", "key": bf.key_of("timing", model, form, res, dtype, mode),
            "model": model, "formulation": form, "res": res, "dtype": dtype, "mode": mode,
            "status": "ok", "latency_ms_median": ms, "mem_peak_alloc_mb": mb}


FIXTURE = [
    {"kind": "run", "key": "run|0", "status": "info", "cuda_device_name": "NVIDIA H200",
     "torch": "2.11.0", "cudnn": 91900},
    timing("restormer", "official", 256, 30.0), timing("restormer", "fused", 256, 24.0),
    timing("restormer", "fused_cl", 256, 31.5), timing("restormer", "official", 1024, 235.0),
    timing("restormer", "fused", 1024, 200.0), timing("restormer", "fused_cl", 1024, 150.0),
    timing("restormer", "layer_norm", 1024, 330.0),  # measured on one config only
    {**timing("restormer", "fused", 1024, 999.0), "status": "skipped"},  # not ok: ignored
    timing("nafnet_w32", "official", 256, 10.0), timing("nafnet_w32", "fused", 256, 9.0),
    timing("nafnet_w64", "official", 256, 20.0), timing("nafnet_w64", "fused", 256, 20.6),
    {"kind": "check", "key": "check|restormer|fused_cl", "model": "restormer",
     "formulation": "fused_cl", "passed": False, "status": "ok"},
]


def test_recommendation_is_the_fastest_formulation_that_passed_its_checks():
    rec = report.recommend(FIXTURE)
    # fused_cl is fastest overall but failed its check: fused wins (geomean of 0.8 and 0.851)
    assert rec["restormer"]["best"] == "fused"
    assert rec["restormer"]["scores"]["fused"]["geomean_ratio"] == pytest.approx(
        (24 / 30 * 200 / 235) ** 0.5)
    assert rec["restormer"]["partial"]["layer_norm"]["configs"] == 1
    # NAFNet-w32 and -w64 share one default: fused is 0.9x and 1.03x official
    nafnet = rec["nafnet"]
    assert nafnet["best"] == "fused"
    assert nafnet["scores"]["fused"]["slower_configs"] == [["nafnet_w64", 256, "bf16", "infer"]]


def test_summary_markdown_shows_ratios_and_slower_cells(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FIXTURE))
    text = report.summarize(report.load_rows([path]))
    assert "NVIDIA H200" in text
    assert '| 1024 | infer | bf16 | 235.0 (100 MB) | 200.0 (100 MB) x0.851 ok |' in text
    assert "20.6 (100 MB) x1.030 SLOWER" in text
    assert 'DEFAULT_FORMULATION = "fused"' in text


def test_census_counts_the_layout_copies_of_the_permuted_layer_norm(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(channel_norm, "INTERPRET_ON_CPU", True)
    torch.manual_seed(0)
    model = Restormer(**TINY).eval()
    norms = sum(isinstance(m, LayerNorm) for m in model.modules())
    x = torch.rand(1, 3, 16, 16)
    counts = {}
    for form in ("official", "layer_norm", "fused"):
        model.set_formulation(form)
        counts[form] = op_census.census(model, x)
    # F.layer_norm on the permuted NCHW view: one copy in (inside the kernel), one copy out
    assert counts["layer_norm"]["copies"] - counts["official"]["copies"] == 2 * norms
    assert counts["layer_norm"]["implicit_copies"] == norms
    assert counts["fused"]["copies"] == counts["official"]["copies"]
    assert counts["fused"]["by_op"]["triton::channel_norm_fwd"] == norms
    assert counts["fused"]["mb_moved"] < counts["official"]["mb_moved"]


def test_profile_classes_follow_the_modules():
    torch.manual_seed(0)
    model = Restormer(**TINY, formulation="official").eval()
    x = torch.rand(1, 3, 16, 16)

    def step():
        with torch.no_grad():
            model(x)
    out = bf.profile_calls(model, step, torch.device("cpu"), calls=1)
    classes = {o["op"]: o["class"] for o in out["top_ops"]}
    assert classes.get("aten::var") == "norm"  # the official norm's statistics
    assert any(c == "conv" for op, c in classes.items() if "conv" in op)
    assert out["class_ms"]["norm"] > 0 and out["class_ms"]["conv"] > 0
    assert op_census.op_class("aten::_softmax", None) == "attention"
    assert op_census.op_class("aten::mul", "attention") == "attention"
    assert op_census.op_class("aten::bmm", "attention") == "matmul"


def test_rows_resume_and_deadline(tmp_path):
    first = bf.Rows(tmp_path / "a" / "rows.jsonl", {"env": 1}, None)
    first.write({"key": "timing|x", "status": "ok"})
    first.write({"key": "timing|y", "status": "skipped"})
    again = bf.Rows(tmp_path / "b" / "rows.jsonl", {}, tmp_path / "a" / "rows.jsonl")
    assert again.done == {"timing|x"}  # skipped configs run again
    row = bf.timed(lambda: None, torch.device("cpu"), calls=3, deadline=bf.Deadline(-1.0),
                   reserve_s=0.0)
    assert row["status"] == "skipped" and row["reason"] == "deadline"
    row = bf.timed(lambda: None, torch.device("cpu"), calls=3, deadline=bf.Deadline(60.0),
                   reserve_s=0.0)
    assert row["status"] == "ok" and row["iters"] == 3
    assert not bf.bands_at(2048) and bf.bands_at(4096)  # 510 x 2048^2 < 2^31 - 1 < 510 x 4096^2


def test_triton_probe_passes_with_the_kernels(monkeypatch, capsys):
    """The probe the GPU run starts with (in a child process): every layout, dtype and norm
    of the Triton kernels against float64, here through Triton's interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setattr(channel_norm, "INTERPRET_ON_CPU", True)
    assert bf.probe_triton("cpu", shapes=[(1, 48, 4, 8), (2, 70, 3, 5)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["triton_probe_ok"] and len(report["cases"]) == 16
    assert bf.uses_triton("restormer", "fused") and not bf.uses_triton("nafnet_w64", "official")
