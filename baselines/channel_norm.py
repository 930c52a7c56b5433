"""Layer norm over the channels of a (B, C, H, W) map: one function, several ways to compute it.

Restormer and NAFNet normalise every pixel over its C channels, on maps whose memory is
channels-first (NCHW). The reductions run across the slowest-varying axis, so how the norm is
written decides how many full-size passes over memory (and kernel launches) it costs; the
convolutions around it are memory-bound too at these widths, so the norm is a visible share of
the model's time (issue 13). Implementations (`impl`), all the same function:

- ``"layer_norm"``: `F.layer_norm` over the channels-last view. One op the FLOP counters know,
  but for an NCHW map the view is not contiguous: `F.layer_norm` copies it (a transposing copy)
  and the result is copied back to NCHW; under autocast it runs in float32, so both copies move
  float32. Zero-copy when the map itself is channels_last.
- ``"channels_first"``: the statistics by `torch.var_mean` over dim 1 of the NCHW map (one
  reduction, no layout change), then centre, scale and affine (three elementwise passes).
- ``"triton"``: one fused kernel each way (forward: read x once, write y once; backward: read x
  and dy once, write dx once, per-channel partial sums for the weight and bias gradients), for
  NCHW and channels_last maps alike. Runs on CUDA (and on a CPU through Triton's interpreter
  when `INTERPRET_ON_CPU` is set, for the tests); elsewhere, meta tensors included (the FLOP
  counters),
  it computes ``"layer_norm"``. Under autocast its output is in the autocast dtype: the
  official norm returns float32 there, which the convolution that consumes it (every use in
  Restormer and NAFNet) casts to the autocast dtype first; skipping that round trip is the
  same function.

The official formulations (Restormer's `to_3d` + manual mean/var, NAFNet's `LayerNormFunction`)
live beside the models that use them, since they are part of each model's official code.
`centered=False` is Restormer's BiasFree norm: ``x / sqrt(var + eps) * weight`` (variance
about the mean, x itself not centred, no bias).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:  # shipped with CUDA builds of torch; absent on some CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the "triton" impl then falls back everywhere
    triton = tl = None

NORM_IMPLS = ("layer_norm", "channels_first", "triton")


def check_norm_impl(impl: str, allowed: tuple[str, ...] = NORM_IMPLS) -> str:
    if impl not in allowed:
        raise ValueError(f"norm_impl must be one of {allowed}, got {impl!r}")
    return impl


# Callables (name, tensors read and written) told of every Triton launch: kernels are not ATen
# ops, so op counters (benchmarks.op_census) would not see them otherwise.
LAUNCH_OBSERVERS: list = []


def channel_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                 *, impl: str, centered: bool = True) -> torch.Tensor:
    """Normalise every pixel of `x` (B, C, H, W) over its channels; keeps x's memory format."""
    if impl == "triton":
        if triton_runs_on(x):
            if torch.compiler.is_compiling():  # opaque to torch.compile: run it eagerly
                return _eager_triton(x, weight, bias, eps, centered, _out_dtype(x))
            return _TritonChannelNorm.apply(x, weight, bias, eps, centered, _out_dtype(x))
        impl = "layer_norm"
    if impl == "layer_norm":
        return _layer_norm_channels_last_view(x, weight, bias, eps, centered)
    if impl == "channels_first":
        return _channels_first(x, weight, bias, eps, centered)
    raise ValueError(f"unknown channel-norm impl {impl!r}; choose from {NORM_IMPLS}")


# --------------------------------------------------------------------------- torch formulations


def _layer_norm_channels_last_view(x, weight, bias, eps, centered):
    t = x.permute(0, 2, 3, 1)
    if centered:
        y = F.layer_norm(t, weight.shape, weight, bias, eps)
    else:  # no fused op scales without centring
        y = t / torch.sqrt(t.var(-1, keepdim=True, unbiased=False) + eps) * weight
    y = y.permute(0, 3, 1, 2)
    # keep the caller's memory format (the permuted result is channels_last-strided)
    return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


def _channels_first(x, weight, bias, eps, centered):
    var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = ((x - mean) if centered else x) * rstd
    w = weight.view(1, -1, 1, 1)
    return y * w if bias is None else torch.addcmul(bias.view(1, -1, 1, 1), y, w)


# --------------------------------------------------------------------------- Triton


# Run the Triton kernels on CPU tensors too, through Triton's interpreter (tests, op counts):
# needs TRITON_INTERPRET=1 in the environment before triton is first imported.
INTERPRET_ON_CPU = False


def triton_runs_on(x: torch.Tensor) -> bool:
    """True where the Triton kernels run on `x`: CUDA, or a CPU when INTERPRET_ON_CPU is set
    and Triton interprets."""
    if x.device.type == "cuda":
        return _triton_importable()
    return (x.device.type == "cpu" and INTERPRET_ON_CPU and _interpreting()
            and _triton_importable())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return triton is not None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format, int, int]:
    """x made NCHW- or NHWC-dense, its format, and the (channel, pixel) strides of its flat
    (B, C, H*W) view."""
    if x.is_contiguous():
        return x, torch.contiguous_format, x.shape[2] * x.shape[3], 1
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, torch.channels_last, 1, x.shape[1]
    return x.contiguous(), torch.contiguous_format, x.shape[2] * x.shape[3], 1


def _blocks(c: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps): every channel of BLOCK_P pixels in one tile of about
    8K elements (at least 16 pixels: 32 bytes contiguous per channel row in bf16 NCHW)."""
    block_c = max(16, triton.next_power_of_2(c))
    block_p = max(16, min(256, 8192 // block_c))
    return block_c, block_p, 8 if block_c * block_p >= 8192 else 4


class _TritonChannelNorm(torch.autograd.Function):
    """The fused forward and backward kernels as one autograd op."""
    @staticmethod
    def forward(ctx, x, weight, bias, eps, centered, out_dtype):
        fwd, _ = _kernels(_interpreting())
        x, fmt, stride_c, stride_p = _layout(x)
        b, c, h, w = x.shape
        p = h * w
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.empty_like(x, dtype=out_dtype, memory_format=fmt)
        mean = torch.empty(b, p, device=x.device, dtype=acc)
        rstd = torch.empty(b, p, device=x.device, dtype=acc)
        block_c, block_p, warps = _blocks(c)
        grid = (triton.cdiv(p, block_p), b)
        _launch("triton::channel_norm_fwd", (x, y, mean, rstd), lambda: fwd[grid](
            x, weight, bias if bias is not None else weight, y, mean, rstd, c, p, c * p,
            stride_c, stride_p, eps, BLOCK_C=block_c, BLOCK_P=block_p, CENTERED=centered,
            HAS_BIAS=bias is not None, F64=acc == torch.float64, num_warps=warps))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.centered, ctx.has_bias, ctx.fmt = centered, bias is not None, fmt
        return y

    @staticmethod
    def backward(ctx, dy):
        _, bwd = _kernels(_interpreting())
        x, weight, mean, rstd = ctx.saved_tensors
        _, _, stride_c, stride_p = _layout(x)
        dy = dy.contiguous(memory_format=ctx.fmt)
        b, c, h, w = x.shape
        p = h * w
        block_c, block_p, warps = _blocks(c)
        n_blocks = triton.cdiv(p, block_p)
        dx = torch.empty_like(x, memory_format=ctx.fmt)
        dw = torch.empty(b * n_blocks, c, device=x.device, dtype=mean.dtype)
        db = torch.empty_like(dw) if ctx.has_bias else dw
        _launch("triton::channel_norm_bwd", (x, dy, dx, mean, rstd, dw), lambda: bwd[
            (n_blocks, b)](x, weight, mean, rstd, dy, dx, dw, db, c, p, c * p, stride_c,
                           stride_p, BLOCK_C=block_c, BLOCK_P=block_p, CENTERED=ctx.centered,
                           HAS_BIAS=ctx.has_bias, F64=mean.dtype == torch.float64,
                           num_warps=warps))
        dweight = dw.sum(0).to(weight.dtype)
        dbias = db.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx, dweight, dbias, None, None, None


def _launch(name: str, tensors: tuple, run) -> None:
    """Run a kernel launch under a profiler range; observers, if any, see it as one op (the
    ATen ops an interpreted launch makes on the CPU are hidden from them)."""
    if not LAUNCH_OBSERVERS and not torch.autograd.profiler._is_profiler_enabled:
        run()  # the hot path: no range (entering one dispatches an op even unprofiled)
        return
    with torch.profiler.record_function(name):
        if not LAUNCH_OBSERVERS:
            run()
            return
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            run()
    for observe in LAUNCH_OBSERVERS:
        observe(name, tensors)


def _eager_triton(x, weight, bias, eps, centered, out_dtype):
    return _compile_disabled_apply()(x, weight, bias, eps, centered, out_dtype)


@functools.lru_cache(maxsize=1)
def _compile_disabled_apply():
    # built on first use: torch.compiler.disable imports torch._dynamo (about a second)
    return torch.compiler.disable(_TritonChannelNorm.apply)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """The forward and backward kernels, JIT-wrapped on first use: `triton.jit` reads
    TRITON_INTERPRET when it wraps, so the tests can interpret them on a CPU. `interpret` only
    keys the cache."""
    return triton.jit(_norm_fwd_kernel), triton.jit(_norm_bwd_kernel)


# Kernel sources (module-level functions: Triton resolves `tl` through their globals).

def _norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, C, P, stride_b, stride_c, stride_p, eps,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CENTERED: tl.constexpr,
        HAS_BIAS: tl.constexpr, F64: tl.constexpr):
    acc_t = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    ps = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cs < C
    pmask = ps < P
    mask = cmask[:, None] & pmask[None, :]
    offs = (batch * stride_b + cs.to(tl.int64)[:, None] * stride_c
            + ps.to(tl.int64)[None, :] * stride_p)
    x = tl.load(X + offs, mask=mask, other=0.0).to(acc_t)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    if F64:
        rstd = 1.0 / tl.sqrt(var + eps)
    else:  # IEEE-rounded, as torch's sqrt and division
        rstd = tl.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var + eps))
    w = tl.load(W + cs, mask=cmask, other=0.0).to(acc_t)
    if CENTERED:
        y = xc * rstd[None, :] * w[:, None]
    else:
        y = x * rstd[None, :] * w[:, None]
    if HAS_BIAS:
        y += tl.load(B + cs, mask=cmask, other=0.0).to(acc_t)[:, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    stat = batch * P + ps
    tl.store(MEAN + stat, mean, mask=pmask)
    tl.store(RSTD + stat, rstd, mask=pmask)

def _norm_bwd_kernel(X, W, MEAN, RSTD, DY, DX, DW, DB, C, P, stride_b, stride_c, stride_p,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CENTERED: tl.constexpr,
        HAS_BIAS: tl.constexpr, F64: tl.constexpr):
    acc_t = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    ps = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cs < C
    pmask = ps < P
    mask = cmask[:, None] & pmask[None, :]
    offs = (batch * stride_b + cs.to(tl.int64)[:, None] * stride_c
            + ps.to(tl.int64)[None, :] * stride_p)
    x = tl.load(X + offs, mask=mask, other=0.0).to(acc_t)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(acc_t)
    stat = batch * P + ps
    mean = tl.load(MEAN + stat, mask=pmask, other=0.0)
    rstd = tl.load(RSTD + stat, mask=pmask, other=0.0)
    w = tl.load(W + cs, mask=cmask, other=0.0).to(acc_t)
    xc = tl.where(mask, x - mean[None, :], 0.0)
    gw = dy * w[:, None]
    if CENTERED:  # y = xhat * w + b, xhat = (x - mean) * rstd
        xhat = xc * rstd[None, :]
        c1 = tl.sum(gw * xhat, axis=0) / C
        c2 = tl.sum(gw, axis=0) / C
        dx = (gw - xhat * c1[None, :] - c2[None, :]) * rstd[None, :]
    else:  # y = x * rstd * w: dx = rstd * (gw - (x - mean) * rstd^2 * mean(gw * x))
        xhat = x * rstd[None, :]
        c1 = tl.sum(gw * x, axis=0) / C
        dx = (gw - xc * (rstd * rstd * c1)[None, :]) * rstd[None, :]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    row = (batch * tl.num_programs(0) + pid) * C
    tl.store(DW + row + cs, tl.sum(dy * xhat, axis=1), mask=cmask)
    if HAS_BIAS:
        tl.store(DB + row + cs, tl.sum(dy, axis=1), mask=cmask)

