"""Selective scan: chunked backend vs the sequential loop (and an independent float64 recurrence),
custom-op behaviour on meta tensors and under autograd, backend resolution, MAC formula."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from serpent import scan
from serpent.scan import (chunked_scan, reset_used_backends, resolve_backend, selective_scan,
                          selective_scan_macs, sequential_scan, used_backends)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b=2, d=8, l=37, n=4, g=None, D=True, z=True, bias=True, dtype=torch.float64,
                seed=0):
    """Random inputs in Mamba's regime (A < 0, small positive-ish delta); g=None: ungrouped B/C."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    bc = (b, n, l) if g is None else (b, g, n, l)
    return dict(u=r(b, d, l), delta=0.5 * r(b, d, l), A=-torch.rand(d, n, generator=gen,
                dtype=dtype) * 4 - 0.1, B=r(*bc), C=r(*bc), D=r(d) if D else None,
                z=r(b, d, l) if z else None, delta_bias=0.3 * r(d) if bias else None)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()  # 0 when both are exactly 0


def recurrence(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Independent float64 reference: explicit per-(batch, channel) python recurrence."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    per_group = d // B.shape[1]
    y = torch.zeros(b, d, l, dtype=torch.float64)
    for i, c in itertools.product(range(b), range(d)):
        h = torch.zeros(A.shape[1], dtype=torch.float64)
        for t in range(l):
            grp = c // per_group
            h = torch.exp(delta[i, c, t] * A[c]) * h + delta[i, c, t] * u[i, c, t] * B[i, grp, :, t]
            y[i, c, t] = h @ C[i, grp, :, t]
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y


CASES = [dict(), dict(D=False, z=False, bias=False), dict(g=2), dict(g=4, l=64, z=False),
         dict(l=1), dict(l=50, bias=False)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("softplus", [False, True])
def test_chunked_equals_sequential_float64(case, softplus):
    inp = make_inputs(**case)
    for t in inp.values():
        if t is not None:
            t.requires_grad_(True)
    ref = sequential_scan(**inp, delta_softplus=softplus)
    grad_out = torch.randn_like(ref)
    wrt = [t for t in inp.values() if t is not None]
    ref_grads = torch.autograd.grad(ref, wrt, grad_out)
    # l not a multiple of the chunk; the default chunk; time blocks carrying the state
    for chunk, block in ((4, None), (7, None), (None, None), (4, 10), (None, 16)):
        out = chunked_scan(**inp, delta_softplus=softplus, chunk=chunk, block=block)
        assert rel(out, ref) < 1e-10
        for name, g, rg in zip(NAMES, torch.autograd.grad(out, wrt, grad_out), ref_grads):
            assert rel(g, rg) < 1e-10, (name, chunk, block)


@pytest.fixture()
def fresh_work_buffers():
    """Each test starts and ends without the scan's reused CPU buffers: a buffer made under
    inference_mode cannot be written outside it (test_buffers_made_under_inference_mode...)."""
    scan._WORKSPACE.__dict__.pop("bufs", None)
    yield
    scan._WORKSPACE.__dict__.pop("bufs", None)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_without_gradients_over_several_time_blocks(context, dtype, fresh_work_buffers):
    """The untracked path (what Serpent runs for CPU inference at 256 px and above) scans in
    place in reused work buffers: each time block must start from the previous block's true
    final state, never from a buffer the next block overwrites. l=300 in blocks of 64: 5 blocks
    (the last one partial), against the independent float64 recurrence."""
    inp64 = make_inputs(b=1, d=4, l=300, n=4, g=2, seed=3)
    ref = recurrence(**inp64, delta_softplus=True)
    inp = {k: None if v is None else v.to(dtype) for k, v in inp64.items()}
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    with context():
        for chunk, block in ((None, 64), (8, 64), (16, 100)):
            out = chunked_scan(**inp, delta_softplus=True, chunk=chunk, block=block)
            assert out.dtype == dtype and not out.requires_grad
            assert rel(out.double(), ref) < tol, (chunk, block)
        out = selective_scan(**inp, delta_softplus=True, backend="chunked")  # the op's path
    assert rel(out.double(), ref) < tol


def test_buffers_made_under_inference_mode_serve_a_later_no_grad_call(fresh_work_buffers):
    """Validation (inference_mode) then anything untracked outside it, in one process: the
    reused CPU work buffers must not be inference tensors (the `bench train --val-set` crash of
    issue #15: "Inplace update to inference tensor outside InferenceMode is not allowed"), also
    for a training step, whose scan runs untracked inside the custom op."""
    inp = make_inputs(b=1, d=4, l=40, n=4, dtype=torch.float32)
    ref = sequential_scan(**{k: None if v is None else v.double() for k, v in inp.items()})
    with torch.inference_mode():
        chunked_scan(**inp)
    with torch.no_grad():
        out = chunked_scan(**inp)
    assert rel(out.double(), ref) < 1e-5
    wrt = [inp["u"].requires_grad_(True), inp["delta"].requires_grad_(True)]
    torch.autograd.grad(selective_scan(**inp).sum(), wrt)


def test_default_cpu_block_plan_with_several_blocks(monkeypatch, fresh_work_buffers):
    """The default plan (chunk_plan) splits long inputs into blocks of BLOCK_ELEMENTS/(b*d*n)
    steps; made small here so that l=300 gives several blocks without a large input."""
    monkeypatch.setattr(scan, "BLOCK_ELEMENTS", 4 * 8 * 4 * 48)  # 48 steps per block
    inp = make_inputs(b=4, d=8, l=300, n=4, dtype=torch.float32, seed=4)
    T, block = scan.chunk_plan(4, 8, 4, 300, "cpu")
    assert block == 48 and 300 > 2 * block
    ref = sequential_scan(**{k: None if v is None else v.double() for k, v in inp.items()},
                          delta_softplus=True)
    with torch.inference_mode():
        out = chunked_scan(**inp, delta_softplus=True)
    assert rel(out.double(), ref) < 1e-5


def test_reused_cpu_work_buffers_never_leak_into_outputs():
    small = make_inputs(l=40, dtype=torch.float32)
    big = make_inputs(d=16, l=300, g=4, dtype=torch.float32, seed=1)
    with torch.no_grad():
        first = chunked_scan(**small, delta_softplus=True)
        kept = first.clone()
        other = chunked_scan(**big, delta_softplus=True)  # grows and overwrites the buffers
        again = chunked_scan(**small, delta_softplus=True)
    assert torch.equal(first, kept) and torch.equal(first, again)
    ref = sequential_scan(**{k: None if v is None else v.double() for k, v in big.items()},
                          delta_softplus=True)
    assert rel(other.double(), ref) < 1e-5


def test_sequential_matches_independent_recurrence():
    inp = make_inputs(b=1, d=4, l=9, n=3, g=2)
    out = sequential_scan(**inp, delta_softplus=True)
    assert rel(out, recurrence(**inp, delta_softplus=True)) < 1e-12


def test_float32_close_to_float64_reference():
    inp64 = make_inputs(b=2, d=16, l=300, n=8, g=2)
    inp32 = {k: None if v is None else v.float() for k, v in inp64.items()}
    out = selective_scan(**inp32, delta_softplus=True, backend="chunked")
    assert out.dtype == torch.float32
    assert rel(out.double(), sequential_scan(**inp64, delta_softplus=True)) < 1e-5


def test_long_sequence_strong_decay_is_finite():
    """Large |A| * delta over long chunks must not overflow (no exp of positive numbers)."""
    inp = make_inputs(b=1, d=4, l=2048, n=4, dtype=torch.float32)
    inp["A"] = inp["A"] * 100
    inp["delta"] = inp["delta"] * 20  # softplus(delta) up to ~30: decays down to exp(-12000)
    out = chunked_scan(**inp, delta_softplus=True, chunk=256)
    assert torch.isfinite(out).all()
    ref = sequential_scan(**{k: None if v is None else v.double() for k, v in inp.items()},
                          delta_softplus=True)
    assert rel(out.double(), ref) < 1e-5


@pytest.mark.parametrize("softplus,need", [(False, NAMES), (True, ("u", "A", "B", "D", "z")),
                                           (True, ("C",)), (False, ("delta_bias",))])
def test_custom_op_forward_backward(softplus, need):
    inp = make_inputs(g=2)
    wrt = {k: v.requires_grad_(True) for k, v in inp.items() if k in need}
    reset_used_backends()
    out = selective_scan(**inp, delta_softplus=softplus)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(wrt.values()), grad_out)
    assert used_backends() == {"chunked"}
    ref = sequential_scan(**inp, delta_softplus=softplus)
    assert rel(out, ref) < 1e-10
    for name, g, rg in zip(wrt, grads, torch.autograd.grad(ref, list(wrt.values()), grad_out)):
        assert g.dtype == inp[name].dtype and rel(g, rg) < 1e-10, name


@pytest.mark.parametrize("only", ["A", "B", "u"])
def test_gradient_of_one_input_alone(only):
    """Only one input tracked (e.g. A alone: the decays need a gradient, the inputs x do not)."""
    inp = make_inputs(l=20)
    inp[only].requires_grad_(True)
    grad_out = torch.randn(2, 8, 20, dtype=torch.float64)
    (g,) = torch.autograd.grad(chunked_scan(**inp, delta_softplus=True, chunk=4), inp[only],
                               grad_out)
    (ref,) = torch.autograd.grad(sequential_scan(**inp, delta_softplus=True), inp[only], grad_out)
    assert rel(g, ref) < 1e-10


def test_sequential_reference_returns_the_input_dtype():
    inp = {k: None if v is None else v.to(torch.bfloat16) for k, v in make_inputs(l=6).items()}
    assert sequential_scan(**inp).dtype == torch.bfloat16


def test_custom_op_sequential_backend_is_reported():
    inp = make_inputs(l=5)
    reset_used_backends()
    out = selective_scan(**inp, backend="sequential")
    assert used_backends() == {"sequential"}
    assert rel(out, chunked_scan(**inp)) < 1e-12


def test_low_precision_input_returns_input_dtype():
    inp = {k: None if v is None else v.to(torch.bfloat16) for k, v in make_inputs().items()}
    out = selective_scan(**inp)
    assert out.dtype == torch.bfloat16
    ref = sequential_scan(**{k: None if v is None else v.double() for k, v in inp.items()})
    assert rel(out.double(), ref) < 1e-2


def test_outer_autocast_does_not_lower_scan_precision():
    inp = {k: None if v is None else v.float() for k, v in make_inputs().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(**inp, backend="sequential")  # its einsums would autocast to bf16
    ref = sequential_scan(**{k: None if v is None else v.double() for k, v in inp.items()})
    assert out.dtype == torch.float32 and rel(out.double(), ref) < 1e-5


def test_meta_tensors_give_shape_and_run_nothing():
    inp = make_inputs(b=3, d=8, l=1000, g=4)
    inp = {k: None if v is None else v.float().to("meta") for k, v in inp.items()}
    reset_used_backends()
    out = selective_scan(**inp, delta_softplus=True)
    assert out.device.type == "meta" and out.shape == (3, 8, 1000) and out.dtype == torch.float32
    assert used_backends() == set()


def test_is_one_op_for_dispatch_modes():
    """FLOP counters see exactly one op node whatever backend runs underneath."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    inp = make_inputs(dtype=torch.float32)
    with Record() as rec:
        selective_scan(**inp)
    assert rec.ops == [torch.ops.serpent.selective_scan.default]


def test_opcheck():
    inp = make_inputs(l=12, g=2, dtype=torch.float32)
    args = tuple(inp[k] for k in NAMES) + (True, "chunked")
    torch.library.opcheck(torch.ops.serpent.selective_scan.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_resolve_backend():
    assert resolve_backend("cpu") == "chunked"
    assert resolve_backend("cpu", "sequential") == "sequential"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("cpu", "mamba")
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("cpu", "triton")
    if not scan.mamba_available():
        assert resolve_backend("cuda") == "chunked"
        with pytest.raises(RuntimeError, match="mamba_ssm"):
            resolve_backend("cuda", "mamba")
    assert resolve_backend("cuda", dtype=torch.float64) == "chunked"  # the kernel has no fp64


def test_macs_formula():
    assert selective_scan_macs(2, 3, 5, 7, False, False) == 9 * 2 * 3 * 5 * 7
    assert selective_scan_macs(2, 3, 5, 7, True, True) == 9 * 2 * 3 * 5 * 7 + 2 * 2 * 3 * 5


@pytest.mark.gpu
def test_cuda_backends_agree():
    """mamba-ssm's kernel against the chunked scan on the same inputs, forward and backward.
    Each side must report the backend it asked for: if mamba_ssm does not import, "auto" would
    run the chunked scan on both sides and the comparison would pass trivially."""
    if not scan.mamba_available():
        pytest.skip("mamba_ssm (with its compiled CUDA extension) does not import here: "
                    "nothing to compare the chunked scan with")
    inp = make_inputs(d=16, l=300, g=2)
    inp = {k: None if v is None else v.float().cuda().requires_grad_(True)
           for k, v in inp.items()}
    wrt = [v for v in inp.values() if v is not None]
    reset_used_backends()
    ref = selective_scan(**inp, delta_softplus=True, backend="chunked")
    ref_grads = torch.autograd.grad(ref, wrt, torch.ones_like(ref))
    assert used_backends() == {"chunked"}
    assert resolve_backend("cuda", "auto", torch.float32) == "mamba"
    reset_used_backends()
    out = selective_scan(**inp, delta_softplus=True)  # "auto" on CUDA: the kernel
    grads = torch.autograd.grad(out, wrt, torch.ones_like(out))
    assert used_backends() == {"mamba"}, f"auto ran {used_backends()}, not mamba-ssm's kernel"
    assert rel(out, ref) < 1e-4
    for name, g, rg in zip([k for k, v in inp.items() if v is not None], grads, ref_grads):
        assert rel(g, rg) < 1e-3, name
