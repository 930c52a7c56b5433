"""The channel layer norm formulations against the float64 formula, forward and gradients; the
Triton kernels run on the CPU through Triton's interpreter."""
import pytest
import torch

from baselines import channel_norm as cn

triton = pytest.importorskip("triton")


@pytest.fixture
def interpret(monkeypatch):
    """Triton kernels on CPU tensors, interpreted (tests/conftest.py sets TRITON_INTERPRET)."""
    monkeypatch.setattr(cn, "INTERPRET_ON_CPU", True)


def formula(x, w, b, eps, centered):
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    y = ((x - mu) if centered else x) / torch.sqrt(var + eps) * w.view(1, -1, 1, 1)
    return y if b is None else y + b.view(1, -1, 1, 1)


def inputs(c, fmt, centered, dtype=torch.float64):
    g = torch.Generator().manual_seed(c)
    x = (torch.randn(2, c, 5, 7, generator=g, dtype=dtype) * 3 + 1).contiguous(memory_format=fmt)
    w = torch.randn(c, generator=g, dtype=dtype) * 0.5 + 1
    b = torch.randn(c, generator=g, dtype=dtype) if centered else None
    dy = torch.randn(2, c, 5, 7, generator=g, dtype=dtype)
    return x, w, b, dy


@pytest.mark.parametrize("impl", cn.NORM_IMPLS)
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("c", [6, 48])
def test_equals_formula_float64(interpret, impl, centered, fmt, c):
    x, w, b, dy = inputs(c, fmt, centered)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = cn.channel_norm(x, w, b, 1e-5, impl=impl, centered=centered)
    assert y.is_contiguous(memory_format=fmt) and y.dtype == x.dtype
    ref = formula(x, w, b, 1e-5, centered)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y, params, dy)
    for got, want in zip(grads, torch.autograd.grad(ref, params, dy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if impl == "triton":  # really the kernels, not the fallback
        assert "Triton" in type(y.grad_fn).__name__


def test_triton_launches_are_observable(interpret):
    seen = []
    cn.LAUNCH_OBSERVERS.append(lambda name, tensors: seen.append(name))
    try:
        x, w, b, dy = inputs(8, torch.contiguous_format, True)
        y = cn.channel_norm(x.requires_grad_(), w, b, 1e-6, impl="triton")
        y.backward(dy)
    finally:
        cn.LAUNCH_OBSERVERS.clear()
    assert seen == ["triton::channel_norm_fwd", "triton::channel_norm_bwd"]


def test_triton_output_in_autocast_dtype(interpret):
    """Under autocast the fused norm writes what the next convolution reads (the official norm
    returns float32 there, which that convolution casts first)."""
    x, w, b, _ = inputs(8, torch.contiguous_format, True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cn.channel_norm(x, w, b, 1e-6, impl="triton")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), formula(x, w, b, 1e-6, True), rtol=1e-2, atol=1e-2)


def test_triton_falls_back_off_triton_devices():
    x, w, b, _ = inputs(6, torch.contiguous_format, True)
    assert not cn.triton_runs_on(x)
    y = cn.channel_norm(x, w, b, 1e-6, impl="triton")  # CPU without the interpreter
    torch.testing.assert_close(y, formula(x, w, b, 1e-6, True))
    meta = cn.channel_norm(x.to("meta"), w.to("meta"), b.to("meta"), 1e-6, impl="triton")
    assert meta.shape == x.shape  # FLOP counting on meta tensors runs the F.layer_norm path


def test_unknown_impl():
    with pytest.raises(ValueError, match="norm_impl"):
        cn.check_norm_impl("apex")
