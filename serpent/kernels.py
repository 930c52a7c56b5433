"""Triton kernels of Serpent's fused multi-scale mixer core (launched by `serpent.fused`).

Imported only when the fused path runs (on CUDA, or on CPU under TRITON_INTERPRET=1 in tests):
CPU code paths never need Triton. Layouts (b = batch, l_s = h_s * w_s pixels of scale s, all
channels-last, scales stacked one after another in flat buffers):

    xz      (b, h, w, 2*inner)            in_proj output: x half [0, inner), z half [inner, 2*inner)
    xs      [s][b][l_s][inner]            SiLU(dwconv(x)) and its average-pooled pyramid
    x_dbl   [s][b][l_s][4][R + 2N]        x_proj of every pixel for the 4 directions (dt, B, C)
    ydir    [s][k][b][l_s][inner]         scan output of direction k, at its pixel (rolled back)
    cat     (b, h, w, S*inner)            direction sums, coarse scales upsampled bilinearly
    states  [s][b][k][chunk][inner][N]    scan state at the start of every chunk (for backward)

The four directions (rows, columns, rows reversed, columns reversed; raster or serpentine) are
index arithmetic on the pixel grid (`_pixel`), never materialised sequences. Each scan program
owns (batch, direction, channel block) of one scale and walks its sequence in chunks of T steps:
inside a chunk one parallel associative scan over T, across chunks a carried state. Gradients
that several programs share (dB, dC, d dt of a pixel over channel blocks, du of a pixel over
directions, parameter gradients over the batch) are accumulated with atomic adds in float32
(float64 for float64 inputs). Every kernel computes in CT (float32, or float64 for float64
inputs) and rounds where the unfused model rounds to the activation dtype, so bf16 results
follow the same path of roundings.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_SCALES = 4  # pyramid scales one launch handles (parameter pointers per scale)
# Shape arguments are not specialised (Triton would compile a variant for every size divisible
# by 16 or equal to 1): one compilation per kernel and dtype serves every resolution.


# --------------------------------------------------------------------------- helpers


@triton.jit
def _pick(s, p0, p1, p2, p3):
    """Pointer of scale s (a run-time program index) among the per-scale parameter pointers."""
    if s == 0:
        p = p0
    elif s == 1:
        p = p1
    elif s == 2:
        p = p2
    else:
        p = p3
    return p


@triton.jit
def _scale_pixels(height, width, s):
    """(h_s, w_s) of scale s: ceil(h / 2^s) x ceil(w / 2^s), as avg_pool2d(ceil_mode=True)."""
    return (height + (1 << s) - 1) >> s, (width + (1 << s) - 1) >> s


@triton.jit
def _scale_offset(height, width, batch, s, NUM_SCALES: tl.constexpr):
    """Pixels of all scales before scale s, over the batch (int64): where scale s starts."""
    off = tl.zeros((), tl.int64)
    for j in tl.static_range(NUM_SCALES):
        hj = (height + (1 << j) - 1) >> j
        wj = (width + (1 << j) - 1) >> j
        off += tl.where(j < s, hj * wj, 0).to(tl.int64)
    return off * batch


@triton.jit
def _state_offset(height, width, batch, inner, N, s, T: tl.constexpr, NUM_SCALES: tl.constexpr):
    """Elements of the saved chunk states of all scales before scale s (int64)."""
    off = tl.zeros((), tl.int64)
    for j in tl.static_range(NUM_SCALES):
        hj = (height + (1 << j) - 1) >> j
        wj = (width + (1 << j) - 1) >> j
        off += tl.where(j < s, tl.cdiv(hj * wj, T), 0).to(tl.int64)
    return off * batch * 4 * inner * N


@triton.jit
def _pixel(t, k, hs, ws, SERPENTINE: tl.constexpr):
    """Flat pixel index (row * ws + col) of step t of direction k on an hs x ws grid.

    k = 0 rows, 1 columns, 2 rows reversed, 3 columns reversed (serpent.model.scan_orders);
    serpentine paths walk every odd row (column) backwards."""
    tt = tl.where(k >= 2, hs * ws - 1 - t, t)
    if k % 2 == 0:
        major = tt // ws
        minor = tt % ws
        if SERPENTINE:
            minor = tl.where(major % 2 == 1, ws - 1 - minor, minor)
        p = major * ws + minor
    else:
        major = tt // hs
        minor = tt % hs
        if SERPENTINE:
            minor = tl.where(major % 2 == 1, hs - 1 - minor, minor)
        p = minor * ws + major
    return p


@triton.jit
def _chunk_inputs(t, k, hs, ws, xs_base, xd_base, inner, ch, mch, n, mn, rr, mr, R, N, F4,
                  SERPENTINE: tl.constexpr, CT: tl.constexpr):
    """Pixels, validity and the scan inputs of steps t of direction k: u (T, CB) from xs, and
    dt (T, RP), B (T, NP), C (T, NP) from the direction's block of x_dbl."""
    valid = (t >= 0) & (t < hs * ws)
    p = _pixel(t, k, hs, ws, SERPENTINE)
    mt = valid[:, None]
    u = tl.load(xs_base + p[:, None] * inner + ch[None, :], mask=mt & mch[None, :], other=0).to(CT)
    drow = xd_base + p[:, None] * F4
    dt = tl.load(drow + rr[None, :], mask=mt & mr[None, :], other=0).to(CT)
    Bm = tl.load(drow + R + n[None, :], mask=mt & mn[None, :], other=0).to(CT)
    Cm = tl.load(drow + R + N + n[None, :], mask=mt & mn[None, :], other=0).to(CT)
    return p, valid, u, dt, Bm, Cm


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow; log1p by the compensated log (serpent.scan._softplus)."""
    e = tl.exp(-tl.abs(x))
    v = e + 1.0
    return tl.maximum(x, 0.0) + (tl.log(v) - ((v - 1.0) - e) / v)


@triton.jit
def _linear_combine(a1, x1, a2, x2):
    """h_t = a_t h_{t-1} + x_t as segments (decay product, value): earlier segment first."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _shifted_combine(p1, l1, v1, p2, l2, v2):
    """g_j = e_j + a_{j-1} g_{j-1} (each step scaled by the PREVIOUS step's coefficient) as
    segments (product of all coefficients but the last, last coefficient, value). Used as a
    reverse scan for the gradient g_t = C_t dy_t + a_{t+1} g_{t+1}: no shifted copy of a."""
    return p1 * l1 * p2, l2, v2 + p2 * l1 * v1


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _summary_base(seg_ptr, s, batch, bi, k, nseg, inner, N):
    """Where the segment summaries of (scale s, batch bi, direction k) start. Layout
    [s][b][k][seg][2][inner][N]: per segment, its state (forward) or carry (backward) from a
    zero start, then the product of its decays."""
    return seg_ptr + ((s * batch + bi) * 4 + k) * nseg * 2 * inner * N


@triton.jit
def _load_summary(sm_base, j, inner, N, off, mask):
    base = sm_base + 2 * j * inner * N
    return (tl.load(base + off, mask=mask, other=0),
            tl.load(base + inner * N + off, mask=mask, other=0))


@triton.jit
def _store_summary(sm_base, j, inner, N, off, mask, value, product):
    base = sm_base + 2 * j * inner * N
    tl.store(base + off, value, mask=mask)
    tl.store(base + inner * N + off, product, mask=mask)


@triton.jit
def _silu_grad(x):
    sig = tl.sigmoid(x)
    return sig * (1.0 + x * (1.0 - sig))


# --------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=("batch", "height", "width", "inner", "xz_stride"))
def pyramid_fwd_kernel(xz_ptr, w_ptr, b_ptr, xs_ptr, batch, height, width, inner, xz_stride,
                       NUM_SCALES: tl.constexpr, TILE: tl.constexpr, CB: tl.constexpr,
                       CT: tl.constexpr):
    """xs[0] = SiLU(depthwise 3x3 conv(x) + bias) on a TILE x TILE pixel tile, then the pooled
    scales xs[s] = avg_pool2d(xs[0], 2^s, ceil_mode=True) of the windows inside the tile (TILE
    is a multiple of 2^(S-1): windows never straddle tiles), averaged from the stored values."""
    pid_t = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    ch = tl.program_id(2) * CB + tl.arange(0, CB)
    mch = ch < inner
    tiles_w = tl.cdiv(width, TILE)
    r0 = (pid_t // tiles_w) * TILE
    c0 = (pid_t % tiles_w) * TILE
    i = tl.arange(0, TILE * TILE)
    r = r0 + i // TILE
    c = c0 + i % TILE
    src = xz_ptr + bi * height * width * xz_stride
    acc = tl.zeros((TILE * TILE, CB), CT) + tl.load(b_ptr + ch, mask=mch, other=0).to(CT)[None, :]
    for tap in tl.static_range(9):
        rr = r + (tap // 3 - 1)
        cc = c + (tap % 3 - 1)
        m = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        v = tl.load(src + (rr * width + cc)[:, None] * xz_stride + ch[None, :],
                    mask=m[:, None] & mch[None, :], other=0).to(CT)
        wt = tl.load(w_ptr + ch * 9 + tap, mask=mch, other=0).to(CT)
        acc += v * wt[None, :]
    x = acc * tl.sigmoid(acc)
    dst = xs_ptr + bi * height * width * inner
    m = (r < height) & (c < width)
    tl.store(dst + (r * width + c)[:, None] * inner + ch[None, :], x,
             mask=m[:, None] & mch[None, :])
    if NUM_SCALES > 1:
        tl.debug_barrier()  # the pooled scales read back this tile's stored pixels
        for s in tl.static_range(1, NUM_SCALES):
            _pool_tile(xs_ptr, dst, r0, c0, bi, ch, mch, batch, height, width, inner,
                       s, NUM_SCALES, TILE, CB, CT)


@triton.jit
def _pool_tile(xs_ptr, dst, r0, c0, bi, ch, mch, batch, height, width, inner, s: tl.constexpr,
               NUM_SCALES: tl.constexpr, TILE: tl.constexpr, CB: tl.constexpr, CT: tl.constexpr):
    """Scale s of one tile: the 2^s x 2^s windows' means of the stored scale-0 pixels. A function
    of its own so that F and SUB are constexprs (Triton 3.6 neither lets a constexpr be annotated
    again in an unrolled loop nor keeps a plain assignment there constexpr)."""
    F: tl.constexpr = 1 << s
    SUB: tl.constexpr = TILE // F
    j = tl.arange(0, SUB * SUB)
    rq = r0 // F + j // SUB
    cq = c0 // F + j % SUB
    hs, ws = _scale_pixels(height, width, s)
    acc = tl.zeros((SUB * SUB, CB), CT)
    cnt = tl.zeros((SUB * SUB,), tl.int32)
    for d in tl.static_range(F * F):
        rr = rq * F + d // F
        cc = cq * F + d % F
        m = (rr < height) & (cc < width)
        acc += tl.load(dst + (rr * width + cc)[:, None] * inner + ch[None, :],
                       mask=m[:, None] & mch[None, :], other=0).to(CT)
        cnt += m.to(tl.int32)
    val = acc / tl.maximum(cnt, 1).to(CT)[:, None]
    start = _scale_offset(height, width, batch, s, NUM_SCALES) + bi * hs * ws
    mq = (rq < hs) & (cq < ws)
    tl.store(xs_ptr + start * inner + (rq * ws + cq)[:, None] * inner + ch[None, :], val,
             mask=mq[:, None] & mch[None, :])


@triton.jit(do_not_specialize=("batch", "height", "width", "inner", "R", "N", "seg_chunks",
                               "nseg"))
def scan_fwd_kernel(xs_ptr, xdbl_ptr, y_ptr, state_ptr, seg_ptr,
                    A0, A1, A2, A3, D0, D1, D2, D3, W0, W1, W2, W3, E0, E1, E2, E3,
                    batch, height, width, inner, R, N, seg_chunks, nseg,
                    SERPENTINE: tl.constexpr, NUM_SCALES: tl.constexpr, SAVE_STATES: tl.constexpr,
                    SUMMARY: tl.constexpr, SEGMENTED: tl.constexpr,
                    T: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                    CT: tl.constexpr):
    """Selective scan of one (batch, direction, channel block) of scale program_id(1), over the
    chunks of segment program_id(2) (seg_chunks chunks of T steps each):

        delta = softplus(dt_w[k] @ dt + dt_b[k]),  h_t = exp(delta A) h_{t-1} + delta B_t u_t,
        y_t = <C_t, h_t> + D u_t,  written to ydir at the step's pixel.
    A = -exp(A_log); (A_log, D, dt_w, dt_b) of scale s are (A{s}, D{s}, W{s}, E{s}).

    Segments give one sequence (65536 steps at 1024 px) many programs instead of one:
    SUMMARY=True runs every segment from a zero state and stores its end state and decay
    product (`_summary_base`); the second launch (SEGMENTED=True) first chains the summaries of
    the segments before its own into its true start state, then scans and writes y. On an H200
    this gained little (results/h200-run5/README.md): the per-step work, not the chunk loop's
    latency, bounds this kernel."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    seg = tl.program_id(2)
    ncb = tl.cdiv(inner, CB)
    cb = pid % ncb
    k = (pid // ncb) % 4
    bi = (pid // (ncb * 4)).to(tl.int64)
    hs, ws = _scale_pixels(height, width, s)
    length = hs * ws
    nch = tl.cdiv(length, T)
    c_first = seg * seg_chunks
    if c_first < nch:
        c_last = tl.minimum(c_first + seg_chunks, nch)
        _scan_fwd_segment(xs_ptr, xdbl_ptr, y_ptr, state_ptr, seg_ptr,
                          _pick(s, A0, A1, A2, A3), _pick(s, D0, D1, D2, D3),
                          _pick(s, W0, W1, W2, W3), _pick(s, E0, E1, E2, E3),
                          batch, height, width, inner, R, N, nseg, s, seg, cb, k, bi, hs, ws,
                          nch, c_first, c_last, SERPENTINE, NUM_SCALES, SAVE_STATES, SUMMARY,
                          SEGMENTED, T, CB, NP, RP, CT)


@triton.jit
def _scan_fwd_segment(xs_ptr, xdbl_ptr, y_ptr, state_ptr, seg_ptr, A_log, Dp, Wp, Ep,
                      batch, height, width, inner, R, N, nseg, s, seg, cb, k, bi, hs, ws,
                      nch, c_first, c_last, SERPENTINE: tl.constexpr, NUM_SCALES: tl.constexpr,
                      SAVE_STATES: tl.constexpr, SUMMARY: tl.constexpr, SEGMENTED: tl.constexpr,
                      T: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                      CT: tl.constexpr):
    length = hs * ws
    ch = cb * CB + tl.arange(0, CB)
    mch = ch < inner
    n = tl.arange(0, NP)
    mn = n < N
    rr = tl.arange(0, RP)
    mr = rr < R
    pc = k * inner + ch  # parameter row of (direction, channel)
    A = -tl.exp(tl.load(A_log + pc[:, None] * N + n[None, :], mask=mch[:, None] & mn[None, :],
                        other=0).to(CT))
    Dv = tl.load(Dp + pc, mask=mch, other=0).to(CT)
    bias = tl.load(Ep + pc, mask=mch, other=0).to(CT)
    Wdt = tl.load(Wp + pc[:, None] * R + rr[None, :], mask=mch[:, None] & mr[None, :],
                  other=0).to(CT)

    F4 = 4 * (R + 2 * N)
    pix0 = _scale_offset(height, width, batch, s, NUM_SCALES)
    xs_base = xs_ptr + (pix0 + bi * length) * inner
    xd_base = xdbl_ptr + (pix0 + bi * length) * F4 + k * (R + 2 * N)
    y_base = y_ptr + (4 * pix0 + (k * batch + bi) * length) * inner
    st_base = state_ptr + _state_offset(height, width, batch, inner, N, s, T, NUM_SCALES) \
        + (bi * 4 + k) * nch * inner * N
    st_off = ch[:, None] * N + n[None, :]
    st_mask = mch[:, None] & mn[None, :]
    sm_base = _summary_base(seg_ptr, s, batch, bi, k, nseg, inner, N)

    rows = tl.arange(0, T)
    last = (rows == T - 1)[:, None, None]
    h = tl.zeros((CB, NP), CT)
    if SEGMENTED and not SUMMARY:  # the true start state: earlier segments chained in order
        for j in range(seg):
            h_end, d_all = _load_summary(sm_base, j, inner, N, st_off, st_mask)
            h = d_all * h + h_end
    d_seg = tl.full((CB, NP), 1.0, CT)
    # software pipelining by hand: the next chunk's loads are issued before this chunk's
    # arithmetic, so their latency overlaps it (the loads past the end are masked off)
    p, valid, u, dt, Bm, Cm = _chunk_inputs(c_first * T + rows, k, hs, ws, xs_base, xd_base,
                                            inner, ch, mch, n, mn, rr, mr, R, N, F4, SERPENTINE,
                                            CT)
    for c in range(c_first, c_last):
        p_next, valid_next, u_next, dt_next, B_next, C_next = _chunk_inputs(
            (c + 1) * T + rows, k, hs, ws, xs_base, xd_base, inner, ch, mch, n, mn, rr, mr, R, N,
            F4, SERPENTINE, CT)
        mt = valid[:, None]
        # dt_proj rounds to the activation dtype in the unfused model (its einsum output)
        dtp = tl.sum(dt[:, None, :] * Wdt[None, :, :], axis=2).to(xdbl_ptr.dtype.element_ty).to(CT)
        delta = tl.where(mt, _softplus(dtp + bias[None, :]), 0.0)
        a = tl.exp(delta[:, :, None] * A[None, :, :])
        x = (delta * u)[:, :, None] * Bm[:, None, :]
        if SAVE_STATES and not SUMMARY:
            tl.store(st_base + c * inner * N + st_off, h, mask=st_mask)
        decay, hl = tl.associative_scan((a, x), 0, _linear_combine)
        hh = hl + decay * h[None, :, :]
        if SUMMARY:
            d_seg = d_seg * tl.sum(tl.where(last, decay, 0.0), axis=0)
        else:
            y = tl.sum(hh * Cm[:, None, :], axis=2) + Dv[None, :] * u
            tl.store(y_base + p[:, None] * inner + ch[None, :], y, mask=mt & mch[None, :])
        h = tl.sum(tl.where(last, hh, 0.0), axis=0)
        p, valid, u, dt, Bm, Cm = p_next, valid_next, u_next, dt_next, B_next, C_next
    if SUMMARY:
        _store_summary(sm_base, seg, inner, N, st_off, st_mask, h, d_seg)


@triton.jit
def _direction_sum(base, batch, bi, length, q, ch, mask, inner, CT: tl.constexpr):
    """Sum of the four direction outputs at pixels q (rounded to the activation dtype, as the
    unfused model's roll_back(...).sum(1))."""
    v = tl.zeros(mask.shape, CT)
    for k in tl.static_range(4):
        v += tl.load(base + ((k * batch + bi) * length + q)[:, None] * inner + ch[None, :],
                     mask=mask, other=0).to(CT)
    return v.to(base.dtype.element_ty).to(CT)


@triton.jit
def _source_index(dst, in_size, out_size, CT: tl.constexpr):
    """PyTorch's bilinear source index (align_corners=False, size given): (i0, i1, lambda)."""
    src = tl.maximum((dst.to(CT) + 0.5) * (in_size.to(CT) / out_size.to(CT)) - 0.5, 0.0)
    i0 = src.to(tl.int32)
    i1 = i0 + (i0 < in_size - 1).to(tl.int32)
    return i0, i1, src - i0.to(CT)


@triton.jit(do_not_specialize=("batch", "height", "width", "inner"))
def merge_fwd_kernel(y_ptr, cat_ptr, batch, height, width, inner,
                     NUM_SCALES: tl.constexpr, P: tl.constexpr, CB: tl.constexpr,
                     CT: tl.constexpr):
    """cat[..., s*inner:(s+1)*inner] = direction sum of scale s, bilinearly upsampled to (h, w)
    for s > 0 (F.interpolate(..., size=(h, w), mode="bilinear", align_corners=False))."""
    p = tl.program_id(0) * P + tl.arange(0, P)
    bi = tl.program_id(1).to(tl.int64)
    ch = tl.program_id(2) * CB + tl.arange(0, CB)
    mch = ch < inner
    m2 = (p < height * width)[:, None] & mch[None, :]
    r = p // width
    c = p % width
    cat_row = cat_ptr + (bi * height * width + p)[:, None] * (NUM_SCALES * inner) + ch[None, :]
    for s in tl.static_range(NUM_SCALES):
        hs, ws = _scale_pixels(height, width, s)
        base = y_ptr + 4 * _scale_offset(height, width, batch, s, NUM_SCALES) * inner
        if s == 0:
            v = _direction_sum(base, batch, bi, hs * ws, p, ch, m2, inner, CT)
        else:
            r0, r1, lr = _source_index(r, hs, height, CT)
            c0, c1, lc = _source_index(c, ws, width, CT)
            v00 = _direction_sum(base, batch, bi, hs * ws, r0 * ws + c0, ch, m2, inner, CT)
            v01 = _direction_sum(base, batch, bi, hs * ws, r0 * ws + c1, ch, m2, inner, CT)
            v10 = _direction_sum(base, batch, bi, hs * ws, r1 * ws + c0, ch, m2, inner, CT)
            v11 = _direction_sum(base, batch, bi, hs * ws, r1 * ws + c1, ch, m2, inner, CT)
            lr = lr[:, None]
            lc = lc[:, None]
            v = (1.0 - lr) * ((1.0 - lc) * v00 + lc * v01) + lr * ((1.0 - lc) * v10 + lc * v11)
        tl.store(cat_row + s * inner, v, mask=m2)


@triton.jit(do_not_specialize=("npix", "inner"))
def norm_gate_fwd_kernel(f_ptr, fb_ptr, xz_ptr, nw_ptr, nb_ptr, out_ptr, npix, inner, eps,
                         HAS_FUSE_BIAS: tl.constexpr, P: tl.constexpr, IP: tl.constexpr,
                         CT: tl.constexpr):
    """out = LayerNorm(fused + fuse_bias) * SiLU(z) over the channels of P pixels."""
    p = (tl.program_id(0) * P + tl.arange(0, P)).to(tl.int64)
    ch = tl.arange(0, IP)
    mch = ch < inner
    m2 = (p < npix)[:, None] & mch[None, :]
    v = tl.load(f_ptr + p[:, None] * inner + ch[None, :], mask=m2, other=0).to(CT)
    if HAS_FUSE_BIAS:
        v += tl.load(fb_ptr + ch, mask=mch, other=0).to(CT)[None, :]
    mean = tl.sum(v, axis=1) / inner
    d = tl.where(m2, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / inner + eps)
    nw = tl.load(nw_ptr + ch, mask=mch, other=0).to(CT)
    nb = tl.load(nb_ptr + ch, mask=mch, other=0).to(CT)
    y = d * rstd[:, None] * nw[None, :] + nb[None, :]
    z = tl.load(xz_ptr + p[:, None] * (2 * inner) + inner + ch[None, :], mask=m2, other=0).to(CT)
    gate = (z * tl.sigmoid(z)).to(xz_ptr.dtype.element_ty).to(CT)  # F.silu(z) in z's dtype
    tl.store(out_ptr + p[:, None] * inner + ch[None, :], y * gate, mask=m2)


# --------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=("npix", "inner"))
def norm_gate_bwd_kernel(dout_ptr, f_ptr, fb_ptr, xz_ptr, nw_ptr, nb_ptr, df_ptr, dxz_ptr,
                         dnw_ptr, dnb_ptr, dfb_ptr, npix, inner, eps,
                         HAS_FUSE_BIAS: tl.constexpr, P: tl.constexpr, IP: tl.constexpr,
                         CT: tl.constexpr):
    """Backward of norm_gate_fwd_kernel: d fused (df), d z (into dxz's z half), and the
    LayerNorm weight / bias and fuse-bias gradients (atomic adds over pixel blocks)."""
    p = (tl.program_id(0) * P + tl.arange(0, P)).to(tl.int64)
    ch = tl.arange(0, IP)
    mch = ch < inner
    m2 = (p < npix)[:, None] & mch[None, :]
    v = tl.load(f_ptr + p[:, None] * inner + ch[None, :], mask=m2, other=0).to(CT)
    if HAS_FUSE_BIAS:
        v += tl.load(fb_ptr + ch, mask=mch, other=0).to(CT)[None, :]
    mean = tl.sum(v, axis=1) / inner
    d = tl.where(m2, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / inner + eps)
    nw = tl.load(nw_ptr + ch, mask=mch, other=0).to(CT)
    nb = tl.load(nb_ptr + ch, mask=mch, other=0).to(CT)
    xhat = d * rstd[:, None]
    y = xhat * nw[None, :] + nb[None, :]
    z = tl.load(xz_ptr + p[:, None] * (2 * inner) + inner + ch[None, :], mask=m2, other=0).to(CT)
    gate = (z * tl.sigmoid(z)).to(xz_ptr.dtype.element_ty).to(CT)
    dout = tl.load(dout_ptr + p[:, None] * inner + ch[None, :], mask=m2, other=0).to(CT)
    tl.store(dxz_ptr + p[:, None] * (2 * inner) + inner + ch[None, :], dout * y * _silu_grad(z),
             mask=m2)
    dy = dout * gate
    tl.atomic_add(dnw_ptr + ch, tl.sum(dy * xhat, axis=0), mask=mch)
    tl.atomic_add(dnb_ptr + ch, tl.sum(dy, axis=0), mask=mch)
    g = dy * nw[None, :]
    dv = rstd[:, None] * (g - (tl.sum(g, axis=1) / inner)[:, None]
                          - xhat * (tl.sum(g * xhat, axis=1) / inner)[:, None])
    dv = tl.where(m2, dv, 0.0)
    tl.store(df_ptr + p[:, None] * inner + ch[None, :], dv, mask=m2)
    if HAS_FUSE_BIAS:
        tl.atomic_add(dfb_ptr + ch, tl.sum(dv, axis=0), mask=mch)


@triton.jit(do_not_specialize=("batch", "height", "width", "inner"))
def merge_bwd_kernel(dcat_ptr, dy_ptr, batch, height, width, inner,
                     NUM_SCALES: tl.constexpr, P: tl.constexpr, CB: tl.constexpr,
                     SPAN: tl.constexpr, CT: tl.constexpr):
    """Adjoint of the bilinear upsampling of coarse scale s = program_id(2) + 1: for P coarse
    pixels q, dY[q] = sum over the fine pixels whose interpolation reads q of weight * d cat.
    A gather over the (2f + 3) x (2f + 3) fine candidates of each coarse pixel (f = 2^s; SPAN, a
    power of two >= 2f + 3 for the coarsest scale, columns at once) with the forward's own index
    arithmetic: deterministic, no atomics."""
    s = tl.program_id(2) + 1
    hs, ws = _scale_pixels(height, width, s)
    q = tl.program_id(0) * P + tl.arange(0, P)
    if tl.program_id(0) * P < hs * ws:
        ncb = tl.cdiv(inner, CB)
        bi = (tl.program_id(1) // ncb).to(tl.int64)
        ch = (tl.program_id(1) % ncb) * CB + tl.arange(0, CB)
        mch = ch < inner
        mq = q < hs * ws
        qr = q // ws
        qc = q % ws
        span = 2 * (1 << s) + 3
        # first fine row (column) whose source index can reach qr - 1 (one of margin)
        r_lo = tl.maximum(((qr.to(CT) - 0.5) * height.to(CT) / hs.to(CT) - 0.5).to(tl.int32) - 1, 0)
        c_lo = tl.maximum(((qc.to(CT) - 0.5) * width.to(CT) / ws.to(CT) - 0.5).to(tl.int32) - 1, 0)
        j = tl.arange(0, SPAN)
        c = c_lo[:, None] + j[None, :]  # (P, SPAN) candidate columns
        c0, c1, lc = _source_index(c, ws, width, CT)
        wc = tl.where(c0 == qc[:, None], 1.0 - lc, 0.0) + tl.where(c1 == qc[:, None], lc, 0.0)
        wc = tl.where((c < width) & (j < span)[None, :] & mq[:, None], wc, 0.0)
        acc = tl.zeros((P, CB), CT)
        src = dcat_ptr + bi * height * width * (NUM_SCALES * inner) + s * inner
        for i in range(span):
            r = r_lo + i
            r0, r1, lr = _source_index(r, hs, height, CT)
            wr = tl.where(r0 == qr, 1.0 - lr, 0.0) + tl.where(r1 == qr, lr, 0.0)
            wgt = tl.where(r < height, wr, 0.0)[:, None] * wc  # (P, SPAN)
            pix = (r[:, None] * width + c).to(tl.int64)
            g = tl.load(src + pix[:, :, None] * (NUM_SCALES * inner) + ch[None, None, :],
                        mask=(wgt != 0.0)[:, :, None] & mch[None, None, :], other=0).to(CT)
            acc += tl.sum(wgt[:, :, None] * g, axis=1)
        # dY holds scales 1.. only: its offset is the scale offset minus scale 0"s pixels
        dst = dy_ptr + (_scale_offset(height, width, batch, s, NUM_SCALES)
                        - batch * height * width + bi * hs * ws) * inner
        tl.store(dst + q[:, None] * inner + ch[None, :], acc, mask=mq[:, None] & mch[None, :])


@triton.jit(do_not_specialize=("batch", "height", "width", "inner", "R", "N", "seg_chunks",
                               "nseg"))
def scan_bwd_kernel(xs_ptr, xdbl_ptr, state_ptr, dcat_ptr, dys_ptr,
                    du_ptr, dxdbl_ptr, dA_ptr, dD_ptr, dE_ptr, dW_ptr, seg_ptr,
                    A0, A1, A2, A3, D0, D1, D2, D3, W0, W1, W2, W3, E0, E1, E2, E3,
                    batch, height, width, inner, R, N, seg_chunks, nseg,
                    SERPENTINE: tl.constexpr, NUM_SCALES: tl.constexpr,
                    SUMMARY: tl.constexpr, SEGMENTED: tl.constexpr,
                    T: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                    CT: tl.constexpr):
    """Backward of scan_fwd_kernel, chunks in reverse time order. Per chunk: the forward scan
    is recomputed from the saved chunk state; the state gradient g_t = C_t dy_t + a_{t+1}
    g_{t+1} is one reverse associative scan (carry a_0 g_0 into the chunk before); then

        du = D dy + delta <g, B>,   d delta = u <g, B> + <g (h - x), A>   (a_t h_{t-1} = h_t - x_t)
        dB = g delta u,  dC = dy h,  dA_log = A sum g (h - x) delta,  dD = sum dy u,
        d dt_pre = d delta * sigmoid(dt_pre) -> dt_b, dt_w and the dt rows of x_dbl.
    dy of a pixel is the same for all four directions (their sum is the output).

    Segments of seg_chunks chunks run in parallel as in forward: the carry leaving a segment
    is linear in the carry entering it, carry_out = (prod of its a) carry_in + carry_local, so
    SUMMARY=True stores (carry_local, prod a) of every segment from a zero carry and the second
    launch chains the later segments' summaries into its own entering carry."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    seg = tl.program_id(2)
    ncb = tl.cdiv(inner, CB)
    cb = pid % ncb
    k = (pid // ncb) % 4
    bi = (pid // (ncb * 4)).to(tl.int64)
    hs, ws = _scale_pixels(height, width, s)
    nch = tl.cdiv(hs * ws, T)
    c_first = seg * seg_chunks
    if c_first < nch:
        _scan_bwd_segment(xs_ptr, xdbl_ptr, state_ptr, dcat_ptr, dys_ptr, du_ptr, dxdbl_ptr,
                          dA_ptr, dD_ptr, dE_ptr, dW_ptr, seg_ptr, _pick(s, A0, A1, A2, A3),
                          _pick(s, D0, D1, D2, D3), _pick(s, W0, W1, W2, W3),
                          _pick(s, E0, E1, E2, E3), batch, height, width, inner, R, N,
                          seg_chunks, nseg, s, seg, cb, k, bi, hs, ws, nch, c_first,
                          tl.minimum(c_first + seg_chunks, nch), SERPENTINE, NUM_SCALES, SUMMARY,
                          SEGMENTED, T, CB, NP, RP, CT)


@triton.jit
def _scan_bwd_segment(xs_ptr, xdbl_ptr, state_ptr, dcat_ptr, dys_ptr, du_ptr, dxdbl_ptr,
                      dA_ptr, dD_ptr, dE_ptr, dW_ptr, seg_ptr, A_log, Dp, Wp, Ep,
                      batch, height, width, inner, R, N, seg_chunks, nseg, s, seg, cb, k, bi,
                      hs, ws, nch, c_first, c_last, SERPENTINE: tl.constexpr,
                      NUM_SCALES: tl.constexpr, SUMMARY: tl.constexpr, SEGMENTED: tl.constexpr,
                      T: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                      CT: tl.constexpr):
    length = hs * ws

    ch = cb * CB + tl.arange(0, CB)
    mch = ch < inner
    n = tl.arange(0, NP)
    mn = n < N
    rr = tl.arange(0, RP)
    mr = rr < R
    pc = k * inner + ch
    m_cn = mch[:, None] & mn[None, :]
    m_cr = mch[:, None] & mr[None, :]
    A = -tl.exp(tl.load(A_log + pc[:, None] * N + n[None, :], mask=m_cn, other=0).to(CT))
    Dv = tl.load(Dp + pc, mask=mch, other=0).to(CT)
    bias = tl.load(Ep + pc, mask=mch, other=0).to(CT)
    Wdt = tl.load(Wp + pc[:, None] * R + rr[None, :], mask=m_cr, other=0).to(CT)

    F = R + 2 * N
    pix0 = _scale_offset(height, width, batch, s, NUM_SCALES)
    xs_base = xs_ptr + (pix0 + bi * length) * inner
    du_base = du_ptr + (pix0 + bi * length) * inner
    xd_base = xdbl_ptr + (pix0 + bi * length) * 4 * F + k * F
    dxd_base = dxdbl_ptr + (pix0 + bi * length) * 4 * F + k * F
    # d cat's first channel block is scale 0's gradient (read in place), dys holds scales 1..
    dcat_base = dcat_ptr + bi * length * (NUM_SCALES * inner)
    dys_base = dys_ptr + (pix0 - batch * height * width + bi * length) * inner
    st_base = state_ptr + _state_offset(height, width, batch, inner, N, s, T, NUM_SCALES) \
        + (bi * 4 + k) * nch * inner * N
    st_off = ch[:, None] * N + n[None, :]

    sm_base = _summary_base(seg_ptr, s, batch, bi, k, nseg, inner, N)

    rows = tl.arange(0, T)
    last = (rows == T - 1)[:, None, None]
    carry = tl.zeros((CB, NP), CT)
    if SEGMENTED and not SUMMARY:  # the entering carry: later segments chained, last first
        nseg_s = tl.cdiv(nch, seg_chunks)
        for jj in range(nseg_s - 1 - seg):
            c_local, a_all = _load_summary(sm_base, nseg_s - 1 - jj, inner, N, st_off, m_cn)
            carry = a_all * carry + c_local
    a_seg = tl.full((CB, NP), 1.0, CT)
    dA_acc = tl.zeros((CB, NP), CT)
    dD_acc = tl.zeros((CB,), CT)
    dE_acc = tl.zeros((CB,), CT)
    dW_acc = tl.zeros((CB, RP), CT)
    # chunks in reverse time order; the next one's inputs are loaded ahead (as in forward)
    p, valid, u, dt, Bm, Cm = _chunk_inputs((c_last - 1) * T + rows, k, hs, ws, xs_base,
                                            xd_base, inner, ch, mch, n, mn, rr, mr, R, N, 4 * F,
                                            SERPENTINE, CT)
    for ci in range(c_last - c_first):
        c = c_last - 1 - ci
        p_next, valid_next, u_next, dt_next, B_next, C_next = _chunk_inputs(
            (c - 1) * T + rows, k, hs, ws, xs_base, xd_base, inner, ch, mch, n, mn, rr, mr, R, N,
            4 * F, SERPENTINE, CT)
        mt = valid[:, None]
        m_tc = mt & mch[None, :]
        m_tn = mt & mn[None, :]
        if s == 0:
            dy = tl.load(dcat_base + p[:, None] * (NUM_SCALES * inner) + ch[None, :], mask=m_tc,
                         other=0).to(CT)
        else:
            dy = tl.load(dys_base + p[:, None] * inner + ch[None, :], mask=m_tc, other=0).to(CT)
        dtp = tl.sum(dt[:, None, :] * Wdt[None, :, :], axis=2).to(xdbl_ptr.dtype.element_ty).to(CT)
        pre = dtp + bias[None, :]
        delta = tl.where(mt, _softplus(pre), 0.0)
        a = tl.exp(delta[:, :, None] * A[None, :, :])
        du_ = delta * u
        e = Cm[:, None, :] * dy[:, :, None] + tl.where(last, carry[None, :, :], 0.0)
        _, _, g = tl.associative_scan((tl.full(a.shape, 1.0, CT), a, e), 0, _shifted_combine,
                                      reverse=True)
        carry = tl.sum(tl.where((rows == 0)[:, None, None], a * g, 0.0), axis=0)
        if SUMMARY:  # the product of the segment's a (the forward decay of its chunks)
            a_seg = a_seg * tl.reduce(a, 0, _multiply)
        else:
            x = du_[:, :, None] * Bm[:, None, :]
            h0 = tl.load(st_base + c * inner * N + st_off, mask=m_cn, other=0)
            decay, hl = tl.associative_scan((a, x), 0, _linear_combine)
            h = hl + decay * h0[None, :, :]
            gB = tl.sum(g * Bm[:, None, :], axis=2)
            ghx = g * (h - x)
            ddelta = u * gB + tl.sum(ghx * A[None, :, :], axis=2)
            dA_acc += tl.sum(ghx * delta[:, :, None], axis=0)
            dD_acc += tl.sum(dy * u, axis=0)
            dpre = tl.where(m_tc, ddelta * tl.sigmoid(pre), 0.0)
            dE_acc += tl.sum(dpre, axis=0)
            dW_acc += tl.sum(dpre[:, :, None] * dt[:, None, :], axis=0)
            tl.atomic_add(du_base + p[:, None] * inner + ch[None, :], Dv[None, :] * dy + delta * gB,
                          mask=m_tc)
            dxrow = dxd_base + p[:, None] * 4 * F
            tl.atomic_add(dxrow + rr[None, :], tl.sum(dpre[:, :, None] * Wdt[None, :, :], axis=1),
                          mask=mt & mr[None, :])
            tl.atomic_add(dxrow + R + n[None, :], tl.sum(g * du_[:, :, None], axis=1), mask=m_tn)
            tl.atomic_add(dxrow + R + N + n[None, :], tl.sum(h * dy[:, :, None], axis=1), mask=m_tn)
        p, valid, u, dt, Bm, Cm = p_next, valid_next, u_next, dt_next, B_next, C_next
    if SUMMARY:
        _store_summary(sm_base, seg, inner, N, st_off, m_cn, carry, a_seg)
    else:  # parameter gradients of scale s: (A_log, D, dt_b, dt_w) stacked per scale, atomic
        tl.atomic_add(dA_ptr + s * 4 * inner * N + pc[:, None] * N + n[None, :], dA_acc * A,
                      mask=m_cn)
        tl.atomic_add(dD_ptr + s * 4 * inner + pc, dD_acc, mask=mch)
        tl.atomic_add(dE_ptr + s * 4 * inner + pc, dE_acc, mask=mch)
        tl.atomic_add(dW_ptr + s * 4 * inner * R + pc[:, None] * R + rr[None, :], dW_acc,
                      mask=m_cr)


@triton.jit(do_not_specialize=("batch", "height", "width", "inner", "xz_stride"))
def pyramid_bwd_pre_kernel(xz_ptr, w_ptr, b_ptr, du_ptr, dw_ptr, db_ptr,
                           batch, height, width, inner, xz_stride,
                           NUM_SCALES: tl.constexpr, TILE: tl.constexpr, CB: tl.constexpr,
                           CT: tl.constexpr):
    """d pre-activation of the depthwise conv, in place over du of scale 0: du of every scale
    pulled back through its average pool (each pixel gets d pooled / window size), times
    SiLU"(pre) with pre recomputed; plus conv weight / bias gradients (atomic adds)."""
    pid_t = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    ch = tl.program_id(2) * CB + tl.arange(0, CB)
    mch = ch < inner
    tiles_w = tl.cdiv(width, TILE)
    i = tl.arange(0, TILE * TILE)
    r = (pid_t // tiles_w) * TILE + i // TILE
    c = (pid_t % tiles_w) * TILE + i % TILE
    m2 = ((r < height) & (c < width))[:, None] & mch[None, :]
    src = xz_ptr + bi * height * width * xz_stride
    pre = tl.zeros((TILE * TILE, CB), CT) + tl.load(b_ptr + ch, mask=mch, other=0).to(CT)[None, :]
    for tap in tl.static_range(9):
        rr = r + (tap // 3 - 1)
        cc = c + (tap % 3 - 1)
        m = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        v = tl.load(src + (rr * width + cc)[:, None] * xz_stride + ch[None, :],
                    mask=m[:, None] & mch[None, :], other=0).to(CT)
        pre += v * tl.load(w_ptr + ch * 9 + tap, mask=mch, other=0).to(CT)[None, :]
    du0 = du_ptr + (bi * height * width + r * width + c)[:, None] * inner + ch[None, :]
    g = tl.load(du0, mask=m2, other=0)
    for s in tl.static_range(1, NUM_SCALES):
        F = 1 << s  # used in arithmetic only (no constexpr needed)
        hs, ws = _scale_pixels(height, width, s)
        rq = r // F
        cq = c // F
        count = (tl.minimum(rq * F + F, height) - rq * F) * (tl.minimum(cq * F + F, width) - cq * F)
        base = du_ptr + (_scale_offset(height, width, batch, s, NUM_SCALES) + bi * hs * ws) * inner
        gs = tl.load(base + (rq * ws + cq)[:, None] * inner + ch[None, :], mask=m2, other=0)
        g += gs / tl.maximum(count, 1).to(CT)[:, None]
    dpre = tl.where(m2, g * _silu_grad(pre), 0.0)
    tl.store(du0, dpre, mask=m2)
    tl.atomic_add(db_ptr + ch, tl.sum(dpre, axis=0), mask=mch)
    for tap in tl.static_range(9):
        rr = r + (tap // 3 - 1)
        cc = c + (tap % 3 - 1)
        m = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        v = tl.load(src + (rr * width + cc)[:, None] * xz_stride + ch[None, :],
                    mask=m[:, None] & mch[None, :], other=0).to(CT)
        tl.atomic_add(dw_ptr + ch * 9 + tap, tl.sum(dpre * v, axis=0), mask=mch)


@triton.jit(do_not_specialize=("height", "width", "inner", "xz_stride"))
def pyramid_bwd_in_kernel(dpre_ptr, w_ptr, dxz_ptr, height, width, inner, xz_stride,
                          TILE: tl.constexpr, CB: tl.constexpr, CT: tl.constexpr):
    """d x (the x half of dxz) = transposed depthwise 3x3 conv of d pre (zero padding)."""
    pid_t = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    ch = tl.program_id(2) * CB + tl.arange(0, CB)
    mch = ch < inner
    tiles_w = tl.cdiv(width, TILE)
    i = tl.arange(0, TILE * TILE)
    r = (pid_t // tiles_w) * TILE + i // TILE
    c = (pid_t % tiles_w) * TILE + i % TILE
    src = dpre_ptr + bi * height * width * inner
    acc = tl.zeros((TILE * TILE, CB), CT)
    for tap in tl.static_range(9):
        rr = r - (tap // 3 - 1)
        cc = c - (tap % 3 - 1)
        m = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        v = tl.load(src + (rr * width + cc)[:, None] * inner + ch[None, :],
                    mask=m[:, None] & mch[None, :], other=0).to(CT)
        acc += v * tl.load(w_ptr + ch * 9 + tap, mask=mch, other=0).to(CT)[None, :]
    m2 = ((r < height) & (c < width))[:, None] & mch[None, :]
    tl.store(dxz_ptr + bi * height * width * xz_stride + (r * width + c)[:, None] * xz_stride
             + ch[None, :], acc, mask=m2)


# --------------------------------------------------------------------------- x_proj of all scales


@triton.jit
def _scale_rows(pid, batch, height, width, BM: tl.constexpr, NUM_SCALES: tl.constexpr):
    """Row tile `pid` of the stacked scales (rows of scale s: batch * l_s pixels, tiles never
    straddle scales) -> (scale, tile within it, rows of the scale, first row of the scale)."""
    s = 0
    tile = pid
    rows = 0
    start = tl.zeros((), tl.int64)
    t = pid
    first = tl.zeros((), tl.int64)
    for j in tl.static_range(NUM_SCALES):
        hj = (height + (1 << j) - 1) >> j
        wj = (width + (1 << j) - 1) >> j
        rows_j = batch * hj * wj
        tiles_j = tl.cdiv(rows_j, BM)
        here = (t >= 0) & (t < tiles_j)
        s = tl.where(here, j, s)
        tile = tl.where(here, t, tile)
        rows = tl.where(here, rows_j, rows)
        start = tl.where(here, first, start)
        t -= tiles_j
        first += rows_j
    return s, tile, rows, start


@triton.jit
def _dot(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    if USE_DOT:
        return tl.dot(a, b, input_precision=PRECISION)
    else:  # float64: a broadcast product (tests only)
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit(do_not_specialize=("batch", "height", "width", "K", "N", "stride_bk", "stride_bn"))
def grouped_matmul_kernel(a_ptr, b0, b1, b2, b3, c_ptr, batch, height, width, K, N,
                          stride_bk, stride_bn, ACCUMULATE: tl.constexpr,
                          NUM_SCALES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                          CT: tl.constexpr):
    """C[rows of s] (+)= A[rows of s] @ B_s for every pyramid scale s in one launch (x_proj of
    all scales: A = xs, B_s = x_proj_s^T; its input gradient: A = d x_dbl, B_s = x_proj_s).
    A and C row-major (rows, K) and (rows, N); B_s elements at k * stride_bk + n * stride_bn,
    rounded to A"s dtype (the unfused model multiplies in the activation dtype). Products in CT:
    16-bit values are exact in TF32, so PRECISION="tf32" is then a bf16 GEMM"s arithmetic."""
    s, tile, rows, start = _scale_rows(tl.program_id(0), batch, height, width, BM, NUM_SCALES)
    b_ptr = _pick(s, b0, b1, b2, b3)
    rm = tile * BM + tl.arange(0, BM)
    mm = rm < rows
    grow = start + rm
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = rn < N
    acc = tl.zeros((BM, BN), CT)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        a = tl.load(a_ptr + grow[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :],
                    other=0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=mk[:, None] & mn[None, :], other=0).to(a_ptr.dtype.element_ty)
        acc += _dot(a.to(CT), b.to(CT), USE_DOT, PRECISION)
    dst = c_ptr + grow[:, None] * N + rn[None, :]
    m2 = mm[:, None] & mn[None, :]
    if ACCUMULATE:
        acc += tl.load(dst, mask=m2, other=0).to(CT)
    tl.store(dst, acc, mask=m2)


@triton.jit(do_not_specialize=("batch", "height", "width", "K", "N"))
def grouped_weight_grad_kernel(x_ptr, g_ptr, dw_ptr, batch, height, width, K, N,
                               NUM_SCALES: tl.constexpr, RC: tl.constexpr, BR: tl.constexpr,
                               BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
                               PRECISION: tl.constexpr, CT: tl.constexpr):
    """dW_s (N, K) += G[rows of s]^T @ X[rows of s] over a chunk of RC rows (atomic adds across
    chunks): the x_proj weight gradient of every scale in one launch, X = xs, G = d x_dbl."""
    s, tile, rows, start = _scale_rows(tl.program_id(0), batch, height, width, RC, NUM_SCALES)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = rn < N
    rk = tl.program_id(2) * BK + tl.arange(0, BK)
    mk = rk < K
    acc = tl.zeros((BN, BK), CT)
    for r0 in range(0, RC, BR):
        rr = tile * RC + r0 + tl.arange(0, BR)
        mr = rr < rows
        grow = start + rr
        g = tl.load(g_ptr + grow[:, None] * N + rn[None, :], mask=mr[:, None] & mn[None, :],
                    other=0)
        x = tl.load(x_ptr + grow[:, None] * K + rk[None, :], mask=mr[:, None] & mk[None, :],
                    other=0).to(CT)
        acc += _dot(tl.trans(g.to(CT)), x, USE_DOT, PRECISION)
    tl.atomic_add(dw_ptr + s * N * K + rn[:, None] * K + rk[None, :], acc,
                  mask=mn[:, None] & mk[None, :])
