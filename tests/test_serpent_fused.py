"""Serpent's fused path (serpent.fused, serpent.fused_linear and their Triton kernels) on the
CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET).

Against independent references: the unfused mixer with the float64 sequential scan (output and
every gradient, < 1e-10), each fused linear form against torch in float64, today's whole model
in float32 (< 1e-5), torch.compile(fullgraph) against eager, the eager path against the custom
ops, the kernel launches of one serpent_s forward and forward + backward (a budget a later change
cannot silently exceed), and the FLOP handles against the counters on the unfused graph. The
interpreter runs every Triton program in Python: shapes stay tiny.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from serpent import fused, fused_linear, scan
from serpent.model import CONFIGS, MSSM, Serpent

pytest.importorskip("triton")

TINY = dict(embed_dim=8, depths=(1, 1), dec_depths=(1,), num_scales=2, d_state=4)
INFER_BUDGET, TRAIN_BUDGET = 140, 450  # launches of a serpent_s forward / forward + backward


@pytest.fixture(scope="module", autouse=True)
def small_tiles():
    """Small scan tiles (chunks of 16 steps, 2 channels per program): sequences span several
    chunks and channels several programs, and the interpreter stays fast."""
    saved = os.environ.get("SERPENT_SCAN_TILES")
    os.environ["SERPENT_SCAN_TILES"] = "16,2,2,1,1"
    yield
    if saved is None:
        os.environ.pop("SERPENT_SCAN_TILES")
    else:
        os.environ["SERPENT_SCAN_TILES"] = saved


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def mssm_pair(*, dim=2, d_state=2, num_scales=3, path="serpentine", dtype=torch.float64,
              reference="sequential", seed=0):
    """(fused, unfused reference) MSSM with identical, perturbed (not just initial) weights."""
    torch.manual_seed(seed)
    ref = MSSM(dim=dim, d_state=d_state, num_scales=num_scales, scan_path=path,
               scan_backend=reference).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    out = MSSM(dim=dim, d_state=d_state, num_scales=num_scales, scan_path=path,
               scan_backend="triton").to(dtype)
    out.load_state_dict(ref.state_dict())
    return out, ref


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("shape,num_scales,path", [
    ((1, 5, 7), 3, "serpentine"),  # odd sizes: partial pooling windows, clamped interpolation
    ((2, 6, 4), 2, "raster"),      # batch 2, raster seams
    ((1, 1, 6), 1, "serpentine"),  # one row: columns are single steps; no pyramid, no fuse
])
def test_fused_core_matches_unfused_float64(shape, num_scales, path):
    """Output and every gradient (input and all parameters of the mixer) against the unfused
    MSSM whose scan is the float64 sequential loop: the same function to rounding."""
    check_against_sequential(shape, num_scales, path)


@pytest.mark.parametrize("tiles", ["4,2,2,1,1,2", "4,2,2,1,1,1", "8,4,2,1,1,4"])
def test_segmented_forward_scan_matches_float64(monkeypatch, tiles):
    """Sequences split into segments scanned in parallel, forward and backward (a summary
    launch, then the scan that chains the other segments' summaries): 35 steps in chunks of 4
    are 9 chunks, 5 segments of 2 chunks at scale 0, 2 at scale 1, 1 at scale 2 (its later
    programs have no work)."""
    monkeypatch.setenv("SERPENT_SCAN_TILES", tiles)
    launches = collections.Counter()
    kernels = importlib.import_module("serpent.kernels")
    run = type(kernels.scan_fwd_kernel).run

    def counting(self, *args, **kwargs):
        if "SUMMARY" in kwargs:  # the scans, forward and backward; other kernels pass
            launches[self.fn.__name__, kwargs["SUMMARY"]] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(type(kernels.scan_fwd_kernel), "run", counting)
    check_against_sequential((1, 5, 7), 3, "serpentine")
    assert launches == {(name, summary): 1 for name in ("scan_fwd_kernel", "scan_bwd_kernel")
                        for summary in (True, False)}, launches


def check_against_sequential(shape, num_scales, path):
    fast, ref = mssm_pair(num_scales=num_scales, path=path)
    x = torch.randn(*shape, 2, dtype=torch.float64, requires_grad=True)
    scan.reset_used_backends()
    y = fast(x)
    y_ref = ref(x)
    assert rel(y, y_ref) < 1e-10
    grad_out = torch.randn_like(y_ref)
    names = ["input"] + [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad(y, [x, *fast.parameters()], grad_out)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], grad_out)
    assert scan.used_backends() == {"triton", "sequential"}
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.dtype == g_ref.dtype and rel(g, g_ref) < 1e-10, name


def test_whole_model_matches_todays_path_float32():
    """A tiny Serpent, fp32: the fused path against today's unfused path (chunked scan)."""
    torch.manual_seed(0)
    ref = Serpent(**TINY, scan_backend="chunked").eval()
    fast = Serpent(**TINY, scan_backend="triton").eval()
    fast.load_state_dict(ref.state_dict())  # the same parameters and keys
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        assert rel(fast(x), ref(x)) < 1e-5


def test_bf16_inputs_keep_their_dtype_and_stay_close():
    """Activations in bf16 (as under autocast): output in bf16, rounded where today's path
    rounds, close to the float64 reference."""
    fast, ref = mssm_pair(num_scales=2)
    x = torch.randn(1, 4, 6, 2, dtype=torch.float64)
    fast.float()
    xz = fast.in_proj(x.float()).bfloat16()
    with torch.no_grad():
        y = fast._fused_core(xz)
        assert y.dtype == torch.bfloat16
        y_ref = _unfused_core(ref, xz.double())
    assert rel(y.double(), y_ref) < 2e-2


def _unfused_core(mixer, xz):
    """MSSM.forward between in_proj and out_proj (the unfused path)."""
    out_proj = mixer.out_proj
    in_proj = mixer.in_proj
    try:
        mixer.in_proj = torch.nn.Identity()
        mixer.out_proj = torch.nn.Identity()
        return mixer(xz)
    finally:
        mixer.in_proj, mixer.out_proj = in_proj, out_proj


def test_compile_fullgraph_traces_the_fused_block_and_matches_eager():
    """torch.compile(fullgraph=True) of a fused Serpent block (both custom ops, their fake
    implementations and autograd; aot_eager: no Inductor codegen on this machine): forward and
    gradients equal to eager."""
    from serpent.model import SerpentBlock

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = SerpentBlock(dim=4, mlp_ratio=2.0, d_state=2, num_scales=2, scan_backend="triton")
    x = torch.randn(1, 3, 2, 4, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, y_eager = compiled(x), block(x)
    torch.testing.assert_close(y, y_eager)
    wrt = [x, block.mixer.ssms[1].A_logs, block.ffn.fc1.weight, block.norm1.weight]
    for a, b in zip(torch.autograd.grad(y.sum(), wrt), torch.autograd.grad(y_eager.sum(), wrt)):
        torch.testing.assert_close(a, b)


def test_fake_tensors_give_shapes_and_run_nothing():
    fast, _ = mssm_pair(num_scales=3, dtype=torch.float32)
    with torch.device("meta"):
        x = torch.empty(2, 9, 11, 2)
    fast.to("meta")
    scan.reset_used_backends()
    y = fast(x)
    assert y.shape == (2, 9, 11, 2) and y.device.type == "meta"
    assert scan.used_backends() == set()


# --------------------------------------------------------------------------- backend selection


def test_backend_selection_is_explicit():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fused.use_fused("triton", cpu, torch.float32, 3)
    assert not fused.use_fused("auto", cpu, torch.float32, 3)  # CPU: chunked scan
    assert not fused.use_fused("mamba", cuda, torch.float32, 3)  # the unfused path
    assert fused.use_fused("auto", cuda, torch.float32, 3) == fused.TRITON_INSTALLED
    assert not fused.use_fused("auto", cuda, torch.float32, fused.MAX_SCALES + 1)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    fast, _ = mssm_pair(num_scales=1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="runs on CUDA"):
        fast(torch.randn(1, 2, 2, 2))


# --------------------------------------------------------------------------- launches


_NO_KERNEL = {  # ATen ops that launch no CUDA kernel: views, allocation, metadata
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "slice", "select",
    "unsqueeze", "squeeze", "as_strided", "detach", "alias", "split", "split_with_sizes",
    "chunk", "unbind", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "lift_fresh", "_reshape_alias", "narrow", "unflatten", "flatten", "view_as", "expand_as",
    "_has_compatible_shallow_copy_type", "promote_types",
}


class LaunchCount(TorchDispatchMode):
    """Counts ATen ops that launch a kernel (each at least one on CUDA) plus Triton launches.
    Deterministic and device-free; the GPU benchmark counts real kernels with torch.profiler."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.split("::")[-1] not in _NO_KERNEL and not name.startswith("serpent::"):
            self.counter[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted_launches(monkeypatch):
    """Triton kernels replaced by counters (their outputs stay uninitialised: only the number of
    launches is looked at) and the op's implementation counted from inside."""
    counter = collections.Counter()
    for module in ("serpent.kernels", "serpent.linear_kernels"):
        kernels = importlib.import_module(module)
        for name in dir(kernels):
            if name.endswith("_kernel"):
                monkeypatch.setattr(kernels, name, _CountedKernel(counter, "triton::" + name))
    for module in (fused, fused_linear):
        for impl in ("_forward", "_backward_impl"):
            original = getattr(module, impl)

            def counted(*args, _original=original, **kwargs):
                with LaunchCount(counter):
                    return _original(*args, **kwargs)

            monkeypatch.setattr(module, impl, counted)
    return counter


class _CountedKernel:
    def __init__(self, counter, name):
        self.counter, self.name = counter, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter[self.name] += 1
        return launch


def count(counter, fn):
    counter.clear()
    with LaunchCount(counter):
        fn()
    return sum(counter.values()), collections.Counter(counter)


def test_serpent_s_kernel_launch_budget(counted_launches):
    """Kernel-launching ops of one serpent_s forward (inference, fp32) and training forward +
    backward, counted as the GPU would launch them. Today's unfused path: 544 ATen ops in an
    inference forward (~930 CUDA kernels on an H200, issue #12). Per Serpent block the fused
    path launches 10 Triton kernels forward (4 linear layers with their LayerNorm / GELU /
    residual, and the mixer core: pyramid, x_proj of all scales, scan, merge, fuse, norm/gate)
    and 17 backward (+ 5 zeroed gradient buffers); the budgets leave a few launches of slack.
    (Where a sequence is longer than one scan segment, 2048 steps, each scan adds a summary
    launch: not at 64 px.)"""
    torch.manual_seed(0)
    model = Serpent(**CONFIGS["serpent_s"], scan_backend="triton")
    x = torch.rand(1, 3, 64, 64)
    blocks = 12
    model.eval()
    with torch.no_grad():
        n_infer, ops = count(counted_launches, lambda: model(x))
    triton = {k: v for k, v in ops.items() if k.startswith("triton::")}
    assert sum(triton.values()) == 10 * blocks, triton
    assert not any(k in ops for k in ("aten::gather", "aten::upsample_bilinear2d", "aten::addmm",
                                      "aten::native_layer_norm", "aten::_to_copy")), ops
    assert n_infer <= INFER_BUDGET, ops
    model.train()
    n_step, ops = count(counted_launches, lambda: model(x).sum().backward())
    assert sum(v for k, v in ops.items() if k.startswith("triton::")) == (10 + 17) * blocks
    assert ops["aten::zeros"] == 5 * blocks
    assert n_step <= TRAIN_BUDGET, ops


def test_bf16_autocast_adds_no_casts_inside_blocks(counted_launches):
    """Under autocast the unfused block casts every Linear's weight, bias and LayerNorm output
    (323 launches per serpent_s forward instead of 196 when counted so): the fused block reads
    fp32 weights in its kernels. Only the convolutions outside the blocks still cast."""
    torch.manual_seed(0)
    model = Serpent(**CONFIGS["serpent_s"], scan_backend="triton").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        n_bf16, ops = count(counted_launches, lambda: model(x))
    with torch.no_grad():
        n_fp32, _ = count(counted_launches, lambda: model(x))
    assert ops["aten::_to_copy"] <= 2 * 9 + 1  # 9 convolutions: weight and bias, and the input
    assert n_bf16 - n_fp32 == ops["aten::_to_copy"]


# --------------------------------------------------------------------------- FLOPs


def test_flop_formula_equals_the_counters_on_the_unfused_graph():
    """mssm_core_macs equals what the counters count for the unfused mixer core, category by
    category, on meta tensors (including the dt_rank 1 case, whose dt_proj they miss)."""
    from bench.measure import flops as bench_flops

    for dim, scales, hw in ((32, 3, (64, 48)), (48, 2, (17, 9)), (16, 1, (8, 8)), (16, 3, (9, 9))):
        with torch.device("meta"):
            mixer = MSSM(dim=dim, num_scales=scales, scan_backend="chunked")
        inner = mixer.dwconv.weight.shape[0]
        counted = bench_flops.count_flops(_Core(mixer), (1, *hw, 2 * inner))
        expected = fused.mssm_core_macs(1, *hw, inner, scales, 16, mixer.ssms[0].dt_rank)
        got = {k: v * 1e9 for k, v in counted.by_category_gmacs.items()}
        for key, macs in expected.items():
            assert got.get(key, 0) == pytest.approx(macs, rel=1e-12), (key, dim, scales)
        torch_macs = sum(v for k, v in expected.items()
                         if k in ("conv", "matmul", "selective_scan"))
        assert counted.gflops_torch * 1e9 == pytest.approx(2 * torch_macs, rel=1e-12)


@pytest.fixture
def counters_with_fused_handles(monkeypatch):
    """bench/measure/flops.py with the handles of serpent.flops registered: the change the harness
    needs to count the fused ops (see the report); here applied to a patched copy."""
    from torch.utils.flop_counter import flop_registry

    from bench.measure import flops as bench_flops
    from serpent.flops import FLOP_HANDLES, torch_flops

    recorder = bench_flops._OpRecorder.__torch_dispatch__

    def dispatch(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name not in FLOP_HANDLES or self.paused:
            return recorder(self, func, types, args, kwargs)
        for category, macs in FLOP_HANDLES[name](args).items():
            self.macs[category] += macs
        return func(*args, **(kwargs or {}))

    monkeypatch.setattr(bench_flops._OpRecorder, "__torch_dispatch__", dispatch)
    for name in FLOP_HANDLES:
        packet = getattr(torch.ops.serpent, name.split("::")[1])
        monkeypatch.setitem(flop_registry, packet,
                            lambda *args, out_val=None, _n=name, **kw: torch_flops(_n, args))
    return bench_flops


@pytest.mark.parametrize("name", ["serpent_t", "serpent_s"])
def test_whole_model_counts_the_same_on_both_paths(counters_with_fused_handles, name):
    """Params and FLOPs (both counters, every category) of the fused model equal the unfused
    model's at an odd size: the CPU FLOP gate cannot tell the paths apart."""
    counts = {}
    for backend in ("chunked", "triton"):
        with torch.device("meta"):
            model = Serpent(**CONFIGS[name], scan_backend=backend)
        counts[backend] = counters_with_fused_handles.count_flops(model, (1, 3, 80, 112))
    a, b = counts["chunked"], counts["triton"]
    assert a.gmacs == pytest.approx(b.gmacs, rel=1e-12)
    assert a.gflops_torch == pytest.approx(b.gflops_torch, rel=1e-12)
    for k, v in a.by_category_gmacs.items():
        assert b.by_category_gmacs.get(k, 0) == pytest.approx(v, rel=1e-12), k
    assert "serpent::mssm_core" not in b.unsupported_ops


class _Core(torch.nn.Module):
    """The unfused MSSM between in_proj and out_proj, for counting."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, xz):
        return _unfused_core(self.mixer, xz)


# --------------------------------------------------------------------------- linear layers


@pytest.mark.parametrize("case", ["ln", "ln_gelu", "residual", "residual_scale", "plain"])
def test_fused_linear_matches_torch_float64(case):
    """Each form of serpent::fused_linear against nn.LayerNorm / nn.Linear / F.gelu and the
    residual add in float64, output and every gradient, on a strided (permuted) input map."""
    from serpent.fused_linear import fused_linear as linear

    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(2, 5, 3, 12, dtype=dt).permute(0, 2, 1, 3).requires_grad_(True)
    lin = torch.nn.Linear(12, 20 if case.startswith("ln") else 12).to(dt)
    ln = torch.nn.LayerNorm(12).to(dt)
    with torch.no_grad():
        ln.weight.add_(torch.randn(12, dtype=dt))
        ln.bias.add_(torch.randn(12, dtype=dt))
    res = torch.randn(2, 3, 5, 12, dtype=dt, requires_grad=True)
    scale = torch.tensor([2.0, 0.0], dtype=dt)
    kw, ref, wrt = {}, None, [x, lin.weight, lin.bias]
    if case.startswith("ln"):
        kw["ln"], ref, wrt = ln, lin(ln(x)), wrt + [ln.weight, ln.bias]
        if case == "ln_gelu":
            kw["gelu"], ref = True, torch.nn.functional.gelu(ref)
    elif case.startswith("residual"):
        kw["residual"], wrt = res, wrt + [res]
        ref = res + (scale[:, None, None, None] if case == "residual_scale" else 1) * lin(x)
        if case == "residual_scale":
            kw["scale"] = scale
    else:
        ref = lin(x)
    out = linear(x, lin.weight, lin.bias, **kw)
    assert out.shape == ref.shape and rel(out, ref) < 1e-12
    grad_out = torch.randn_like(ref)
    for g, g_ref in zip(torch.autograd.grad(out, wrt, grad_out),
                        torch.autograd.grad(ref, wrt, grad_out)):
        assert rel(g, g_ref) < 1e-12


def test_fused_linear_float32_uses_dot_and_matches():
    """The tl.dot path (float32, what the GPU runs): LayerNorm + GELU layer against torch."""
    from serpent.fused_linear import fused_linear as linear

    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 40, requires_grad=True)
    lin, ln = torch.nn.Linear(40, 80), torch.nn.LayerNorm(40)
    out = linear(x, lin.weight, lin.bias, ln=ln, gelu=True)
    ref = torch.nn.functional.gelu(lin(ln(x)))
    assert rel(out, ref) < 1e-6
    g, g_ref = (torch.autograd.grad(y.square().sum(), [x, lin.weight, ln.weight])
                for y in (out, ref))
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-5


def test_eager_path_equals_the_custom_op_path():
    """Eager calls skip the dispatcher (fused.eager_call); under any dispatch mode the custom ops
    run instead. Same kernels: identical outputs and gradients."""

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    from serpent.model import SerpentBlock

    torch.manual_seed(0)
    block = SerpentBlock(dim=4, mlp_ratio=2.0, d_state=2, num_scales=2,
                         scan_backend="triton").double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for mode in (contextlib.nullcontext(), PassThrough()):
        with mode:
            y = block(x)
            grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
        results.append((y, grads))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_fused_mixer_matches_mamba_on_cuda():
    """On a GPU: the fused mixer against the unfused one with mamba-ssm's kernel (or the chunked
    scan without mamba-ssm), fp32 without TF32, output and every gradient (1e-4 relative).
    benchmarks/serpent_kernels.py checks the real shapes."""
    reference = "mamba" if scan.mamba_available() else "chunked"
    fast, ref = mssm_pair(dim=8, d_state=4, num_scales=3, dtype=torch.float32,
                          reference=reference)
    fast, ref = fast.cuda(), ref.cuda()
    x = torch.randn(1, 13, 11, 8, device="cuda", requires_grad=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        y, y_ref = fast(x), ref(x)
        grad_out = torch.randn_like(y_ref)
        grads = torch.autograd.grad(y, [x, *fast.parameters()], grad_out)
        grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], grad_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert rel(y, y_ref) < 1e-4
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) < 1e-4
