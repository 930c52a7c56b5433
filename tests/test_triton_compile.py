"""benchmarks.triton_compile: the launches of the fused paths are recorded, and compiling for a
GPU target catches what Triton's interpreter (the CPU tests' path) never sees."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks import triton_compile

ROOT = Path(__file__).resolve().parents[1]

KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def good_kernel(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


@triton.jit
def bad_kernel(x_ptr, n, BLOCK: tl.constexpr):
    for s in tl.static_range(1, 3):
        F: tl.constexpr = 1 << s  # a constexpr annotated again in an unrolled loop
        i = tl.arange(0, BLOCK // F)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * F, mask=i < n)
'''


def _launch(kernel):
    return {"module": "tiny_kernels", "kernel": kernel,
            "args": [{"ptr": "float32", "aligned": True}, {"value": 17}],
            "kwargs": {"BLOCK": {"value": 32}}}


def _compile(tmp_path, launches):
    (tmp_path / "tiny_kernels.py").write_text(KERNELS)
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # really compile
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "benchmarks.triton_compile", "compile",
                           str(path)], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def test_compile_passes_a_good_kernel_and_fails_what_only_the_compiler_rejects(tmp_path):
    ok = _compile(tmp_path, [_launch("good_kernel")])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 of 1 launches compiled, 0 failed" in ok.stdout
    bad = _compile(tmp_path, [_launch("good_kernel"), _launch("bad_kernel")])
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL bad_kernel" in bad.stdout and "1 failed" in bad.stdout


def test_capture_records_every_fused_kernel_with_segments(tmp_path):
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    out = tmp_path / "launches.json"
    assert triton_compile.capture(out) == 0
    assert InterpretedFunction.run is run  # the interpreter is given back
    launches = json.loads(out.read_text())
    names = {e["kernel"] for e in launches}
    kernels = {n for m in ("serpent.kernels", "serpent.linear_kernels")
               for n in dir(__import__(m, fromlist=["_"])) if n.endswith("_kernel")}
    assert kernels <= names, kernels - names
    for scan in ("scan_fwd_kernel", "scan_bwd_kernel"):
        summaries = {e["kwargs"]["SUMMARY"]["value"] for e in launches if e["kernel"] == scan
                     and e["kwargs"]["SEGMENTED"]["value"]}
        assert summaries == {True, False}, scan
    assert {e["kwargs"]["CT"]["tl"] for e in launches if e["kernel"] == "scan_fwd_kernel"} \
        == {"fp32", "fp64"}
