"""Every registered model (aliases once) through the path users take: one `bench run` process
that measures inference and then a training step of each model, on the CPU with tiny inputs.

One process on purpose: state that a model or the scan keeps between calls (caches, reused
buffers) is created under `torch.inference_mode()` by the inference config and then meets
autograd in the training config. The acceptance command of issue 18 is
`bench run --models all --mode both --device cpu --res 32`; this is the same sweep at 16 px with
one untimed-warm-up-free call per config (the path, not the numbers, is under test).
"""
import subprocess
import sys

import pytest

from bench.registry import resolve_models
from bench.results import read_rows

MODELS = resolve_models("all")  # every distinct network, aliases skipped

pytestmark = pytest.mark.slow  # one process, 16 configs: about a minute of CPU


@pytest.fixture(scope="module")
def sweep_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "all.jsonl"
    p = subprocess.run([sys.executable, "-m", "bench", "run", "--models", "all", "--mode", "both",
                        "--device", "cpu", "--res", "16", "--warmup", "0", "--iters", "1",
                        "--measure", "latency", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert "Traceback" not in p.stderr, p.stderr
    rows = {(r["model"], r["mode"]): r for r in read_rows(out)}
    assert len(rows) == 2 * len(MODELS), sorted(rows)
    if all(r["status"] == "ok" for r in rows.values()):
        assert p.returncode == 0, p.stderr
    return rows


def test_the_sweep_covers_every_registered_network():
    assert {"serpent_t", "serpent_s", "serpent_b", "swinir", "restormer", "nafnet_w32",
            "nafnet_w64", "mambair"} <= set(MODELS)
    assert "serpent" not in MODELS  # the alias of serpent_s runs once, as serpent_s


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("model", MODELS)
def test_inference_then_training_in_one_process(sweep_rows, model, mode):
    row = sweep_rows[(model, mode)]
    assert row["status"] == "ok", row["message"]
    assert row["latency_ms_median"] > 0 and row["iters"] >= 1
    assert row["res"] == 16 and row["input_res"] == 16
    if row["family"] == "ssm":
        assert row["scan_backend"] == "chunked"
