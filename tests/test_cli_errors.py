"""Issue 15: failures that looked like success, work lost without a word, workers outliving
their sweep. Each command runs as a user runs it (a subprocess of `python -m bench`)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.results import read_rows

REPO = Path(__file__).resolve().parent.parent
FLOPS_ONLY = ["--models", "serpent_t", "--res", "32", "--measure", "params,flops", "--no-progress"]


def _bench(*args, cwd=REPO, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def _one_line_usage_error(p, needle):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_config_that_errors_fails_the_sweep(tmp_path):
    out = tmp_path / "r.jsonl"
    p = _bench("run", *FLOPS_ONLY, "--set", "nonsense=3", "--out", out)
    assert p.returncode == 1, p.stderr
    summary = [line for line in p.stderr.splitlines() if line.startswith("bench run:")]
    assert len(summary) == 1 and "1 of 1 config(s) failed" in summary[0]
    assert "nonsense" in summary[0]
    assert [r["status"] for r in read_rows(out)] == ["error"]  # the row is kept


def test_skipped_rows_are_results_not_failures(tmp_path):
    p = _bench("run", "--models", "restormer", "--res", "12", "--measure", "params,flops",
               "--no-progress", "--out", tmp_path / "r.jsonl")
    assert p.returncode == 0, p.stderr
    assert [r["status"] for r in read_rows(tmp_path / "r.jsonl")] == ["skipped"]


@pytest.mark.parametrize("args, needle", [
    (["--iters", "0"], "--iters must be >= 1"),
    (["--resume"], "--resume needs --out"),
])
def test_run_usage_errors(args, needle):
    _one_line_usage_error(_bench("run", *FLOPS_ONLY, *args), needle)


def test_out_naming_a_folder_is_refused_before_any_work(tmp_path):
    t0 = time.perf_counter()
    p = _bench("run", "--models", "all", "--res", "1024", "--out", tmp_path)
    _one_line_usage_error(p, "is a folder")
    assert time.perf_counter() - t0 < 60  # refused up front, not after measuring everything
    p = _bench("eval", "--model", "serpent_t", "--task", "denoise", "--eval-set", tmp_path,
               "--out", tmp_path, "--no-lpips")
    _one_line_usage_error(p, "is a folder")


def _images(folder: Path, n: int = 2, size: int = 24) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((size, size), Image.BICUBIC).save(folder / f"im{i}.png")
    return folder


def test_train_refuses_to_replace_a_run_without_resume_or_overwrite(tmp_path):
    _images(tmp_path / "data" / "T")
    common = ["train", "--model", "serpent_t", "--task", "denoise", "--train-set", "T",
              "--data-root", tmp_path / "data", "--crop", 16, "--batch", 1, "--workers", 0,
              "--no-progress", "--device", "cpu", "--out-dir", tmp_path / "run"]
    first = _bench(*common, "--iters", 3)
    assert first.returncode == 0, first.stderr
    log = (tmp_path / "run" / "train_log.csv").read_text()
    again = _bench(*common, "--iters", 1)
    _one_line_usage_error(again, "already holds a training run")
    assert (tmp_path / "run" / "train_log.csv").read_text() == log  # untouched
    replaced = _bench(*common, "--iters", 1, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "1/1 iterations" in replaced.stdout
    (tmp_path / "file").write_text("")
    _one_line_usage_error(_bench(*common[:-1], tmp_path / "file", "--iters", 1), "is a file")


def _descendants(pid: int) -> list[int]:
    """Live (not zombie) descendants of `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _workers(pid: int) -> list[int]:
    """Descendants of `pid` running bench.measure.worker (a forked child shares its server's
    command line)."""
    out = []
    for d in _descendants(pid):
        try:
            if b"bench.measure.worker" in Path(f"/proc/{d}/cmdline").read_bytes():
                out.append(d)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


SPAWN_SWEEP = ("import sys; sys.path.insert(0, sys.argv[1]);"
               "from bench.measure.config import plan_sweep;"
               "from bench.measure.sweep import run_sweep;"
               "cfgs = plan_sweep(models='serpent_t', res='16', device='cpu', warmup=10**9);"
               "run_sweep(cfgs, sys.argv[2], isolate=True, progress=False, start='spawn')")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["bench run", "spawn"])
def test_workers_die_with_a_killed_sweep(tmp_path, how):
    """SIGKILL of `bench run --isolate`: nothing it started may go on measuring (issue 15:
    its worker ran on for ~25 s). The config below would warm up for hours. `bench run` forks
    its workers from a server; "spawn" starts an interpreter per config."""
    out = tmp_path / "r.jsonl"
    cmd = ([sys.executable, "-m", "bench", "run", "--models", "serpent_t", "--res", "16",
            "--device", "cpu", "--isolate", "--warmup", str(10**9), "--no-progress",
            "--out", str(out)] if how == "bench run"
           else [sys.executable, "-c", SPAWN_SWEEP, str(REPO), str(out)])
    sweep = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        want = 1 if how == "spawn" else 2  # a fork server and the child it forked
        while len(_workers(sweep.pid)) < want and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _workers(sweep.pid)
        assert workers, "the sweep never started its workers"
        time.sleep(1.0)  # the child is measuring now
        assert all(_alive(w) for w in workers)
    finally:
        sweep.kill()
        sweep.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them running on the CI machine
        os.kill(w, signal.SIGKILL)
    assert not left, "workers outlived their sweep"


def test_fork_server_times_out_a_config_and_serves_the_next(tmp_path):
    """A config past its timeout is an error row; the server is replaced and serves the next
    configs, with the counts the parent made; only the first row pays the server's start."""
    from bench.measure.config import plan_sweep
    from bench.measure.sweep import ForkServer, parent_counts

    stuck = plan_sweep(models="serpent_t", res="16", device="cpu", warmup=10**9, budget=0)[0]
    fine = plan_sweep(models="serpent_t", res="16,24", device="cpu", warmup=1, iters=2, budget=0)
    server = ForkServer()
    try:
        first = server.measure(stuck, 2.0)  # the server's own start is not part of the 2 s
        assert first["status"] == "error" and "timeout" in first["message"]
        rows = [server.measure(cfg, 300, parent_counts(cfg)) for cfg in fine]
    finally:
        server.close()
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["message"] for r in rows]
    for cfg, row in zip(fine, rows):
        assert row["gflops"] == parent_counts(cfg)["gflops"] and row["iters"] == 2
        assert row["phase_s"]["import"] == 0  # forked: nothing imported per config
    assert "server_start" in rows[0]["phase_s"] and "server_start" not in rows[1]["phase_s"]


def test_worker_imports_only_what_a_measurement_needs(tmp_path):
    """Given the parent's counts, a worker imports neither the FLOP counters nor, for a model
    without custom ops, dynamo (FLOP counting imported torch._dynamo: 2 s of every config)."""
    from bench.measure.config import plan_sweep

    cfg = plan_sweep(models="nafnet_w32", res="16", device="cpu", warmup=1, iters=2, budget=0)[0]
    request = {"config": cfg.to_json(), "counted": {"params": 1, "gflops": 2.0}}
    script = tmp_path / "run_worker.py"
    script.write_text(
        "import runpy, sys\n"
        "sys.argv = ['worker']\n"
        "try:\n"
        "    runpy.run_module('bench.measure.worker', run_name='__main__')\n"
        "finally:\n"
        "    heavy = ('fvcore', 'torch._dynamo', 'bench.measure.flops', 'torch.utils.flop_counter')\n"
        "    print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n")
    p = subprocess.run([sys.executable, str(script)], input=json.dumps(request),
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout.split("BENCH_ROW ", 1)[1].splitlines()[0])
    assert row["status"] == "ok" and row["params"] == 1
    assert p.stdout.strip().splitlines()[-1] == "HEAVY []"
