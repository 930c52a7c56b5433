"""Serpent's fused Triton path ("new", scan_backend="triton") against the unfused path with
mamba-ssm's kernel ("old", scan_backend="mamba") on one GPU: correctness, CUDA kernels per
call, eager vs CUDA-graph latency, torch.compile, and the scan kernel's tiles.

    source .gpu/setup.sh && python -m benchmarks.serpent_kernels --out DIR [--deadline-s 230]

Writes DIR/serpent_kernels.jsonl, one JSON row per measurement, flushed as produced; every row
carries the card (torch.cuda.get_device_name), torch / triton / CUDA / mamba-ssm versions, the
selective-scan backends that actually ran (serpent.scan.used_backends) and a status: "ok",
"error" (the message, e.g. a Triton compilation error, in `message`) or "skipped" (the deadline,
or the fused path failed earlier). Parts, in order of importance:

  a  correctness, fp32 with TF32 off: the mixer (MSSM: pyramid, 4-direction scans, merge, norm,
     gate) fused vs unfused with mamba-ssm's selective_scan_fn vs unfused with the chunked
     PyTorch scan, output and every gradient (input and all parameters), relative L2 errors,
     at serpent_s's real shapes (level 0 at 256 and 1024 px, the bottleneck) and odd sizes,
     both scan paths; float64 fused vs chunked; the whole serpent_s new vs old (output within
     1e-5 relative, gradients) and bf16 autocast for context.
  b  CUDA kernels of one call (torch.profiler, after warm-up), serpent_t/s/b, inference,
     training forward+backward and full step (AdamW), bf16 and fp32, 256 and 1024 px, old and
     new; with GPU busy time (sum of kernel times) and the heaviest kernels at 1024 px.
  c  latency of serpent_s: eager median (CUDA events, warm-up, >= 50 iterations) vs CUDA-graph
     replay of the same step, 256 / 1024 px, bf16 / fp32, inference / training step, old / new;
     bf16 inference at 2048 / 4096 / 8192 px for the new path (and 2048 for the old).
  d  torch.compile(fullgraph=True) of serpent_s (new path), bf16 inference at 256 px: compile
     time and latency.
  h  where the host's time goes in eager serpent_s at 256 px (cProfile, own time per function).
  e  scan tiles (SERPENT_SCAN_TILES) of the fused mixer at serpent_s level 0, 1024 px.

Runs in about 3-4 minutes on one H200 (Triton compiles its kernels on first use, ~1 minute of
it); stops cleanly at --deadline-s, leaving "skipped" rows. Exit code 0 unless the output
folder cannot be written; failed checks are rows (`pass: false`), not exceptions.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.environment import git_state
from serpent import scan
from serpent.model import CONFIGS, MSSM, Serpent

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PATHS = {"new": "triton", "old": "mamba"}  # "old" is "chunked" where mamba-ssm is not built
MEASURED = ["new", "old"]  # paths parts b, c and e time (--paths)
DEVICE = "cuda"
MODELS = ("serpent_s", "serpent_t", "serpent_b")  # serpent_s first: the model
RES = (256, 1024)
BIG_RES = ((2048, ("new", "old")), (4096, ("new",)), (8192, ("new",)))


# --------------------------------------------------------------------------- plumbing


class Run:
    """Output file, deadline, environment fields and the fused path's health."""

    def __init__(self, out_dir: Path, deadline_s: float):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "serpent_kernels.jsonl"
        self.file = self.path.open("a")
        self.t0 = time.monotonic()
        self.deadline_s = deadline_s
        self.part_end_s = deadline_s  # a part stops starting measurements at its share
        self.fused_error = ""  # first error of the fused path: later new-path configs skip
        self.env = environment()
        self.rows: list[dict] = []

    def left(self) -> float:
        return min(self.deadline_s, self.part_end_s) - (time.monotonic() - self.t0)

    def write(self, row: dict) -> None:
        row = {**row, **self.env, "elapsed_s": round(time.monotonic() - self.t0, 1)}
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()
        self.rows.append(row)
        brief = {k: v for k, v in row.items() if k not in self.env and k not in (
            "grads", "top_kernels", "message")}
        print(json.dumps(brief, default=str)[:400] + (
            f"  message: {row['message'][:300]}" if row.get("message") else ""), flush=True)

    def attempt(self, part: str, config: dict, fn, *, new_path: bool = False,
                min_left: float = 5.0) -> None:
        """Run fn() -> dict of results as one row; errors and the deadline become rows too."""
        base = {"part": part, **config}
        if self.left() < min_left:
            self.write({**base, "status": "skipped", "message": "deadline (--deadline-s or "
                        "this part's share of it)"})
            return
        if new_path and self.fused_error:
            self.write({**base, "status": "skipped",
                        "message": "fused path failed earlier: " + self.fused_error[:300]})
            return
        scan.reset_used_backends()
        try:
            result = fn()
            row = {**base, "status": "ok", **result}
        except Exception as e:  # noqa: BLE001 - every failure is a row
            message = "".join(traceback.format_exception_only(type(e), e)).strip()
            if new_path and not self.fused_error and _is_fused_failure(e):
                self.fused_error = message
            if isinstance(e, torch.OutOfMemoryError):
                row = {**base, "status": "oom", "message": message[:500]}
            else:
                row = {**base, "status": "error", "message": message[:3000],
                       "traceback": traceback.format_exc()[-3000:]}
        finally:
            torch.cuda.synchronize()
        row["scan_backend"] = ",".join(sorted(scan.used_backends())) or "none"
        self.write(row)
        torch.cuda.empty_cache()


def _is_fused_failure(e: Exception) -> bool:
    """A failure of the Triton kernels themselves (compilation, launch), not e.g. an OOM."""
    text = f"{type(e).__module__}.{type(e).__name__}: {e}".lower()
    return not isinstance(e, torch.OutOfMemoryError) and any(
        k in text for k in ("triton", "compil", "ptx", "mlir", "kernel", "serpent::mssm"))


def environment() -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001
            return None

    commit = git_state()[0]
    return {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": version("triton"), "cuda": torch.version.cuda,
            "mamba_ssm": version("mamba_ssm"), "python": platform.python_version(),
            "git_commit": commit, "host": platform.node(),
            "scan_tiles": os.environ.get("SERPENT_SCAN_TILES", "default")}


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for matmuls and cuDNN on or off (restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tf32_fields() -> dict:
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def amp(dtype: torch.dtype):
    return (torch.autocast(torch.device(DEVICE).type, dtype=dtype) if dtype != torch.float32
            else contextlib.nullcontext())


def model(name: str, path: str, seed: int = 0) -> Serpent:
    torch.manual_seed(seed)
    return Serpent(**CONFIGS[name], scan_backend=PATHS[path]).to(DEVICE)


def same_weights(m: torch.nn.Module, backend: str) -> torch.nn.Module:
    """A copy of m whose mixers run `backend` (the attribute the model reads at each call)."""
    c = copy.deepcopy(m)
    for mod in c.modules():
        if hasattr(mod, "scan_backend"):
            mod.scan_backend = backend
    return c


# --------------------------------------------------------------------------- a: correctness


MIXER_CASES = [  # (label, dim, h, w, num_scales, path)
    ("serpent_s level0 @256px", 32, 64, 64, 3, "serpentine"),
    ("serpent_s level0 @1024px", 32, 256, 256, 3, "serpentine"),
    ("serpent_s bottleneck @1024px", 128, 64, 64, 3, "serpentine"),
    ("odd 37x53", 32, 37, 53, 3, "serpentine"),
    ("odd 37x53 raster", 32, 37, 53, 3, "raster"),
    ("odd 9x5 bottleneck-like", 128, 9, 5, 3, "serpentine"),
    ("odd 13x1 two scales", 48, 13, 1, 2, "serpentine"),
]


def perturbed_mixer(dim, num_scales, path, dtype=torch.float32, seed=0) -> MSSM:
    torch.manual_seed(seed)
    m = MSSM(dim=dim, num_scales=num_scales, scan_path=path).to(DEVICE, dtype)
    with torch.no_grad():  # away from the initialisation (D = 1, A = -(1..N), ...)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def mixer_outputs(m: MSSM, backend: str, x: torch.Tensor, grad_out: torch.Tensor):
    m = same_weights(m, backend)
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    names = ["input"] + [n for n, _ in m.named_parameters()]
    grads = torch.autograd.grad(y, [x, *m.parameters()], grad_out)
    return y.detach(), dict(zip(names, grads))


def compare(a, b) -> dict:
    (ya, ga), (yb, gb) = a, b
    grads = {k: rel(ga[k], gb[k]) for k in gb}
    return {"rel_out": rel(ya, yb), "rel_grad_max": max(grads.values()),
            "worst_grad": max(grads, key=grads.get), "grads": grads}


def part_a(run: Run) -> None:
    with tf32(False):
        for label, dim, h, w, scales, path in MIXER_CASES:
            cfg = {"check": "mixer fp32", "case": label, "dim": dim, "h": h, "w": w,
                   "num_scales": scales, "path": path, "tf32": False}

            def check(dim=dim, h=h, w=w, scales=scales, path=path):
                m = perturbed_mixer(dim, scales, path)
                torch.manual_seed(1)
                x = torch.randn(1, h, w, dim, device=DEVICE)
                g = torch.randn(1, h, w, dim, device=DEVICE)
                new, old = PATHS["new"], PATHS["old"]
                res = {b: mixer_outputs(m, b, x, g) for b in (new, old, "chunked")}
                out = {}
                for a, b in ((new, old), (new, "chunked"), (old, "chunked")):
                    out[f"{a}_vs_{b}"] = compare(res[a], res[b])
                pair = out[f"{new}_vs_{old}"]
                worst = max(pair["rel_out"], pair["rel_grad_max"])
                return {**out, "tolerance": 1e-4, "pass": worst < 1e-4}

            run.attempt("a", cfg, check, new_path=True)

        for res in RES:
            def whole(res=res):
                new = model("serpent_s", "new").eval()
                old = same_weights(new, PATHS["old"])
                x = torch.rand(1, 3, res, res, device=DEVICE)
                with torch.inference_mode():
                    r = rel(new(x), old(x))
                return {"rel_out": r, "tolerance": 1e-5, "pass": r < 1e-5}

            run.attempt("a", {"check": "serpent_s fp32 inference new vs old", "res": res,
                              "tf32": False}, whole, new_path=True)

        def whole_grads():
            new = model("serpent_s", "new").train()
            old = same_weights(new, PATHS["old"])
            x = torch.rand(1, 3, RES[0], RES[0], device=DEVICE)
            out = {}
            for name, m in (("new", new), ("old", old)):
                y = m(x)
                grads = torch.autograd.grad(y.square().mean(), list(m.parameters()))
                out[name] = (y.detach(), dict(zip([n for n, _ in m.named_parameters()], grads)))
            c = compare(out["new"], out["old"])
            return {**{k: v for k, v in c.items() if k != "grads"},
                    "tolerance_out": 1e-5, "pass": c["rel_out"] < 1e-5 and c["rel_grad_max"] < 1e-4}

        run.attempt("a", {"check": "serpent_s fp32 training new vs old", "res": RES[0],
                          "tf32": False}, whole_grads, new_path=True)

        def float64():
            m = perturbed_mixer(32, 3, "serpentine", torch.float64)
            torch.manual_seed(1)
            x = torch.randn(1, 40, 24, 32, device=DEVICE, dtype=torch.float64)
            g = torch.randn_like(x)
            c = compare(mixer_outputs(m, PATHS["new"], x, g), mixer_outputs(m, "chunked", x, g))
            return {**c, "tolerance": 1e-10,
                    "pass": max(c["rel_out"], c["rel_grad_max"]) < 1e-10}

        run.attempt("a", {"check": "mixer fp64 triton vs chunked", "h": 40, "w": 24, "dim": 32},
                    float64, new_path=True)

    def bf16():
        new = model("serpent_s", "new").eval()
        old = same_weights(new, PATHS["old"])
        ref = same_weights(new, "chunked").double()
        x = torch.rand(1, 3, RES[0], RES[0], device=DEVICE)
        with torch.inference_mode():
            with amp(torch.bfloat16):
                yn, yo = new(x).float(), old(x).float()
            y64 = ref(x.double())
        return {"rel_new_vs_old": rel(yn, yo), "rel_new_vs_fp64": rel(yn, y64),
                "rel_old_vs_fp64": rel(yo, y64)}

    run.attempt("a", {"check": "serpent_s bf16 autocast inference (context)", "res": RES[0]}, bf16,
                new_path=True)


# --------------------------------------------------------------------------- b: kernel counts


def profile_call(fn) -> dict:
    """CUDA kernels (and memcpy/memset) of one call of fn, and their summed GPU time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA][:2 if DEVICE == "cuda" else 1]
    with profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, copies, busy, by_name = 0, 0, 0.0, {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(e, "device_time", None)
        t = e.cuda_time if t is None else t
        if e.name.startswith(("Memcpy", "Memset")):
            copies += 1
            continue
        kernels += 1
        busy += t
        name = e.name[:80]
        by_name[name] = by_name.get(name, 0.0) + t
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"cuda_kernels": kernels, "memcpy_memset": copies, "gpu_busy_ms": busy / 1e3,
            "top_kernels": [{"name": k, "ms": round(v / 1e3, 4)} for k, v in top]}


def steps(m: Serpent, x: torch.Tensor, dtype: torch.dtype):
    """(inference, forward+backward, training step with AdamW, the optimizer) callables; the
    training step is what `bench run --mode train` times: zero_grad, forward, L1 loss,
    backward, AdamW (capturable: its step count stays on the GPU, as a CUDA graph needs)."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, capturable=DEVICE == "cuda")
    target = torch.rand_like(x)

    def infer():
        m.eval()
        with torch.inference_mode(), amp(dtype):
            return m(x)

    def fwd_bwd():
        m.train()
        with amp(dtype):
            loss = (m(x) - target).abs().mean()
        loss.backward()

    def train_step():
        opt.zero_grad(set_to_none=True)
        fwd_bwd()
        opt.step()

    return infer, fwd_bwd, train_step, opt


def part_b(run: Run) -> None:
    for name in MODELS:
        for path in MEASURED:
            for res in RES:
                for dname, dtype in DTYPES.items():
                    cfg = {"model": name, "path": path, "res": res, "dtype": dname, **tf32_fields()}

                    def measure(name=name, path=path, res=res, dtype=dtype):
                        m = model(name, path)
                        x = torch.rand(1, 3, res, res, device=DEVICE)
                        infer, fwd_bwd, train_step, _ = steps(m, x, dtype)
                        out = {}
                        for label, fn in (("infer", infer), ("fwd_bwd", fwd_bwd),
                                          ("train_step", train_step)):
                            for _ in range(2):  # warm-up: Triton compiles, cuDNN / cuBLAS picks
                                fn()
                            p = profile_call(fn)
                            out[label] = p if res == RES[-1] else {
                                k: v for k, v in p.items() if k != "top_kernels"}
                        return {"cuda_kernels_infer": out["infer"]["cuda_kernels"],
                                "cuda_kernels_fwd_bwd": out["fwd_bwd"]["cuda_kernels"],
                                "cuda_kernels_train_step": out["train_step"]["cuda_kernels"],
                                "gpu_busy_ms_infer": out["infer"]["gpu_busy_ms"],
                                "gpu_busy_ms_train_step": out["train_step"]["gpu_busy_ms"],
                                "profiles": out}

                    run.attempt("b", cfg, measure, new_path=path == "new", min_left=20)


# --------------------------------------------------------------------------- c: latency


def time_ms(fn, iters: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def stats(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_ms": statistics.median(ts), "iqr_ms": q[2] - q[0], "min_ms": min(ts),
            "iters": len(ts)}


def capture(fn, prepare=None, warmup: int = 3):
    """fn captured into a CUDA graph after a side-stream warm-up (PyTorch's whole-network
    recipe; as bench.measure.capture_cuda_graph); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            if prepare:
                prepare()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if prepare:
        prepare()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def latency(name: str, path: str, res: int, dtype: torch.dtype, mode: str, budget_s: float,
            graph: bool = True) -> dict:
    m = model(name, path)
    x = torch.rand(1, 3, res, res, device=DEVICE)
    infer, fwd_bwd, train_step, opt = steps(m, x, dtype)
    fn = infer if mode == "infer" else train_step
    for _ in range(3):
        fn()
    t = statistics.median(time_ms(fn, 3))
    iters = int(max(10 if res > 1024 else 50, min(200, budget_s * 1e3 / 2 / max(t, 1e-3))))
    eager = stats(time_ms(fn, iters))
    out = {"eager": eager, "eager_median_ms": eager["median_ms"]}
    if graph:
        if mode == "infer":
            replay = capture(fn)
        else:
            def step():  # zero_grad(set_to_none) stays outside: the graph owns the gradients
                fwd_bwd()
                opt.step()
            replay = capture(step, prepare=lambda: opt.zero_grad(set_to_none=True))
        replay()
        g = stats(time_ms(replay, iters))
        out.update(graph=g, graph_median_ms=g["median_ms"],
                   eager_over_graph=eager["median_ms"] / g["median_ms"])
    return out


def part_c(run: Run) -> None:
    for res in RES:
        for dname, dtype in DTYPES.items():
            for mode in ("infer", "train"):
                for path in MEASURED:
                    cfg = {"model": "serpent_s", "path": path, "res": res, "dtype": dname,
                           "mode": mode, "batch": 1, **tf32_fields()}
                    run.attempt("c", cfg, lambda path=path, res=res, dtype=dtype, mode=mode:
                                latency("serpent_s", path, res, dtype, mode, budget_s=4.0),
                                new_path=path == "new", min_left=15)
    for res, paths in BIG_RES:
        for path in (p for p in paths if p in MEASURED):
            cfg = {"model": "serpent_s", "path": path, "res": res, "dtype": "bf16",
                   "mode": "infer", "batch": 1, **tf32_fields()}

            def big(path=path, res=res):
                torch.cuda.reset_peak_memory_stats()
                out = latency("serpent_s", path, res, torch.bfloat16, "infer", budget_s=6.0)
                return {**out, "mem_peak_alloc_mb": torch.cuda.max_memory_allocated() / 2**20}

            run.attempt("c", cfg, big, new_path=path == "new", min_left=25)


def part_h(run: Run) -> None:
    """Where the host's time goes in eager serpent_s at 256 px (launch-bound there): cProfile
    of 30 forwards, the functions with the most own time."""
    import cProfile
    import pstats

    def host(dtype):
        m = model("serpent_s", "new")
        x = torch.rand(1, 3, RES[0], RES[0], device=DEVICE)
        infer = steps(m, x, dtype)[0]
        for _ in range(5):
            infer()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(30):
            infer()
        prof.disable()
        host_ms = (time.perf_counter() - t0) / 30 * 1e3
        torch.cuda.synchronize()
        st = pstats.Stats(prof)
        top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:30]
        return {"host_ms_per_forward_profiled": host_ms, "top_own_time": [
            {"function": f"{Path(f).name}:{line}({name})", "calls_per_forward": nc / 30,
             "own_ms_per_forward": tt / 30 * 1e3, "cum_ms_per_forward": ct / 30 * 1e3}
            for (f, line, name), (_, nc, tt, ct, _) in top]}

    for dname, dtype in DTYPES.items():
        run.attempt("h", {"model": "serpent_s", "path": "new", "res": RES[0], "dtype": dname,
                          "mode": "infer"}, lambda dtype=dtype: host(dtype), new_path=True)


# --------------------------------------------------------------------------- d: compile


def part_d(run: Run) -> None:
    def compiled(mode):
        import torch._dynamo

        torch._dynamo.reset()
        m = model("serpent_s", "new").eval()
        x = torch.rand(1, 3, RES[0], RES[0], device=DEVICE)
        c = torch.compile(m, fullgraph=True, mode=mode)

        def fn():
            with torch.inference_mode(), amp(torch.bfloat16):
                return c(x)

        t0 = time.perf_counter()
        y = fn()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        with torch.inference_mode(), amp(torch.bfloat16):
            r = rel(y.float(), m(x).float())
        for _ in range(5):
            fn()
        ts = stats(time_ms(fn, 50))
        return {"compile_s": compile_s, "rel_vs_eager": r, **ts}

    for mode in ("default", "reduce-overhead"):  # each compile takes tens of seconds
        run.attempt("d", {"model": "serpent_s", "path": "new", "res": RES[0], "dtype": "bf16",
                          "mode": "infer", "compile_mode": mode, "fullgraph": True},
                    lambda mode=mode: compiled(mode), new_path=True, min_left=45)


# --------------------------------------------------------------------------- e: scan tiles


# chunk, forward channels, backward channels, forward warps, backward warps, segment (chunks)
TILES = ["64,2,4,4,8,32", "64,2,4,4,8,8", "64,2,4,4,8,128", "64,1,4,4,8,16", "64,4,4,4,8,8",
         "32,2,4,4,4,32"]


def part_e(run: Run) -> None:
    def mixer_time(backend, dtype):
        m = perturbed_mixer(32, 3, "serpentine")
        m = same_weights(m, backend)
        side = RES[-1] // 4
        x = torch.randn(1, side, side, 32, device=DEVICE, requires_grad=True)

        def fwd():
            with torch.no_grad(), amp(dtype):
                return m(x)

        def fwd_bwd():
            with amp(dtype):
                y = m(x)
            y.float().sum().backward()

        out = {}
        for label, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            for _ in range(3):
                fn()
            out[label + "_median_ms"] = stats(time_ms(fn, 20))["median_ms"]
        return out

    saved = os.environ.get("SERPENT_SCAN_TILES")
    try:
        for dname, dtype in DTYPES.items():
            if "old" in MEASURED:
                run.attempt("e", {"mixer": "serpent_s level0 @1024px", "backend": PATHS["old"],
                                  "dtype": dname},
                            lambda dtype=dtype: mixer_time(PATHS["old"], dtype), min_left=10)
            for tiles in TILES:
                os.environ["SERPENT_SCAN_TILES"] = tiles
                run.attempt("e", {"mixer": "serpent_s level0 @1024px", "backend": PATHS["new"],
                                  "dtype": dname, "tiles": tiles},
                            lambda dtype=dtype: mixer_time(PATHS["new"], dtype), new_path=True,
                            min_left=10)
    finally:
        if saved is None:
            os.environ.pop("SERPENT_SCAN_TILES", None)
        else:
            os.environ["SERPENT_SCAN_TILES"] = saved


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for serpent_kernels.jsonl")
    p.add_argument("--deadline-s", type=float, default=230.0,
                   help="stop starting new measurements after this many seconds")
    p.add_argument("--parts", default="abchde", help="which parts to run, e.g. 'ab'")
    p.add_argument("--paths", default="new,old",
                   help="paths parts b, c and e time: 'new' alone saves half of their time")
    args = p.parse_args(argv)
    MEASURED[:] = [x for x in args.paths.split(",") if x in PATHS]
    if not scan.mamba_available():  # the unfused reference then uses the chunked PyTorch scan
        PATHS["old"] = "chunked"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    run = Run(args.out, args.deadline_s)
    run.write({"part": "env", "status": "ok", "mamba_available": scan.mamba_available(),
               "old_backend": PATHS["old"], "measured_paths": MEASURED,
               "argv": sys.argv[1:], **tf32_fields()})
    parts = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "h": part_h}
    # shares of the deadline (part a also pays for most Triton compilations), cumulative over
    # the parts chosen
    weights = {"a": 0.35, "b": 0.25, "c": 0.22, "d": 0.11, "e": 0.07, "h": 0.04}
    total, done = sum(weights[k] for k in args.parts), 0.0
    for key in args.parts:
        done += weights[key]
        run.part_end_s = done / total * args.deadline_s
        try:
            parts[key](run)
        except Exception as e:  # noqa: BLE001 - a broken part must not lose the others
            run.write({"part": key, "status": "error", "message": repr(e)[:2000],
                       "traceback": traceback.format_exc()[-3000:]})
    summary(run)
    return 0


def summary(run: Run) -> None:
    rows = run.rows
    print("\n== summary ==", flush=True)
    for r in rows:
        if r["part"] == "b" and r["status"] == "ok":
            print(f"kernels {r['model']:9s} {r['path']} {r['res']:5d} {r['dtype']}: infer "
                  f"{r['cuda_kernels_infer']:5d}, fwd+bwd {r['cuda_kernels_fwd_bwd']:5d}, step "
                  f"{r['cuda_kernels_train_step']:5d}")
        elif r["part"] == "c" and r["status"] == "ok":
            ratio = r.get("eager_over_graph")
            print(f"latency {r['path']} {r['res']:5d} {r['dtype']} {r['mode']:5s}: eager "
                  f"{r['eager_median_ms']:.3f} ms, graph {r.get('graph_median_ms', math.nan):.3f}"
                  f" ms, ratio {ratio if ratio is None else round(ratio, 2)}")
        elif r["part"] == "a":
            print(f"check {r.get('check')} {r.get('case', r.get('res', ''))}: {r['status']} "
                  f"pass={r.get('pass')}")
        elif r["status"] != "ok":
            print(f"{r['part']} {r['status']}: {str(r.get('message'))[:200]}")
    print(f"rows: {run.path} ({time.monotonic() - run.t0:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
