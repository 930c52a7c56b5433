"""Triton kernels of `serpent::fused_linear` (launched by serpent.fused_linear).

    out = act(LN(x) @ W^T + b)                 LN prologue (in_proj, fc1), GELU epilogue (fc1)
    out = residual + scale * (x @ W^T + b)      residual epilogue (out_proj, fc2; scale = drop path)

Rows m = (batch, pixel) of channels-last maps; x and the residual may be strided views (Serpent's
stages see NCHW maps as channels-last views), read through (batch, pixel, channel) strides. The
weights are read in their own dtype (fp32 parameters under autocast) and rounded to the
activation dtype ACT in the kernel, where the unfused model's autocast would launch a cast; the
LayerNorm output, the projection output and the GELU output are rounded where it rounds them.
Products run in CT (fp32, fp64 for fp64) through tl.dot: 16-bit operands are exact in TF32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from serpent.kernels import _dot

_SHAPES = ("M", "K", "N", "HW", "sxb", "sxp", "sxc", "srb", "srp", "src")


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) \
        + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _rows(rm, HW, sb, sp):
    """Offsets of rows m = batch * HW + pixel in a map with batch / pixel strides (int64)."""
    return (rm // HW).to(tl.int64) * sb + (rm % HW).to(tl.int64) * sp


@triton.jit
def _grad_rows(g_ptr, pre_ptr, scale_ptr, rm, mm, rn, mn, N, HW, GELU: tl.constexpr,
               SCALE: tl.constexpr, ACT: tl.constexpr, CT: tl.constexpr):
    """d(x @ W^T + b) of rows rm, columns rn (valid where mm, mn) from d out: through the GELU
    (pre-activation saved by the forward) or the drop-path scale; rounded to ACT as the unfused
    backward's matmuls."""
    mask = mm[:, None] & mn[None, :]
    g = tl.load(g_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=mask, other=0).to(CT)
    if GELU:
        pre = tl.load(pre_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=mask,
                      other=0).to(CT)
        g = g.to(ACT).to(CT) * _gelu_grad(pre)
    if SCALE:
        # rows past M read no scale: their batch index is past the scale vector's end
        g = g * tl.load(scale_ptr + rm // HW, mask=mm, other=0).to(CT)[:, None]
    return g.to(ACT).to(CT)


@triton.jit(do_not_specialize=_SHAPES)
def linear_fwd_kernel(x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, res_ptr, scale_ptr, out_ptr,
                      pre_ptr, stats_ptr, M, K, N, HW, sxb, sxp, sxc, srb, srp, src, eps,
                      LN: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
                      SCALE: tl.constexpr, SAVE: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
                      USE_DOT: tl.constexpr, PRECISION: tl.constexpr, CT: tl.constexpr,
                      ACT: tl.constexpr):
    """A BM x BN tile of the output. With LN the whole row (K <= KP) is loaded once: two-pass
    mean / variance as torch's LayerNorm, normalised, rounded to ACT (autocast's cast of the
    LayerNorm output) and multiplied in one dot; (mean, rstd) saved for backward."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    mm = rm < M
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = rn < N
    x_row = _rows(rm, HW, sxb, sxp)
    if LN:
        rk = tl.arange(0, KP)
        mk = rk < K
        m2 = mm[:, None] & mk[None, :]
        xv = tl.load(x_ptr + x_row[:, None] + rk[None, :] * sxc, mask=m2, other=0).to(CT)
        mean = tl.sum(xv, axis=1) / K
        d = tl.where(m2, xv - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps)
        lw = tl.load(lnw_ptr + rk, mask=mk, other=0).to(CT)
        lb = tl.load(lnb_ptr + rk, mask=mk, other=0).to(CT)
        a = (d * rstd[:, None] * lw[None, :] + lb[None, :]).to(ACT).to(CT)
        w = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=mk[:, None] & mn[None, :],
                    other=0).to(ACT).to(CT)
        acc = _dot(a, w, USE_DOT, PRECISION)
        if SAVE:
            if tl.program_id(1) == 0:
                tl.store(stats_ptr + 2 * rm, mean, mask=mm)
                tl.store(stats_ptr + 2 * rm + 1, rstd, mask=mm)
    else:
        acc = tl.zeros((BM, BN), CT)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            a = tl.load(x_ptr + x_row[:, None] + rk[None, :] * sxc, mask=mm[:, None] & mk[None, :],
                        other=0).to(ACT).to(CT)
            w = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=mk[:, None] & mn[None, :],
                        other=0).to(ACT).to(CT)
            acc += _dot(a, w, USE_DOT, PRECISION)
    acc += tl.load(b_ptr + rn, mask=mn, other=0).to(CT)[None, :]
    m2 = mm[:, None] & mn[None, :]
    out_off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if GELU:
        pre = acc.to(ACT).to(CT)  # the projection's output in the activation dtype
        if SAVE:
            tl.store(pre_ptr + out_off, pre, mask=m2)
        acc = _gelu(pre)
    if RESIDUAL:
        y = acc.to(ACT).to(CT)
        if SCALE:
            y = y * tl.load(scale_ptr + rm // HW, mask=mm, other=0).to(CT)[:, None]
        acc = tl.load(res_ptr + _rows(rm, HW, srb, srp)[:, None] + rn[None, :] * src, mask=m2,
                      other=0).to(CT) + y
    tl.store(out_ptr + out_off, acc, mask=m2)


@triton.jit(do_not_specialize=_SHAPES)
def linear_bwd_dx_kernel(g_ptr, pre_ptr, scale_ptr, w_ptr, x_ptr, lnw_ptr, stats_ptr, dx_ptr,
                         dlnw_ptr, dlnb_ptr, M, K, N, HW, sxb, sxp, sxc,
                         LN: tl.constexpr, GELU: tl.constexpr, SCALE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         USE_DOT: tl.constexpr, PRECISION: tl.constexpr, CT: tl.constexpr,
                         ACT: tl.constexpr):
    """d input = G @ W for BM rows and BK input columns (with LN: all K <= BK columns, then the
    LayerNorm backward on the full rows, and its weight / bias gradients by atomic adds)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    mm = rm < M
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mk = rk < K
    acc = tl.zeros((BM, BK), CT)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        mn = rn < N
        g = _grad_rows(g_ptr, pre_ptr, scale_ptr, rm, mm, rn, mn, N, HW,
                       GELU, SCALE, ACT, CT)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mn[:, None] & mk[None, :],
                    other=0).to(ACT).to(CT)
        acc += _dot(g, w, USE_DOT, PRECISION)
    m2 = mm[:, None] & mk[None, :]
    if LN:
        mean = tl.load(stats_ptr + 2 * rm, mask=mm, other=0)
        rstd = tl.load(stats_ptr + 2 * rm + 1, mask=mm, other=0)
        xv = tl.load(x_ptr + _rows(rm, HW, sxb, sxp)[:, None] + rk[None, :] * sxc, mask=m2,
                     other=0).to(CT)
        xhat = tl.where(m2, (xv - mean[:, None]) * rstd[:, None], 0.0)
        lw = tl.load(lnw_ptr + rk, mask=mk, other=0).to(CT)
        tl.atomic_add(dlnw_ptr + rk, tl.sum(acc * xhat, axis=0), mask=mk)
        tl.atomic_add(dlnb_ptr + rk, tl.sum(acc, axis=0), mask=mk)
        gx = acc * lw[None, :]
        acc = rstd[:, None] * (gx - (tl.sum(gx, axis=1) / K)[:, None]
                               - xhat * (tl.sum(gx * xhat, axis=1) / K)[:, None])
    tl.store(dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], acc, mask=m2)


@triton.jit(do_not_specialize=_SHAPES)
def linear_bwd_dw_kernel(g_ptr, pre_ptr, scale_ptr, x_ptr, lnw_ptr, lnb_ptr, stats_ptr, dw_ptr,
                         db_ptr, M, K, N, HW, sxb, sxp, sxc,
                         LN: tl.constexpr, GELU: tl.constexpr, SCALE: tl.constexpr,
                         RC: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         USE_DOT: tl.constexpr, PRECISION: tl.constexpr, CT: tl.constexpr,
                         ACT: tl.constexpr):
    """dW (N, K) += G^T @ A and db += column sums of G over a chunk of RC rows (atomic adds
    across chunks); A is the layer's input in ACT, with LN recomputed from the saved stats."""
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = rn < N
    rk = tl.program_id(2) * BK + tl.arange(0, BK)
    mk = rk < K
    if LN:
        lw = tl.load(lnw_ptr + rk, mask=mk, other=0).to(CT)
        lb = tl.load(lnb_ptr + rk, mask=mk, other=0).to(CT)
    acc = tl.zeros((BN, BK), CT)
    db = tl.zeros((BN,), CT)
    for r0 in range(0, RC, BR):
        rm = tl.program_id(0) * RC + r0 + tl.arange(0, BR)
        mm = rm < M
        g = _grad_rows(g_ptr, pre_ptr, scale_ptr, rm, mm, rn, mn, N, HW,
                       GELU, SCALE, ACT, CT)
        m2 = mm[:, None] & mk[None, :]
        a = tl.load(x_ptr + _rows(rm, HW, sxb, sxp)[:, None] + rk[None, :] * sxc, mask=m2,
                    other=0).to(CT)
        if LN:
            mean = tl.load(stats_ptr + 2 * rm, mask=mm, other=0)
            rstd = tl.load(stats_ptr + 2 * rm + 1, mask=mm, other=0)
            a = (a - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
        a = tl.where(m2, a.to(ACT).to(CT), 0.0)
        acc += _dot(tl.trans(g), a, USE_DOT, PRECISION)
        db += tl.sum(g, axis=0)
    tl.atomic_add(dw_ptr + rn[:, None] * K + rk[None, :], acc, mask=mn[:, None] & mk[None, :])
    if tl.program_id(2) == 0:
        tl.atomic_add(db_ptr + rn, db, mask=mn)
