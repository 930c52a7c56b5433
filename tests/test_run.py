"""`bench run`: rows, OOM as a result, --resume, usage errors."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from bench.errors import UsageError
from bench.measure.row import RunConfig, check_cuda_graph, measure_config
from bench.results import config_key, read_rows
from bench.measure.sweep import run_sweep
from serpent import registry as model_registry


class _Tiny(nn.Module):
    def __init__(self, fail_at: int = 0):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.fail_at = fail_at

    def forward(self, x):
        if self.fail_at and x.shape[-1] >= self.fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return x + self.c(x)


@pytest.fixture()
def tiny_models():
    names = []

    def add(name, **kw):
        model_registry.register_model(family="conv", multiple=kw.pop("multiple", 1), upsampler=False,
                                      reference="test", name=name)(lambda *, task, scale, **o: _Tiny(**{**kw, **o}))
        names.append(name)

    add("_tiny")
    add("_tiny_oom", fail_at=32)
    add("_tiny_m8", multiple=8)
    yield
    for n in names:
        model_registry._MODELS.pop(n)


def _cfg(model, res, **kw):
    return RunConfig(model=model, res=res, warmup=1, iters=3, **kw)


def test_row_has_public_columns_and_exact_counts(tiny_models):
    row = measure_config(_cfg("_tiny", 16))
    assert row["status"] == "ok", row["message"]
    assert row["params"] == 3 * 3 * 9 + 3
    assert row["gmacs"] * 1e9 == 16 * 16 * 3 * 27
    assert row["iters"] == 3 and len(row["latency_samples_ms"]) == 3
    assert row["latency_ms_min"] <= row["latency_ms_median"]
    assert row["throughput_img_s"] == pytest.approx(1e3 / row["latency_ms_median"])
    for col in ("device_name", "torch", "git_commit", "host", "time", "scan_backend"):
        assert row[col]


def test_oom_becomes_a_row_and_the_sweep_goes_on(tiny_models, tmp_path):
    out = tmp_path / "r.jsonl"
    cfgs = [_cfg("_tiny_oom", 16), _cfg("_tiny_oom", 64), _cfg("_tiny", 64)]
    rows = run_sweep(cfgs, out, isolate=False, progress=False)
    assert [r["status"] for r in rows] == ["ok", "oom", "ok"]
    assert "out of memory" in rows[1]["message"]
    assert [r["status"] for r in read_rows(out)] == ["ok", "oom", "ok"]


def test_size_multiple_gives_skipped_row(tiny_models):
    row = measure_config(_cfg("_tiny_m8", 20))
    assert row["status"] == "skipped" and "divisible by 8" in row["message"]
    assert "latency_ms_median" not in row


def test_train_step_row(tiny_models):
    row = measure_config(_cfg("_tiny", 16, mode="train"))
    assert row["status"] == "ok", row["message"]
    assert row["latency_ms_median"] > 0


def _bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=cwd)


def test_resume_skips_done_configs(tmp_path):
    out = tmp_path / "r.jsonl"
    args = ["run", "--models", "serpent_t", "--res", "32,64", "--measure", "params,flops",
            "--out", str(out), "--no-progress"]
    first = _bench(*args)
    assert first.returncode == 0, first.stderr
    assert len(read_rows(out)) == 2
    again = _bench(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert "2 of 2 configs already" in again.stderr
    assert len(read_rows(out)) == 2


@pytest.mark.parametrize("args, needle", [
    (["run", "--models", "nope"], "unknown model 'nope'; known models:"),
    (["run", "--models", "serpent_t", "--res", "abc"], "--res must be"),
    (["run", "--models", "serpent_t", "--dtype", "fp8"], "unknown dtype"),
    (["run", "--models", "serpent_t", "--task", "inpaint"], "unknown task"),
    (["run", "--models", "serpent_t", "--device", "cuda"], "CUDA is not available"),
    (["run", "--models", "serpent_t", "--set", "1x=2"], "--set expects key=value"),
    (["run", "--models", "serpent_t", "--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA"),
])
def test_usage_errors_exit_2_with_one_line(args, needle):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    p = _bench(*args)
    assert p.returncode == 2
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_help_is_fast_and_lists_commands():
    import time
    t0 = time.perf_counter()
    p = _bench("--help")
    assert p.returncode == 0
    assert time.perf_counter() - t0 < 2.0
    for cmd in ("run", "models", "train", "eval", "report", "compare"):
        assert cmd in p.stdout


def test_flops_of_every_model_at_1024_on_cpu_in_seconds(tmp_path):
    import time
    out = tmp_path / "f.jsonl"
    t0 = time.perf_counter()
    p = _bench("run", "--models", "all", "--res", "1024", "--measure", "params,flops",
               "--device", "cpu", "--out", str(out), "--no-progress")
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    rows = read_rows(out)
    assert rows and all(r["status"] == "ok" for r in rows), [r["message"] for r in rows]
    for r in rows:
        assert r["gflops"] > 0 and r["gflops_torch"] > 0
        # both counters agree except the listed fvcore-only categories (norms, upsampling, pools)
        fvcore_only = sum(v for k, v in r["flops_by_op_gmacs"].items() if k in ("norm", "upsample", "pool"))
        assert r["gflops"] - 2 * fvcore_only == pytest.approx(r["gflops_torch"], rel=1e-9)
    assert elapsed < 10 * len(rows) + 10


def test_two_worker_sweep_gives_the_same_rows_as_one(tmp_path):
    """Sharded sweep (issue 8): same configs and counts, each line whole, whatever the order."""
    common = ["run", "--models", "nafnet_w32,serpent_t", "--res", "32,64", "--measure",
              "params,flops", "--no-progress"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert _bench(*common, "--out", str(one)).returncode == 0
    p = _bench(*common, "--out", str(two), "--workers", "2")
    assert p.returncode == 0, p.stderr
    keep = ("model", "res", "params", "gflops", "gflops_torch", "status")
    rows1 = sorted(tuple(r[k] for k in keep) for r in read_rows(one))
    rows2 = sorted(tuple(r[k] for k in keep) for r in read_rows(two))
    assert len(rows1) == 4 and rows1 == rows2


def test_models_lists_every_model_with_its_parameter_count():
    from bench.registry import list_models

    p = _bench("models")
    assert p.returncode == 0, p.stderr
    lines = {line.split()[0]: line for line in p.stdout.splitlines()[2:] if line.strip()}
    assert set(lines) == set(list_models())
    assert " 3.372 " in lines["serpent_s"] and " 67.889 " in lines["nafnet_w64"]


@pytest.mark.parametrize("kw, needle", [
    (dict(device="cpu"), "needs a CUDA device"),
    (dict(device="cuda", compile=True), "exclude each other"),
    (dict(device="cuda", mode="train", dtype="fp16"), "GradScaler"),
])
def test_cuda_graph_refuses_what_it_cannot_measure(kw, needle):
    with pytest.raises(UsageError, match=needle):
        check_cuda_graph(_cfg("_tiny", 16, cuda_graph=True, **kw))
    check_cuda_graph(_cfg("_tiny", 16, **kw))  # the same config without graphs is fine


def test_cuda_graph_is_part_of_the_config_identity():
    assert _cfg("m", 16, cuda_graph=True).key() != _cfg("m", 16).key()
    assert config_key(_cfg("m", 16).to_json()) == config_key(
        {"model": "m", "task": "deblur", "scale": 1, "res": 16, "batch": 1, "dtype": "fp32",
         "mode": "infer"})  # rows written before the flag existed mean "no graph"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_cuda_graph_rows_on_gpu(tiny_models, mode):
    eager = measure_config(_cfg("_tiny", 64, device="cuda", mode=mode))
    graph = measure_config(_cfg("_tiny", 64, device="cuda", mode=mode, cuda_graph=True))
    assert eager["status"] == graph["status"] == "ok", graph["message"]
    assert graph["cuda_graph"] and graph["iters"] == 3 and graph["latency_ms_median"] > 0
    # the graph's private pool holds the activations: nothing new is allocated while replaying
    assert graph["mem_peak_alloc_mb"] == pytest.approx(graph["mem_static_mb"])

def test_models_imports_neither_timm_nor_torchvision_nor_dynamo():
    """Together ~2 s, more than the rest of `bench models` (serpent.layers says why)."""
    code = ("import sys, torch\n"
            "already = set(sys.modules)\n"
            "from bench.cli import main\n"
            "try:\n    main(['models'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('timm', 'torchvision', 'torch._dynamo')\n"
            "       if m in sys.modules and m not in already])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"


def test_achieved_tflops_and_no_kernel_count_on_cpu(tiny_models):
    row = measure_config(_cfg("_tiny", 16))
    assert row["tflops_achieved"] == pytest.approx(row["gflops"] / row["latency_ms_median"])
    assert "cuda_kernels" not in row  # kernels are counted on CUDA only
    train = measure_config(_cfg("_tiny", 16, mode="train"))
    assert train["tflops_achieved"] == pytest.approx(3 * train["gflops"]
                                                     / train["latency_ms_median"])


def test_max_call_s_skips_a_config_too_slow_to_time(tiny_models):
    row = measure_config(_cfg("_tiny", 16, max_call_s=1e-9))
    assert row["status"] == "skipped" and row["message"].startswith("too slow: one call took")
    assert "latency_ms_median" not in row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_count_of_known_calls():
    from bench.measure.row import count_cuda_kernels

    x = torch.ones(1 << 16, device="cuda")
    assert count_cuda_kernels(lambda: x.add_(1), x.device) == 1
    assert count_cuda_kernels(lambda: (x * 2).add_(1).sum(), x.device) == 3
