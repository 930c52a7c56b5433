"""benchmarks.run_to_run: the 2% agreement check between two sweeps."""
import json

from benchmarks import run_to_run


def _row(model, ms, **kw):
    return {"kind": "efficiency", "model": model, "task": "deblur", "scale": 1, "res": 256,
            "batch": 1, "dtype": "bf16", "mode": "infer", "status": "ok", "overrides": {},
            "latency_ms_median": ms, "device_name": "NVIDIA H200", **kw}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_agreement_within_tolerance_and_graph_context(tmp_path, capsys):
    first = _write(tmp_path / "a.jsonl", [_row("a", 10.0), _row("b", 20.0), _row("c", 5.0)])
    second = _write(tmp_path / "b.jsonl", [_row("a", 10.1), _row("b", 20.0),
                                           _row("c", 5.0, status="oom")])  # c: not compared
    graph = _write(tmp_path / "g.jsonl", [_row("a", 2.5, cuda_graph=True)])
    out = tmp_path / "agreement.jsonl"
    assert run_to_run.main([first, second, "--graph", graph, "--out", str(out)]) == 0
    rows = {r["model"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"a", "b"}
    assert abs(rows["a"]["rel_change"] - 0.01) < 1e-12 and rows["a"]["within_tolerance"]
    assert rows["a"]["eager_over_graph"] == 4.0 and rows["b"]["eager_over_graph"] is None
    assert "2 of 2 configs within 2%; 1 config(s) measured in one run only" in capsys.readouterr().out


def test_a_change_beyond_tolerance_fails(tmp_path):
    first = _write(tmp_path / "a.jsonl", [_row("a", 10.0)])
    second = _write(tmp_path / "b.jsonl", [_row("a", 10.3)])
    assert run_to_run.main([first, second]) == 1
    assert run_to_run.main([first, second, "--tolerance", "0.05"]) == 0
