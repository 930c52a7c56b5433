"""Compile every Triton kernel launch of our fused paths for a real GPU target, without a GPU.

Why: the CPU tests run the kernels through Triton's interpreter, which never runs Triton's
compiler, so a kernel that the compiler of another Triton release rejects (the GPU machine's
torch ships its own Triton) passes every CPU test and fails on the card. Two steps:

    python -m benchmarks.triton_compile capture --out launches.json
        runs Serpent (fused path: inference and a training step, fp32 / bf16 / fp16 / fp64,
        raster and serpentine, 1-4 pyramid scales) and the baselines' Triton channel norm on
        small CPU inputs under TRITON_INTERPRET=1 and records each distinct launch (kernel,
        argument types and alignment, constexprs, launch options) instead of running it
    python -m benchmarks.triton_compile compile launches.json [--arch 90]
        compiles each recorded launch with the Triton installed in *that* Python (torch not
        needed) for CUDA sm_<arch>, down to the cubin; prints one line per kernel variant and
        exits 1 if any fails. A second venv with `pip install triton==X` checks release X.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

# --------------------------------------------------------------------------- capture


def _describe(value, runtime: bool = False):
    """A launch argument as JSON: what Triton's specialisation looks at, nothing more.
    `runtime`: a positional (non-constexpr) argument, of which only the class of an int matters
    to the compiler (1, a multiple of 16, other), which keeps the variants few."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return {"ptr": str(value.dtype).removeprefix("torch."),
                "aligned": value.data_ptr() % 16 == 0}
    if type(value).__name__ == "dtype" and hasattr(value, "primitive_bitwidth"):  # tl.dtype
        return {"tl": value.name}
    if runtime and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 31:
        return {"value": 1 if value == 1 else 16 if value % 16 == 0 else 17}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return {"value": value}
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}")


def capture(out: Path) -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}

    def record(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        entry = {"module": fn.__module__, "kernel": fn.__name__,
                 "args": [_describe(a, runtime=True) for a in args],
                 "kwargs": {k: _describe(v) for k, v in kwargs.items()}}
        launches.setdefault(json.dumps(entry, sort_keys=True), entry)

    original, saved_tiles = InterpretedFunction.run, os.environ.get("SERPENT_SCAN_TILES")
    InterpretedFunction.run = record  # record, never execute: outputs are left unwritten
    try:
        _run_fused_paths(torch)
    finally:
        InterpretedFunction.run = original
        if saved_tiles is None:
            os.environ.pop("SERPENT_SCAN_TILES", None)
        else:
            os.environ["SERPENT_SCAN_TILES"] = saved_tiles
    out.write_text(json.dumps(list(launches.values()), indent=1) + "\n")
    names = sorted({e["kernel"] for e in launches.values()})
    print(f"{len(launches)} distinct launches of {len(names)} kernels -> {out}: {', '.join(names)}")
    return 0


def _run_fused_paths(torch) -> None:
    """Every fused path once: dtypes, scale counts, scan paths, scan segments, channel norm."""
    from baselines import channel_norm as norm
    from serpent.model import Serpent

    saved, norm.INTERPRET_ON_CPU = norm.INTERPRET_ON_CPU, True
    try:
        _run_models(torch, Serpent)
        for dtype in (torch.float32, torch.bfloat16):
            for centered, fmt in ((True, torch.contiguous_format), (False, torch.channels_last)):
                w, b = torch.ones(48, requires_grad=True), torch.zeros(48, requires_grad=True)
                y = torch.rand(2, 48, 20, 24, dtype=dtype).to(memory_format=fmt).requires_grad_()
                norm.channel_norm(y, w, b if centered else None, 1e-6, impl="triton",
                                  centered=centered).float().sum().backward()
    finally:
        norm.INTERPRET_ON_CPU = saved


def _run_models(torch, Serpent) -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)  # level 0: 256 steps, 4 chunks of 64 (launches do not run)
    for tiles in ("", "64,2,4,4,8,1"):  # default tiles, then scan segments of one chunk
        os.environ["SERPENT_SCAN_TILES"] = tiles
        for num_scales in (1, 2, 3, 4):
            for path in ("serpentine", "raster"):
                model = Serpent(embed_dim=16, depths=(1, 1), dec_depths=(1,),
                                num_scales=num_scales, scan_path=path, scan_backend="triton")
                for dtype in (torch.float32, torch.float64):
                    m = model.to(dtype)
                    with torch.inference_mode():
                        m(x.to(dtype))
                    m(x.to(dtype).requires_grad_()).sum().backward()
                model = model.float()
                for dtype in (torch.bfloat16, torch.float16):
                    with torch.autocast("cpu", dtype=dtype):
                        with torch.inference_mode():
                            model(x)
                        model(x.requires_grad_()).float().sum().backward()


# --------------------------------------------------------------------------- compile


class _Pointer:
    """Stands in for a tensor argument: Triton reads only dtype and data_ptr when compiling."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype = _TorchDtypeName(dtype)
        self._ptr = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._ptr


class _TorchDtypeName(str):
    """str(dtype) of a torch dtype, "torch.float32", without importing torch."""

    def __new__(cls, name: str):
        return super().__new__(cls, "torch." + name)


class _StubDriver:
    """The parts of Triton's active driver that compiling (warmup) asks for."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return None


def _value(desc, tl):
    if "ptr" in desc:
        return _Pointer(desc["ptr"], desc["aligned"])
    if "tl" in desc:
        return tl.dtype(desc["tl"])
    return desc["value"]


def _import_kernels(module: str):
    """Import a kernels module without its package's __init__ (which imports torch)."""
    import types
    package = module.rpartition(".")[0]
    if package and package not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = [str(Path(__file__).resolve().parents[1] / package.replace(".", "/"))]
        sys.modules[package] = stub
    return importlib.import_module(module)


def compile_launches(path: Path, arch: int) -> int:
    import triton
    import triton.language as tl
    from triton.runtime import driver

    driver.set_active(_StubDriver(arch))  # for the rest of this (command-line) process
    return _compile_all(json.loads(path.read_text()), arch, triton, tl)


def _compile_all(launches: list[dict], arch: int, triton, tl) -> int:
    failures = skipped = 0
    for entry in launches:
        try:
            kernel = getattr(_import_kernels(entry["module"]), entry["kernel"])
        except ImportError as exc:  # e.g. baselines.channel_norm imports torch
            skipped += 1
            print(f"skip {entry['kernel']}: {exc}")
            continue
        args = [_value(a, tl) for a in entry["args"]]
        kwargs = {k: _value(v, tl) for k, v in entry["kwargs"].items()}
        constexprs = {k: v for k, v in entry["kwargs"].items() if "ptr" not in v}
        label = f"{entry['kernel']} {json.dumps(constexprs, sort_keys=True)}"
        try:
            kernel.warmup(*args, grid=(1,), **kwargs)
        except Exception as exc:  # noqa: BLE001 (every failure is reported, then exit 1)
            failures += 1
            print(f"FAIL {label}\n     {type(exc).__name__}: {str(exc).strip()[:2000]}")
        else:
            print(f"ok   {label}")
    print(f"triton {triton.__version__}, sm_{arch}: {len(launches) - failures - skipped} of "
          f"{len(launches)} launches compiled, {failures} failed, {skipped} skipped")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="record the launches (needs torch)")
    cap.add_argument("--out", type=Path, required=True)
    comp = sub.add_parser("compile", help="compile recorded launches (needs only triton)")
    comp.add_argument("launches", type=Path)
    comp.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    args = parser.parse_args(argv)
    if args.command == "capture":
        return capture(args.out)
    return compile_launches(args.launches, args.arch)


if __name__ == "__main__":
    sys.exit(main())
