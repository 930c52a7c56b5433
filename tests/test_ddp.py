"""`bench train` under torchrun (gloo on the CPU): same global batch -> same loss curve as one
process, checkpoints that load across world sizes, one clear error line, agreed NaN stop."""
import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.train.distributed import Dist
from bench.train.loop import SampleIndices

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "nafnet_w32", "--set", "width=8", "--set", "enc_blk_nums=[1]",
        "--set", "dec_blk_nums=[1]", "--set", "middle_blk_num=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _images(root: Path) -> Path:
    """A few smooth random photos-like PNGs (no shared data needed)."""
    d = root / "T"
    d.mkdir()
    for i in range(4):
        a = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(a).resize((64, 48), Image.BICUBIC).save(d / f"im{i}.png")
    return d


def _train_args(data: Path, out: Path, *extra) -> list[str]:
    return ["train", *TINY, "--task", "denoise", "--train-set", str(data), "--iters", "5",
            "--crop", "32", "--batch", "4", "--warmup", "1", "--log-every", "1",
            "--workers", "0", "--no-progress", "--device", "cpu", "--seed", "3",
            "--out-dir", str(out), *extra]


def _torchrun(target: list[str], n: int = 2, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(n), "--master_addr", "localhost",
           "--master_port", str(_free_port()), *target]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})


def _bench(args: list[str]) -> None:
    """`bench ...` in this process (the single-process reference)."""
    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0


def _losses(run: Path) -> dict[int, float]:
    with open(run / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    iters = [int(r["iter"]) for r in rows]
    assert len(iters) == len(set(iters)), "a log line was written by more than one rank"
    return {int(r["iter"]): float(r["loss"]) for r in rows}


def test_rank_slices_make_the_same_global_batch():
    one = list(SampleIndices(2, 5, 8, Dist()))
    for world in (2, 4):
        slices = [list(SampleIndices(2, 5, 8, Dist(r, world, r))) for r in range(world)]
        for it in range(3):  # iteration by iteration: the union over ranks = the global batch
            per_rank = [s[it * 8 // world:(it + 1) * 8 // world] for s in slices]
            assert sorted(x for p in per_rank for x in p) == one[it * 8:(it + 1) * 8]
    assert one[:8] == list(range(16, 24))  # resumed at iteration 2: samples 16.. of batch 8


def test_ddp_loss_matches_one_process_and_resumes_across_world_sizes(tmp_path):
    from bench.registry import create_model

    data = _images(tmp_path)
    _bench(_train_args(data, tmp_path / "one"))  # the reference: 5 steps, one process
    ref = _losses(tmp_path / "one")

    # 2 processes, global batch 4 (2 per process), stopped after step 3
    p = _torchrun(["-m", "bench", *_train_args(data, tmp_path / "ddp", "--stop-at", "3")])
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = _losses(tmp_path / "ddp")
    assert list(ddp) == [1, 2, 3]
    np.testing.assert_allclose([ddp[i] for i in ddp], [ref[i] for i in ddp], rtol=1e-5)
    assert ref[3] != pytest.approx(ref[1], rel=1e-3)  # the loss does move: the check can fail
    config = json.loads((tmp_path / "ddp" / "train_config.json").read_text())
    assert config["world_size"] == 2 and config["batch_per_process"] == 2
    assert len(config["devices"]) == 2

    # the checkpoint holds the unwrapped model: it loads into a plain module
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])
    create_model("nafnet_w32", task="denoise", width=8, enc_blk_nums=[1], dec_blk_nums=[1],
                 middle_blk_num=1).load_state_dict(ckpt["model"])

    # ... and one process continues it where the 2-process run stopped
    _bench(_train_args(data, tmp_path / "ddp", "--resume"))
    both = _losses(tmp_path / "ddp")
    assert list(both) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([both[i] for i in both], [ref[i] for i in both], rtol=1e-5)
    config = json.loads((tmp_path / "ddp" / "train_config.json").read_text())
    assert config["resumed_from"]["world_size"] == 2 and config["world_size"] == 1
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_one_process_checkpoint_continues_under_two(tmp_path):
    data = _images(tmp_path)
    _bench(_train_args(data, tmp_path / "one"))
    ref = _losses(tmp_path / "one")
    _bench(_train_args(data, tmp_path / "part", "--stop-at", "2"))
    # the bench console script under torchrun, like `torchrun $(which bench) train ...`
    script = Path(sys.executable).parent / "bench"
    target = [str(script)] if script.is_file() else ["-m", "bench"]
    p = _torchrun([*target, *_train_args(data, tmp_path / "part", "--resume")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "destroy_process_group" not in p.stderr
    got = _losses(tmp_path / "part")
    assert list(got) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([got[i] for i in got], [ref[i] for i in got], rtol=1e-5)


def test_batch_not_divisible_by_world_size_is_one_clear_line(tmp_path):
    data = _images(tmp_path)
    args = _train_args(data, tmp_path / "x")
    args[args.index("--batch") + 1] = "3"
    # rank 0 of 2 as torchrun starts it: refused before joining the process group
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    p = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        ("bench: error: --batch 3 (the global batch) is not divisible by the 2 processes; "
         "use a multiple of 2")]
    # the whole torchrun job: every rank exits 2, the message appears once
    p = _torchrun(["-m", "bench", *args])
    assert p.returncode != 0
    assert p.stderr.count("bench: error: --batch 3 (the global batch) is not divisible") == 1
    assert "exitcode  : 2" in p.stderr  # torchrun's report of the first rank that exited
    assert not (tmp_path / "x" / "last.pt").exists()


NAN_ON_RANK_1 = """
import os, sys, torch
from torch import nn
from bench.quality.tasks import make_task
from bench.train.loop import ModelSpec, TrainConfig, TrainingDiverged, train

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.calls = nn.Conv2d(3, 3, 3, padding=1), 0
    def forward(self, x):
        self.calls += 1
        y = x + self.conv(x)
        return y * float("nan") if os.environ["RANK"] == "1" and self.calls == 2 else y

torch.manual_seed(0)
cfg = TrainConfig(model="net", task="denoise", train_sets=[sys.argv[1]], iters=4, crop=16,
                  batch=2, out_dir=sys.argv[2], workers=0, ckpt_every=1, progress=False,
                  device="cpu", grad_clip=0.0)
try:
    train(cfg, make_task("denoise"), ModelSpec(Net()))
    said = "finished"
except TrainingDiverged as e:
    said = f"stopped: {e}"
alive = torch.distributed.is_initialized()
with open(f"{sys.argv[2]}.rank{os.environ['RANK']}", "w") as f:  # not stdout: ranks interleave
    f.write(f"{said}\\ngroup alive: {alive}\\n")
"""


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # No gradient clipping: only the all-reduced loss tells rank 0 that rank 1 went NaN.
    data = _images(tmp_path)
    script = tmp_path / "nan_run.py"
    script.write_text(textwrap.dedent(NAN_ON_RANK_1))
    p = _torchrun([str(script), str(data), str(tmp_path / "run")],
                  env={"PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        said = (tmp_path / f"run.rank{rank}").read_text()
        assert (f"stopped: training stopped: loss became nan at iteration 2; last good "
                f"checkpoint: {tmp_path / 'run' / 'last.pt'} (iteration 1)") in said
        assert "group alive: False" in said  # destroyed on the error path too
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_scaling_benchmark_cpu_smoke(tmp_path):
    """The GPU scaling script end to end on the CPU: rows, batches and efficiency arithmetic."""
    from bench.results import read_rows

    out = tmp_path / "s.jsonl"
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.ddp_scaling", "--out", str(out), "--device",
         "cpu", "--world-sizes", "1,2", *TINY[2:], "--models",
         "nafnet_w32", "--iters", "4", "--skip", "1", "--crop", "32", "--batch", "4",
         "--per-gpu-batch", "2", "--workers", "0", "--parts", "train"],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_rows(out)
    got = {(r["scaling"], r["world_size"]): r for r in rows}
    assert set(got) == {("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)}
    assert all(r["status"] == "ok" and r["kind"] == "ddp_scaling" for r in rows), rows
    assert [got["strong", n]["global_batch"] for n in (1, 2)] == [4, 4]
    assert [got["weak", n]["global_batch"] for n in (1, 2)] == [2, 4]
    for scaling in ("strong", "weak"):
        one, two = got[scaling, 1], got[scaling, 2]
        assert one["scaling_efficiency"] == pytest.approx(1.0)
        assert two["scaling_efficiency"] == pytest.approx(two["img_s"] / (2 * one["img_s"]))
        assert two["img_s"] == pytest.approx(two["global_batch"] / two["step_ms"] * 1e3)
    # same global batch, same data: the 2-process loss curve is the 1-process one (fp32 on CPU)
    assert got["strong", 2]["loss_max_rel_diff_vs_1gpu"] < 1e-5
    assert len(got["strong", 2]["rank_devices"]) == 2
