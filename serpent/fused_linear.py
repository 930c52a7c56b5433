"""A Serpent block's linear layers as one custom op each, with their LayerNorm, GELU and residual.

    fused_linear(x, W, b, ln=(w, b, eps))             -> LN(x) @ W^T + b            (in_proj)
    fused_linear(x, W, b, ln=..., gelu=True)          -> GELU(LN(x) @ W^T + b)      (fc1)
    fused_linear(y, W, b, residual=x, scale=s)        -> x + s * (y @ W^T + b)      (out_proj, fc2)

Why: under autocast every nn.Linear of the unfused block launches casts of its weight, its bias
and (after a LayerNorm, which autocast runs in fp32) its input, besides the matmul, the norm, the
GELU and the residual add: ~30 launches per block in bf16. Here each layer is one Triton launch
in any dtype (serpent.linear_kernels: the fp32 weights are rounded to the activation dtype in
the kernel), so a block is 10 launches forward: 4 of these and 6 of serpent.fused. The
semantics, including where values are rounded to the activation dtype, are the unfused block's
under the same autocast state; tests compare the two.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from serpent import fused


def activation_dtype(x: Tensor) -> torch.dtype:
    """The dtype the unfused layers would multiply in: autocast's, if it is on, else x's."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor, *,
                 ln: Optional[torch.nn.LayerNorm] = None, gelu: bool = False,
                 residual: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                 act_dtype: Optional[torch.dtype] = None) -> Tensor:
    """(b, h, w, K) -> (b, h, w, N); see the module docstring. `scale` (b,) multiplies the
    projection before the residual add (stochastic depth); `act_dtype` defaults to
    `activation_dtype(x)`."""
    act = act_dtype or activation_dtype(x)
    ln_w, ln_b, eps = (ln.weight, ln.bias, float(ln.eps)) if ln is not None else (None, None, 0.0)
    tensors = [x, weight, bias, ln_w, ln_b, residual]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = (x, weight, bias, ln_w, ln_b, residual, scale, eps, bool(gelu), act)
    if not fused.eager_call(x):
        return torch.ops.serpent.fused_linear(*args, save)[0]
    fused._check_runnable(x, 1)
    fused.scan._USED.add(fused.BACKEND)
    if not save:
        return _forward(_kernels(), *args, False)[0]
    return _FusedLinearFunction.apply(*args)


def fused_linear_macs(args) -> dict[str, int]:
    """Multiply-adds of one `serpent::fused_linear` call, as the counters count the unfused
    layers: the matmul (M x K x N), and 5 per element of a LayerNorm prologue (fvcore's norm
    convention). GELU and the residual add are elementwise (not counted)."""
    x, weight, ln_w = args[0], args[1], args[3]
    m = x.shape[0] * x.shape[1] * x.shape[2]
    n, k = weight.shape
    return {"matmul": m * k * n, "norm": 5 * m * k if ln_w is not None else 0}


# --------------------------------------------------------------------------- the custom op


def _out_dtype(residual: Optional[Tensor], act: torch.dtype) -> torch.dtype:
    return act if residual is None else torch.promote_types(residual.dtype, act)


@torch.library.custom_op("serpent::fused_linear", mutates_args=())
def _fused_linear_op(x: Tensor, weight: Tensor, bias: Tensor, ln_weight: Optional[Tensor],
                     ln_bias: Optional[Tensor], residual: Optional[Tensor],
                     scale: Optional[Tensor], eps: float, gelu: bool, act_dtype: torch.dtype,
                     save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, GELU pre-activation if saved, LayerNorm (mean, rstd) per row if saved)."""
    fused._check_runnable(x, 1)
    fused.scan._USED.add(fused.BACKEND)
    return _forward(_kernels(), x, weight, bias, ln_weight, ln_bias, residual, scale, eps, gelu,
                    act_dtype, save)


def _kernels():
    """serpent.linear_kernels, imported on first use (CPU code paths never need Triton)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = importlib.import_module("serpent.linear_kernels")
    return _KERNELS


_KERNELS = None


@_fused_linear_op.register_fake
def _(x, weight, bias, ln_weight, ln_bias, residual, scale, eps, gelu, act_dtype, save):
    b, h, w, k = x.shape
    n = weight.shape[0]
    out = x.new_empty(b, h, w, n, dtype=_out_dtype(residual, act_dtype))
    pre = x.new_empty((b, h, w, n) if gelu and save else (0,), dtype=act_dtype)
    stats = x.new_empty((b * h * w, 2) if ln_weight is not None and save else (0,),
                        dtype=fused._compute_dtype(act_dtype))
    return out, pre, stats


def _map_strides(t: Tensor) -> Optional[tuple[int, int, int]]:
    """(batch, pixel, channel) strides of a (b, h, w, c) map whose pixels are evenly spaced (a
    contiguous channels-last map or a permuted NCHW one); None otherwise."""
    _, h, w, _ = t.shape
    sb, sh, sw, sc = t.stride()
    if w == 1:
        return sb, sh, sc
    if h == 1 or sh == w * sw:
        return sb, sw, sc
    return None


def _readable(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    strides = _map_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _map_strides(t)
    return t, strides


def _tiles(kernels, k: int, ct: torch.dtype, ln: bool) -> dict:
    kp = max(16, fused._pow2(k))
    if ct == torch.float64:  # broadcast products instead of tl.dot (tests): small tiles
        return dict(BM=16, BN=16, BK=16, KP=kp)
    return dict(BM=32 if ln else 64, BN=64, BK=32, KP=kp)


def _forward(kernels, x, weight, bias, ln_weight, ln_bias, residual, scale, eps, gelu, act,
             save):
    b, h, w, k = x.shape
    n, m = weight.shape[0], b * h * w
    ct = fused._compute_dtype(act)
    ln = ln_weight is not None
    if ln and k > 256:
        raise RuntimeError(f"fused_linear: a LayerNorm prologue needs <= 256 channels, got {k}")
    x, (sxb, sxp, sxc) = _readable(x)
    rb, rp, rc = 0, 0, 0
    if residual is not None:
        residual, (rb, rp, rc) = _readable(residual)
    out = x.new_empty(b, h, w, n, dtype=_out_dtype(residual, act))
    pre = x.new_empty((b, h, w, n) if gelu and save else (0,), dtype=act)
    stats = x.new_empty((m, 2) if ln and save else (0,), dtype=ct)
    t = _tiles(kernels, k, ct, ln)
    kernels.linear_fwd_kernel[(-(-m // t["BM"]), -(-n // t["BN"]))](
        x, weight, bias, ln_weight if ln else bias, ln_bias if ln else bias,
        residual if residual is not None else x, scale if scale is not None else bias, out,
        pre if pre.numel() else out, stats if stats.numel() else out,
        m, k, n, h * w, sxb, sxp, sxc, rb, rp, rc, eps,
        LN=ln, GELU=gelu, RESIDUAL=residual is not None, SCALE=scale is not None,
        SAVE=save, **t, **fused._dot_args(kernels, ct, act), ACT=_tl(kernels, act))
    return out, pre, stats


def _tl(kernels, dtype: torch.dtype):
    return {torch.float16: kernels.tl.float16, torch.bfloat16: kernels.tl.bfloat16,
            torch.float32: kernels.tl.float32, torch.float64: kernels.tl.float64}[dtype]


def _save(ctx, x, weight, bias, ln_weight, ln_bias, residual, scale, gelu, act, pre, stats):
    ctx.gelu, ctx.act = gelu, act
    ctx.has_ln, ctx.has_residual = ln_weight is not None, residual is not None
    ctx.save_for_backward(x, weight, bias, ln_weight, ln_bias, scale, pre, stats)


def _param_grads(ctx, flat, weight, bias, ln_weight, ln_bias):
    """(d W, d b, d LN weight, d LN bias): views of the flat buffer in the parameters' dtypes."""
    n, k = weight.shape
    grads = [flat[:n * k].view(n, k), flat[n * k:n * k + n]]
    if ctx.has_ln:
        grads += [flat[n * k + n:n * k + n + k], flat[n * k + n + k:]]
    params = [weight, bias, ln_weight, ln_bias]
    return [fused._as(g, p.dtype) for g, p in zip(grads, params)] + [None] * (4 - len(grads))


def _setup_context(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, residual, scale, eps, gelu, act, save = inputs
    out, pre, stats = output
    ctx.mark_non_differentiable(pre, stats)
    ctx.set_materialize_grads(False)
    ctx.saved = save
    _save(ctx, x, weight, bias, ln_weight, ln_bias, residual, scale, gelu, act, pre, stats)


def _backward(ctx, dout, *_):
    if not ctx.saved:
        raise RuntimeError("serpent::fused_linear was called with save=False; call it through "
                           "serpent.fused_linear.fused_linear to differentiate it")
    x, weight, bias, ln_weight, ln_bias, scale, pre, stats = ctx.saved_tensors
    dx, flat = torch.ops.serpent.fused_linear_backward(
        dout, x, weight, ln_weight, ln_bias, scale, pre, stats, ctx.gelu, ctx.act)
    dw, db, dln_w, dln_b = _param_grads(ctx, flat, weight, bias, ln_weight, ln_bias)
    return (dx, dw, db, dln_w, dln_b, dout if ctx.has_residual else None, None, None, None, None,
            None)


class _FusedLinearFunction(torch.autograd.Function):
    """The eager path (fused.eager_call): the op's implementations without the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias, ln_weight, ln_bias, residual, scale, eps, gelu, act):
        out, pre, stats = _forward(_kernels(), x, weight, bias, ln_weight, ln_bias, residual,
                                   scale, eps, gelu, act, True)
        _save(ctx, x, weight, bias, ln_weight, ln_bias, residual, scale, gelu, act, pre, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, ln_weight, ln_bias, scale, pre, stats = ctx.saved_tensors
        dx, flat = _backward_impl(_kernels(), dout.contiguous(), x, weight, ln_weight, ln_bias,
                                  scale, pre, stats, ctx.gelu, ctx.act)
        dw, db, dln_w, dln_b = _param_grads(ctx, flat, weight, bias, ln_weight, ln_bias)
        return (dx, dw, db, dln_w, dln_b, dout if ctx.has_residual else None, None, None, None,
                None)


@torch.library.custom_op("serpent::fused_linear_backward", mutates_args=())
def _fused_linear_backward_op(dout: Tensor, x: Tensor, weight: Tensor,
                              ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                              scale: Optional[Tensor], pre: Tensor, stats: Tensor, gelu: bool,
                              act_dtype: torch.dtype) -> list[Tensor]:
    """[d x, flat fp32 buffer of (d W, d b, d LN weight, d LN bias)] in 2 kernels + 1 zeroing."""
    fused.scan._USED.add(fused.BACKEND)
    return _backward_impl(_kernels(), dout.contiguous(), x, weight, ln_weight, ln_bias, scale,
                          pre, stats, gelu, act_dtype)


@_fused_linear_backward_op.register_fake
def _(dout, x, weight, ln_weight, ln_bias, scale, pre, stats, gelu, act_dtype):
    n, k = weight.shape
    extra = 2 * k if ln_weight is not None else 0
    return [torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(n * k + n + extra, dtype=fused._compute_dtype(act_dtype))]


def _backward_impl(kernels, dout, x, weight, ln_weight, ln_bias, scale, pre, stats, gelu, act):
    b, h, w, k = x.shape
    n, m = weight.shape[0], b * h * w
    ct = fused._compute_dtype(act)
    ln = ln_weight is not None
    x, (sxb, sxp, sxc) = _readable(x)
    flat = torch.zeros(n * k + n + (2 * k if ln else 0), dtype=ct, device=x.device)
    dw, db = flat[:n * k], flat[n * k:n * k + n]
    dlnw, dlnb = (flat[n * k + n:n * k + n + k], flat[n * k + n + k:]) if ln else (db, db)
    dx = torch.empty(b, h, w, k, dtype=x.dtype, device=x.device)
    t = _tiles(kernels, k, ct, ln)
    common = dict(LN=ln, GELU=gelu, SCALE=scale is not None,
                  **fused._dot_args(kernels, ct, act), ACT=_tl(kernels, act))
    gelu_pre = pre if gelu else dout
    scale_ = scale if scale is not None else dout
    bk = t["KP"] if ln else t["BK"] * 2
    bn_dx = 16 if ct == torch.float64 else 32
    kernels.linear_bwd_dx_kernel[(-(-m // t["BM"]), -(-k // bk))](
        dout, gelu_pre, scale_, weight, x, ln_weight if ln else weight,
        stats if ln else dout, dx, dlnw, dlnb, m, k, n, h * w, sxb, sxp, sxc,
        BM=t["BM"] if not ln else min(t["BM"], 16 if k > 128 else 32), BN=bn_dx, BK=bk,
        **common)
    rc, br = 512, 16 if ct == torch.float64 else 32
    bn = min(64, max(16, fused._pow2(n))) if ct != torch.float64 else 16
    bkw = min(64, max(16, fused._pow2(k))) if ct != torch.float64 else 16
    kernels.linear_bwd_dw_kernel[(-(-m // rc), -(-n // bn), -(-k // bkw))](
        dout, gelu_pre, scale_, x, ln_weight if ln else weight, ln_bias if ln else weight,
        stats if ln else dout, dw, db, m, k, n, h * w, sxb, sxp, sxc,
        RC=rc, BR=br, BN=bn, BK=bkw, **common)
    return [dx, flat]


_fused_linear_op.register_autograd(_backward, setup_context=_setup_context)
