"""Failure paths end to end, through the commands a user runs: a worker that crashes or runs out
of time becomes a status=error row (it never loses the sweep), and such rows and a results file
with a torn last line go through `bench compare`, `bench report` and `bench run --resume`.

Subprocesses on purpose: the worker is a child process and the commands are what CI and users
call. Rows are params-only or tiny so that each command takes seconds.
"""
import dataclasses
import json
import subprocess
import sys

import pytest

from bench.measure.config import RunConfig
from bench.measure.sweep import run_isolated
from bench.results import config_key, read_rows

TORN_WARNING = "skipped 1 unreadable line(s)"


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@dataclasses.dataclass(frozen=True)
class _UnreadableConfig(RunConfig):
    """A config the worker cannot even parse: it dies with a traceback before any row."""

    def to_json(self) -> dict:
        return {**super().to_json(), "not_a_config_field": 1}


def test_worker_that_dies_without_a_row_becomes_an_error_row():
    row = run_isolated(_UnreadableConfig(model="nafnet_w32", res=16, measure=("params",)),
                       timeout_s=120)
    assert row["status"] == "error"
    assert row["message"].startswith("worker exited with code 1 without a row")
    assert "not_a_config_field" in row["message"]  # the tail of the child's traceback
    assert (row["model"], row["res"], row["mode"]) == ("nafnet_w32", 16, "infer")
    assert row["device_name"] and row["torch"]  # the environment is recorded all the same


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A timeout row (the worker killed after 0.2 s) and a crash row (a constructor override the
    model rejects, raised inside the worker), both from isolated workers."""
    out = tmp_path_factory.mktemp("sweep") / "r.jsonl"
    common = ["run", "--models", "nafnet_w32", "--res", "16", "--device", "cpu", "--isolate",
              "--measure", "params,latency", "--no-progress", "--out", str(out)]
    runs = [bench(*common, "--mode", "train", "--timeout", "0.2"),
            bench(*common, "--res", "32", "--set", "no_such_arg=3")]
    return out, runs


def test_timeout_and_crash_rows_from_isolated_workers(sweep):
    out, runs = sweep
    rows = read_rows(out)
    assert [(r["res"], r["mode"], r["status"]) for r in rows] == [
        (16, "train", "error"), (32, "infer", "error")]
    assert rows[0]["message"] == "timeout: config took longer than 0 s"
    assert "unexpected keyword argument 'no_such_arg'" in rows[1]["message"]
    assert rows[1]["overrides"] == {"no_such_arg": 3}
    for p in runs:  # each run ends with its row written, never with a traceback
        assert "Traceback" not in p.stderr


def test_compare_fails_on_error_rows_and_names_the_message(sweep, tmp_path):
    out, _ = sweep
    rows = read_rows(out)
    # the baseline: the same configs, ok (what the sweep should have produced), plus one
    # config that is ok on both sides
    ok = [{**r, "status": "ok", "message": "", "params": 17_111_907} for r in rows]
    ok_both = {**ok[0], "mode": "infer"}
    base = tmp_path / "b.jsonl"
    base.write_text("".join(json.dumps(r) + "\n" for r in [*ok, ok_both]))
    cur = tmp_path / "c.jsonl"
    cur.write_text(out.read_text() + json.dumps(ok_both) + "\n")
    p = bench("compare", str(base), str(cur), "--json", str(tmp_path / "v.json"))
    assert p.returncode == 1, p.stdout + p.stderr
    verdict = json.loads((tmp_path / "v.json").read_text())
    by_res = {(c["config"]["res"], c["config"]["mode"]): c for c in verdict["configs"]}
    assert by_res[(16, "infer")]["status"] == "ok"
    for key, needle in (((16, "train"), "timeout"), ((32, "infer"), "no_such_arg")):
        c = by_res[key]
        assert (c["status"], c["fail"], c["current_status"]) == ("regression", True, "error")
        assert "newly failing: ok -> error" in c["note"] and needle in c["note"]


def _torn_copy(src, dst):
    """src with its last line cut in half (a writer killed mid-line)."""
    text = src.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    dst.write_text(text[: len(text) - len(last) - 1] + last[: len(last) // 2])
    return dst


TWO_ROWS = ["run", "--models", "nafnet_w32", "--res", "32,64", "--measure", "params,flops",
            "--device", "cpu", "--no-progress", "--out"]


@pytest.fixture(scope="module")
def two_rows(tmp_path_factory):
    """Two complete params + FLOPs rows of nafnet_w32 (32 and 64 px), measured in-process."""
    out = tmp_path_factory.mktemp("two") / "r.jsonl"
    p = bench(*TWO_ROWS, str(out))
    assert p.returncode == 0, p.stderr
    assert len(read_rows(out)) == 2
    return out


def test_compare_warns_about_a_torn_line_and_uses_the_complete_rows(two_rows, tmp_path):
    torn = _torn_copy(two_rows, tmp_path / "torn.jsonl")
    p = bench("compare", str(two_rows), str(torn), "--json", str(tmp_path / "v.json"))
    assert TORN_WARNING in p.stderr and "[2]" in p.stderr
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["summary"]["ok"] == 1 and verdict["summary"]["missing"] == 1
    assert p.returncode == 1  # the torn config is missing from the current run: a failure
    (missing,) = [c for c in verdict["configs"] if c["status"] == "missing"]
    assert missing["config"]["res"] == 64


@pytest.fixture(scope="module")
def report_run(sweep, two_rows, tmp_path_factory):
    """`bench report` of the error rows and of a torn file, in one run (figures are slow)."""
    folder = tmp_path_factory.mktemp("report")
    torn = _torn_copy(two_rows, folder / "torn.jsonl")
    p = bench("report", str(sweep[0]), str(torn), "--out", str(folder / "rep"), "--formats",
              "png", "--dpi", "50")
    assert p.returncode == 0, p.stderr
    return p, folder / "rep"


def test_report_shows_error_rows_and_the_complete_rows_of_a_torn_file(report_run):
    _, rep = report_run
    markdown = "\n".join(f.read_text() for f in rep.rglob("*.md"))
    assert "error" in markdown and "timeout" in markdown
    csv = "\n".join(f.read_text() for f in (rep / "tables").glob("*.csv"))
    assert "nafnet_w32" in csv and "17.1" in csv  # its parameter count (M) in a FLOPs table


def test_report_warns_about_a_torn_line(report_run):
    p, _ = report_run
    assert TORN_WARNING in p.stderr


def test_resume_warns_about_a_torn_line_and_remeasures_only_that_config(two_rows, tmp_path):
    torn = _torn_copy(two_rows, tmp_path / "torn.jsonl")
    p = bench(*TWO_ROWS, str(torn), "--resume")
    assert p.returncode == 0, p.stderr
    assert TORN_WARNING in p.stderr
    assert "--resume: 1 of 2 configs already" in p.stderr
    lines = torn.read_text().splitlines()
    assert len(lines) == 3  # the complete row, the torn half line, the re-measured row
    with pytest.warns(UserWarning, match=r"unreadable line\(s\) \[2\]"):
        rows = read_rows(torn)
    assert [config_key(r) for r in rows] == [config_key(r) for r in read_rows(two_rows)]
    assert rows[1]["gflops"] == read_rows(two_rows)[1]["gflops"]


def test_resume_retries_error_rows(sweep, tmp_path):
    out, _ = sweep
    copy = tmp_path / "r.jsonl"
    copy.write_text(out.read_text())
    p = bench("run", "--models", "nafnet_w32", "--res", "16", "--mode", "train", "--device",
              "cpu", "--measure", "params", "--no-progress", "--out", str(copy), "--resume")
    assert p.returncode == 0, p.stderr
    assert "--resume: 0 of 1 configs already" in p.stderr  # the timeout row is retried
    rows = read_rows(copy)
    assert [(r["res"], r["mode"], r["status"]) for r in rows[2:]] == [(16, "train", "ok")]
