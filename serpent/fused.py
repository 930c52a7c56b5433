"""Serpent's multi-scale mixer core as ONE custom op with Triton kernels: the fused path.

Why: the unfused MSSM (serpent.model) launches ~75 CUDA kernels per Serpent block (unroll
gathers, einsums, casts, one scan per scale, roll-back gathers, interpolations, cat, norm, gate),
so a serpent_s forward is ~930 launches and its eager latency is the host's pace. This op
computes the same function from the in-projection output `xz` to the gated, normalised
multi-scale output (what `out_proj` consumes) in 5 + S launches (S pyramid scales), backward
in 8 + 2S:

    forward   pyramid: SiLU(dwconv3x3(x)) and its avg-pooled scales              1 Triton
              x_proj of every scale on the map (per-pixel channel mixing, all      S cuBLAS
              4 directions in one matmul, before any unrolling)
              scan: all scales x 4 directions x channel blocks, directions read    1 Triton
              by index arithmetic, dt_proj + softplus + D skip fused
              merge: direction sums, bilinear upsampling of coarse scales, cat    1 Triton
              fuse projection (S > 1)                                             1 cuBLAS
              LayerNorm + fuse bias + SiLU(z) gate                                1 Triton
    backward  zeroed gradient buffer, norm/gate, fuse (2 mm), merge adjoint,
              reverse scan, x_proj (2 mm per scale), pyramid (2)

Semantics are those of the unfused MSSM (serpent.model.MSSM with any other scan backend): same
parameters, same roundings to the activation dtype; tests compare the two in float64 on CPU
(Triton's interpreter, TRITON_INTERPRET=1) and the GPU benchmark against mamba-ssm's kernel.
Backend name in `serpent.scan.used_backends()`: "triton".
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from serpent import scan

BACKEND = "triton"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # a constant for dynamo
MAX_SCALES = 4  # serpent.kernels.MAX_SCALES (not imported: this module must not need Triton)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def use_fused(backend: str, device: torch.device, dtype: torch.dtype, num_scales: int) -> bool:
    """Whether a Serpent mixer with scan backend `backend` runs this fused op.

    "triton" always does (the op refuses devices it cannot run on: an explicit request is never
    silently replaced); "auto" does on CUDA when Triton is installed, the dtype is supported and
    the pyramid fits one launch; any other backend runs the unfused MSSM with that selective-scan
    backend. Plain Python on static values, so torch.compile traces it without a graph break."""
    if backend == BACKEND:
        return True
    return (backend == "auto" and device.type == "cuda" and TRITON_INSTALLED
            and dtype in _DTYPES and num_scales <= MAX_SCALES)


@dataclass(frozen=True)
class ScanTiles:
    """Scan kernel tiling: chunk length T (steps per associative scan, also the spacing of the
    states saved for backward), channels per program and warps, forward and backward.

    Smaller channel blocks mean more programs (b * 4 * inner / channels per scale: 128 for
    serpent_s's first level at batch 1 with 2 channels) but more redundant loads of B, C, dt and,
    in backward, more atomic adds of their gradients; hence more channels in backward."""

    chunk: int = 64
    fwd_channels: int = 2
    bwd_channels: int = 4
    fwd_warps: int = 4
    bwd_warps: int = 8
    segment: int = 32  # chunks per segment, forward and backward (longer sequences split)

    @classmethod
    def from_env(cls) -> "ScanTiles":
        """Defaults, or SERPENT_SCAN_TILES="chunk,fwd_channels,bwd_channels,fwd_warps,bwd_warps"
        with an optional sixth field, segment (powers of two; benchmarks/serpent_kernels.py
        sweeps them)."""
        return _parse_tiles(os.environ.get("SERPENT_SCAN_TILES"))


@functools.lru_cache(maxsize=16)
def _parse_tiles(spec: Optional[str]) -> ScanTiles:
    # called by the ops' implementations and fake implementations, never traced by dynamo
    return ScanTiles(*(int(v) for v in spec.split(","))) if spec else ScanTiles()


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _scale_sizes(h: int, w: int, num_scales: int) -> list[tuple[int, int]]:
    """Map size of every pyramid scale: avg_pool2d(2^s, ceil_mode=True) of an h x w map."""
    return [(-(-h // 2 ** s), -(-w // 2 ** s)) for s in range(num_scales)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(h: int, w: int, tiles: ScanTiles) -> int:
    """Segments of the longest (scale 0) sequence: the scan kernels' third grid dimension."""
    chunks = -(-h * w // tiles.chunk)
    return -(-chunks // tiles.segment)


def _summary_elements(b: int, inner: int, n: int, num_scales: int, nseg: int) -> int:
    """(end state or carry, decay product) per segment of every (scale, batch, direction)."""
    return num_scales * b * 4 * nseg * 2 * inner * n


def _state_elements(b: int, h: int, w: int, inner: int, n: int, num_scales: int, chunk: int) -> int:
    return sum(b * 4 * -(-hs * ws // chunk) * inner * n
               for hs, ws in _scale_sizes(h, w, num_scales))


# --------------------------------------------------------------------------- FLOPs


def mssm_core_macs(b: int, h: int, w: int, inner: int, num_scales: int, d_state: int,
                   dt_rank: int) -> dict[str, int]:
    """Multiply-adds of one `serpent::mssm_core` call by category, exactly what the FLOP
    counters (bench/measure/flops.py) count for the unfused MSSM between in_proj and out_proj:
    conv = the depthwise 3x3 conv; matmul = x_proj and dt_proj of every scale (4 directions)
    and the fuse projection; selective_scan = VMamba's formula per scale (4*inner channels, D
    skip, no z); upsample = 4 per output element of each bilinear interpolation (fvcore's
    convention, FlopCounterMode counts none); norm = 5 per element of the LayerNorm (fvcore).
    With dt_rank 1 (serpent_t's first level) the unfused dt_proj einsum contracts a dimension
    of size 1, which torch.einsum runs as a broadcast multiply that neither counter counts: so
    its multiply-adds are left out here too, to keep the reported counts unchanged."""
    macs = {"conv": b * inner * h * w * 9, "matmul": 0, "selective_scan": 0, "upsample": 0,
            "norm": 5 * b * h * w * inner}
    for s, (hs, ws) in enumerate(_scale_sizes(h, w, num_scales)):
        length = hs * ws
        macs["matmul"] += b * length * inner * 4 * (dt_rank + 2 * d_state)  # x_proj
        if dt_rank > 1:
            macs["matmul"] += b * length * 4 * inner * dt_rank  # dt_proj
        macs["selective_scan"] += scan.selective_scan_macs(b, 4 * inner, length, d_state, True,
                                                           False)
        if s:
            macs["upsample"] += 4 * b * inner * h * w
    if num_scales > 1:
        macs["matmul"] += b * h * w * num_scales * inner * inner  # fuse
    return macs


def mssm_core_op_macs(args) -> dict[str, int]:
    """`mssm_core_macs` from the op's arguments (tensors or anything with .shape): the FLOP
    handle for torch.ops.serpent.mssm_core."""
    xz, x_proj, A_log = args[0], args[3], args[6]
    b, h, w, c2 = xz.shape
    return mssm_core_macs(b, h, w, c2 // 2, len(x_proj), A_log[0].shape[-1],
                          x_proj[0].shape[1] - 2 * A_log[0].shape[-1])


# --------------------------------------------------------------------------- the custom op


@torch.library.custom_op("serpent::mssm_core", mutates_args=())
def _mssm_core_op(xz: Tensor, conv_weight: Tensor, conv_bias: Tensor, x_proj: list[Tensor],
                  dt_weight: list[Tensor], dt_bias: list[Tensor], A_log: list[Tensor],
                  D: list[Tensor], fuse_weight: Optional[Tensor], fuse_bias: Optional[Tensor],
                  norm_weight: Tensor, norm_bias: Tensor, norm_eps: float, path: str,
                  save_states: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, and what backward needs: xs, x_dbl, states, cat, fused). `mssm_core` is the API."""
    _check_runnable(xz, len(x_proj))
    scan._USED.add(BACKEND)
    return _forward(_kernels(), xz, conv_weight, conv_bias, x_proj, dt_weight, dt_bias, A_log, D,
                    fuse_weight, fuse_bias, norm_weight, norm_bias, norm_eps, path, save_states)


def _kernels():
    """serpent.kernels, imported on first use (CPU code paths never need Triton)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = importlib.import_module("serpent.kernels")
    return _KERNELS


_KERNELS = None


def eager_call(t: Tensor) -> bool:
    """Whether a fused op may run its implementation directly instead of through the dispatcher:
    plain tensors on a real device, eager mode, no dispatch mode watching (FLOP counters, fake
    tensors and torch.compile all see the custom op). Why: a torch.library custom op costs ~80 us
    of Python per call, which would cap the eager speed-up of a model of 5 such calls per block."""
    return (not torch.compiler.is_compiling() and type(t) in (Tensor, torch.nn.Parameter)
            and t.device.type in ("cuda", "cpu") and torch._C._len_torch_dispatch_stack() == 0)


def _check_runnable(xz: Tensor, num_scales: int) -> None:
    if xz.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the 'triton' scan backend runs on CUDA (on the CPU only under "
                           "TRITON_INTERPRET=1, for tests); use scan_backend='chunked' on the CPU")
    if xz.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the 'triton' scan backend cannot run on {xz.device}")
    if not TRITON_INSTALLED:
        raise RuntimeError("the 'triton' scan backend needs the triton package")
    if xz.dtype not in _DTYPES:
        raise RuntimeError(f"the 'triton' scan backend supports {_DTYPES}, not {xz.dtype}")
    if not 1 <= num_scales <= MAX_SCALES:
        raise RuntimeError(f"the 'triton' scan backend fuses 1 to {MAX_SCALES} pyramid scales, "
                           f"got {num_scales}")


@_mssm_core_op.register_fake
def _(xz, conv_weight, conv_bias, x_proj, dt_weight, dt_bias, A_log, D, fuse_weight, fuse_bias,
      norm_weight, norm_bias, norm_eps, path, save_states):
    torch._check(xz.dim() == 4, lambda: "xz must be (b, h, w, 2 * inner)")
    b, h, w, c2 = xz.shape
    inner, num_scales = c2 // 2, len(x_proj)
    n, f = A_log[0].shape[-1], x_proj[0].shape[1]
    pixels = sum(hs * ws for hs, ws in _scale_sizes(h, w, num_scales))
    states = (_state_elements(b, h, w, inner, n, num_scales, ScanTiles.from_env().chunk)
              if save_states else 0)
    return (xz.new_empty(b, h, w, inner), xz.new_empty(b * pixels * inner),
            xz.new_empty(b * pixels * 4 * f), xz.new_empty(states, dtype=_compute_dtype(xz.dtype)),
            xz.new_empty(b, h, w, num_scales * inner),
            xz.new_empty(b, h, w, inner if num_scales > 1 else 0))


def mssm_core(xz: Tensor, conv_weight: Tensor, conv_bias: Tensor, x_proj: list[Tensor],
              dt_weight: list[Tensor], dt_bias: list[Tensor], A_log: list[Tensor],
              D: list[Tensor], fuse_weight: Optional[Tensor], fuse_bias: Optional[Tensor],
              norm_weight: Tensor, norm_bias: Tensor, norm_eps: float,
              path: str = "serpentine") -> Tensor:
    """(b, h, w, inner): LayerNorm(fuse(cat over scales s of upsample(sum over 4 directions of
    S6(dirs of avgpool_{2^s}(SiLU(dwconv(x))))))) * SiLU(z), with x, z = xz.chunk(2, -1).

    Parameters as in serpent.model.MSSM: conv (inner, 1, 3, 3) and (inner,); per scale
    x_proj (4, R + 2N, inner), dt_weight (4, inner, R), dt_bias (4, inner), A_log (4 inner, N),
    D (4 inner); fuse (inner, S inner) and (inner,), or None when S == 1; LayerNorm (inner,).
    """
    if path not in ("raster", "serpentine"):
        raise ValueError(f"scan path must be raster or serpentine, got {path!r}")
    params = [conv_weight, conv_bias, *x_proj, *dt_weight, *dt_bias, *A_log, *D, fuse_weight,
              fuse_bias, norm_weight, norm_bias]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [xz, *params])
    args = (xz.contiguous(), conv_weight, conv_bias, x_proj, dt_weight, dt_bias, A_log, D,
            fuse_weight, fuse_bias, norm_weight, norm_bias, float(norm_eps), path)
    if not eager_call(xz):
        return torch.ops.serpent.mssm_core(*args, save)[0]
    _check_runnable(xz, len(x_proj))
    scan._USED.add(BACKEND)
    if not save:
        return _forward(_kernels(), *args, False)[0]
    S = len(x_proj)
    return _MssmCoreFunction.apply((S, float(norm_eps), path), args[0], conv_weight, conv_bias,
                                   fuse_weight, fuse_bias, norm_weight, norm_bias, *x_proj,
                                   *dt_weight, *dt_bias, *A_log, *D)


# --------------------------------------------------------------------------- launches


def _tl_dtype(kernels, dtype: torch.dtype):
    return kernels.tl.float64 if dtype == torch.float64 else kernels.tl.float32


def _pointers(tensors: list[Tensor]) -> list[Tensor]:
    """Per-scale parameter pointers padded to MAX_SCALES (unused slots are never read)."""
    return [*tensors, *[tensors[0]] * (MAX_SCALES - len(tensors))]


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _dot_args(kernels, dtype: torch.dtype, operands: torch.dtype) -> dict:
    """tl.dot in CT where Triton has it (not float64: a broadcast product there, tests only).
    Operands of `operands` dtype: 16-bit ones are exact in TF32 (tensor cores, a bf16 GEMM's
    arithmetic); fp32 ones exactly (FMA) unless torch allows TF32 for matmuls, as cuBLAS."""
    tf32 = operands in (torch.bfloat16, torch.float16) or (
        operands == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    return dict(USE_DOT=dtype != torch.float64, PRECISION="tf32" if tf32 else "ieee",
                CT=_tl_dtype(kernels, dtype))


def _grouped_matmul(kernels, a, weights, c, b, h, w, k, n, *, transpose_b, accumulate=False):
    """c[rows of scale s] (+)= a[rows of s] @ (weights[s].view(n, k).t() if transpose_b else
    weights[s].view(k, n)) for all scales in one launch (x_proj is per-pixel channel mixing:
    one matmul per scale on the map, all four directions at once)."""
    bm, bn = 64, min(64, max(16, _pow2(n)))
    bk = 16 if a.dtype == torch.float64 else min(32, max(16, _pow2(k)))
    rows = [b * hs * ws for hs, ws in _scale_sizes(h, w, len(weights))]
    strides = (1, k) if transpose_b else (n, 1)
    kernels.grouped_matmul_kernel[(sum(-(-r // bm) for r in rows), -(-n // bn))](
        a, *_pointers(weights), c, b, h, w, k, n, *strides, ACCUMULATE=accumulate,
        NUM_SCALES=len(weights), BM=bm, BN=bn, BK=bk,
        **_dot_args(kernels, _compute_dtype(a.dtype), a.dtype))


def _weight_grad(kernels, x, g, dw, b, h, w, k, n, num_scales):
    """dw[s] (n, k) += g[rows of s]^T @ x[rows of s] for every scale, one launch (atomic adds
    into the zeroed gradient buffer: chunks of 512 rows per program)."""
    ct = _compute_dtype(x.dtype)
    rc, br = 512, 16 if ct == torch.float64 else 32
    bn = min(64, max(16, _pow2(n)))
    bk = 16 if ct == torch.float64 else min(64, max(16, _pow2(k)))
    rows = [b * hs * ws for hs, ws in _scale_sizes(h, w, num_scales)]
    kernels.grouped_weight_grad_kernel[(sum(-(-r // rc) for r in rows), -(-n // bn), -(-k // bk))](
        x, g, dw, b, h, w, k, n, NUM_SCALES=num_scales, RC=rc, BR=br, BN=bn, BK=bk,
        **_dot_args(kernels, ct, ct))


def _pyramid_tile(num_scales: int) -> int:
    return max(8, 2 ** (num_scales - 1))


def _forward(kernels, xz, conv_weight, conv_bias, x_proj, dt_weight, dt_bias, A_log, D,
             fuse_weight, fuse_bias, norm_weight, norm_bias, norm_eps, path, save_states):
    b, h, w, c2 = xz.shape
    inner, num_scales, dtype = c2 // 2, len(x_proj), xz.dtype
    ct = _compute_dtype(dtype)
    CT = _tl_dtype(kernels, dtype)
    n, f = A_log[0].shape[-1], x_proj[0].shape[1]
    rank = f - 2 * n
    sizes = _scale_sizes(h, w, num_scales)
    pixels = sum(hs * ws for hs, ws in sizes)
    tiles = ScanTiles.from_env()

    xs = xz.new_empty(b * pixels * inner)
    tile, cb = _pyramid_tile(num_scales), min(32, _pow2(inner))
    kernels.pyramid_fwd_kernel[(-(-h // tile) * -(-w // tile), b, -(-inner // cb))](
        xz, conv_weight, conv_bias, xs, b, h, w, inner, c2,
        NUM_SCALES=num_scales, TILE=tile, CB=cb, CT=CT)

    x_dbl = xz.new_empty(b * pixels * 4 * f)
    _grouped_matmul(kernels, xs, x_proj, x_dbl, b, h, w, inner, 4 * f, transpose_b=True)

    ydir = xz.new_empty(4 * b * pixels * inner)
    states = xz.new_empty(_state_elements(b, h, w, inner, n, num_scales, tiles.chunk)
                          if save_states else 0, dtype=ct)
    cbf = min(tiles.fwd_channels, _pow2(inner))
    nseg = _segments(h, w, tiles)
    summaries = (xz.new_empty(_summary_elements(b, inner, n, num_scales, nseg), dtype=ct)
                 if nseg > 1 else xs)  # one segment: the kernels never touch it
    scan_args = (*_pointers(A_log), *_pointers(D), *_pointers(dt_weight), *_pointers(dt_bias),
                 b, h, w, inner, rank, n, tiles.segment, nseg)
    scan_opts = dict(SERPENTINE=path == "serpentine", NUM_SCALES=num_scales,
                     SAVE_STATES=save_states, SEGMENTED=nseg > 1, T=tiles.chunk, CB=cbf,
                     NP=_pow2(n), RP=_pow2(rank), CT=CT, num_warps=tiles.fwd_warps)
    grid = (b * 4 * -(-inner // cbf), num_scales, nseg)
    if nseg > 1:  # every segment's end state and decay from a zero start (see the kernel)
        kernels.scan_fwd_kernel[grid](xs, x_dbl, ydir, xs, summaries, *scan_args,
                                      SUMMARY=True, **scan_opts)
    kernels.scan_fwd_kernel[grid](xs, x_dbl, ydir, states if save_states else xs, summaries,
                                  *scan_args, SUMMARY=False, **scan_opts)

    cat = xz.new_empty(b, h, w, num_scales * inner)
    pix, cb = 32, min(32, _pow2(inner))
    kernels.merge_fwd_kernel[(-(-h * w // pix), b, -(-inner // cb))](
        ydir, cat, b, h, w, inner, NUM_SCALES=num_scales, P=pix, CB=cb, CT=CT)

    if num_scales > 1:  # the fuse projection (its bias is added in fp32 by the norm kernel)
        fused = xz.new_empty(b, h, w, inner)
        _grouped_matmul(kernels, cat, [fuse_weight], fused, b, h, w, num_scales * inner, inner,
                        transpose_b=True)
    else:
        fused = cat
    out = xz.new_empty(b, h, w, inner)
    ip = _pow2(inner)
    pix = max(1, 2048 // ip)
    kernels.norm_gate_fwd_kernel[(-(-b * h * w // pix),)](
        fused, fuse_bias if fuse_bias is not None else norm_bias, xz, norm_weight, norm_bias, out,
        b * h * w, inner, norm_eps, HAS_FUSE_BIAS=fuse_bias is not None, P=pix, IP=ip, CT=CT)
    return out, xs, x_dbl, states, cat, fused if num_scales > 1 else xz.new_empty(b, h, w, 0)


def _save(ctx, xz, conv_weight, conv_bias, x_proj, dt_weight, dt_bias, A_log, D, fuse_weight,
          fuse_bias, norm_weight, norm_bias, norm_eps, path, out):
    """What backward needs, for the custom op's autograd and the eager Function alike."""
    _, xs, x_dbl, states, cat, fused = out
    ctx.num_scales, ctx.norm_eps, ctx.path = len(x_proj), norm_eps, path
    ctx.has_fuse = fuse_weight is not None
    ctx.save_for_backward(xz, conv_weight, conv_bias, xs, x_dbl, states, cat, fused, norm_weight,
                          norm_bias, *([fuse_weight, fuse_bias] if ctx.has_fuse else []),
                          *x_proj, *dt_weight, *dt_bias, *A_log, *D)


def _saved(ctx):
    saved = list(ctx.saved_tensors)
    head, rest = saved[:10], saved[10:]
    fuse = (rest[0], rest[1]) if ctx.has_fuse else (None, None)
    rest = rest[2:] if ctx.has_fuse else rest
    S = ctx.num_scales
    return (*head, *fuse, *(rest[i * S:(i + 1) * S] for i in range(5)))


def _param_grads(flat, xz, conv_weight, conv_bias, norm_weight, norm_bias, fuse_weight,
                 fuse_bias, x_proj, dt_weight, dt_bias, A_log, D) -> dict:
    """The parameter gradients: views of the flat gradient buffer, in the parameters' dtypes."""
    b, h, w, c2 = xz.shape
    S, n, f = len(x_proj), A_log[0].shape[-1], x_proj[0].shape[1]
    pixels = sum(hs * ws for hs, ws in _scale_sizes(h, w, S))
    g = _split(flat, _grad_parts(b, pixels, c2 // 2, S, n, f, f - 2 * n))

    def per_scale(name, like):
        return [_as(g[name][s * t.numel():(s + 1) * t.numel()].view(t.shape), t.dtype)
                for s, t in enumerate(like)]

    def as_param(grad, param):
        return None if param is None else _as(grad.view(param.shape), param.dtype)

    return dict(conv_weight=as_param(g["dconv_w"], conv_weight),
                conv_bias=as_param(g["dconv_b"], conv_bias),
                x_proj=per_scale("dXp", x_proj), dt_weight=per_scale("dW", dt_weight),
                dt_bias=per_scale("dE", dt_bias), A_log=per_scale("dA", A_log),
                D=per_scale("dD", D), fuse_weight=as_param(g["dfuse_w"], fuse_weight),
                fuse_bias=as_param(g["dfuse_b"], fuse_bias),
                norm_weight=as_param(g["dnorm_w"], norm_weight),
                norm_bias=as_param(g["dnorm_b"], norm_bias))


def _setup_context(ctx, inputs, output):
    *args, save_states = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.unsaved = not save_states  # the forward ran without autograd in mind
    _save(ctx, *args, output)


def _zeros_like_out(xz: Tensor) -> Tensor:
    return xz.new_zeros(*xz.shape[:-1], xz.shape[-1] // 2)


def _backward(ctx, dout, *_):
    if ctx.unsaved:
        raise RuntimeError("serpent::mssm_core was called with save_states=False; call it "
                           "through serpent.fused.mssm_core to differentiate it")
    (xz, conv_weight, conv_bias, xs, x_dbl, states, cat, fused, norm_weight, norm_bias,
     fuse_weight, fuse_bias, x_proj, dt_weight, dt_bias, A_log, D) = _saved(ctx)
    dxz, flat = torch.ops.serpent.mssm_core_backward(
        _zeros_like_out(xz) if dout is None else dout, xz, conv_weight, conv_bias, xs, x_dbl,
        states, cat, fused, norm_weight, norm_bias, fuse_weight, fuse_bias, x_proj, dt_weight,
        dt_bias, A_log, D, ctx.norm_eps, ctx.path)
    g = _param_grads(flat, xz, conv_weight, conv_bias, norm_weight, norm_bias, fuse_weight,
                     fuse_bias, x_proj, dt_weight, dt_bias, A_log, D)
    return (dxz, g["conv_weight"], g["conv_bias"], g["x_proj"], g["dt_weight"], g["dt_bias"],
            g["A_log"], g["D"], g["fuse_weight"], g["fuse_bias"], g["norm_weight"],
            g["norm_bias"], None, None, None)


class _MssmCoreFunction(torch.autograd.Function):
    """The eager path (see `eager_call`): the op's forward and backward implementations
    without the dispatcher. Lists are flattened: autograd tracks only direct tensor arguments."""

    @staticmethod
    def forward(ctx, spec, xz, conv_weight, conv_bias, fuse_weight, fuse_bias, norm_weight,
                norm_bias, *per_scale):
        S, norm_eps, path = spec
        x_proj, dt_weight, dt_bias, A_log, D = (list(per_scale[i * S:(i + 1) * S])
                                                for i in range(5))
        out = _forward(_kernels(), xz, conv_weight, conv_bias, x_proj, dt_weight, dt_bias, A_log,
                       D, fuse_weight, fuse_bias, norm_weight, norm_bias, norm_eps, path, True)
        _save(ctx, xz, conv_weight, conv_bias, x_proj, dt_weight, dt_bias, A_log, D, fuse_weight,
              fuse_bias, norm_weight, norm_bias, norm_eps, path, out)
        return out[0]

    @staticmethod
    def backward(ctx, dout):
        (xz, conv_weight, conv_bias, xs, x_dbl, states, cat, fused, norm_weight, norm_bias,
         fuse_weight, fuse_bias, x_proj, dt_weight, dt_bias, A_log, D) = _saved(ctx)
        scan._USED.add(BACKEND)
        dxz, flat = _backward_impl(_kernels(), dout.contiguous(), xz, conv_weight, conv_bias, xs,
                                   x_dbl, states, cat, fused, norm_weight, norm_bias, fuse_weight,
                                   fuse_bias, x_proj, dt_weight, dt_bias, A_log, D, ctx.norm_eps,
                                   ctx.path)
        g = _param_grads(flat, xz, conv_weight, conv_bias, norm_weight, norm_bias, fuse_weight,
                         fuse_bias, x_proj, dt_weight, dt_bias, A_log, D)
        return (None, dxz, g["conv_weight"], g["conv_bias"], g["fuse_weight"], g["fuse_bias"],
                g["norm_weight"], g["norm_bias"], *g["x_proj"], *g["dt_weight"], *g["dt_bias"],
                *g["A_log"], *g["D"])


def _grad_parts(b, pixels, inner, num_scales, n, f, rank) -> dict[str, int]:
    """Sizes of the parts of the one zeroed gradient buffer of the backward (atomic adds)."""
    return {"du": b * pixels * inner, "dxd": b * pixels * 4 * f,
            "dA": num_scales * 4 * inner * n, "dD": num_scales * 4 * inner,
            "dE": num_scales * 4 * inner, "dW": num_scales * 4 * inner * rank,
            "dXp": num_scales * 4 * f * inner, "dconv_w": inner * 9, "dconv_b": inner,
            "dnorm_w": inner, "dnorm_b": inner, "dfuse_b": inner,
            "dfuse_w": num_scales * inner * inner if num_scales > 1 else 0}


def _split(flat: Tensor, parts: dict[str, int]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, size in parts.items():
        out[name] = flat[start:start + size]
        start += size
    return out


@torch.library.custom_op("serpent::mssm_core_backward", mutates_args=())
def _mssm_core_backward_op(dout: Tensor, xz: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                           xs: Tensor, x_dbl: Tensor, states: Tensor, cat: Tensor, fused: Tensor,
                           norm_weight: Tensor, norm_bias: Tensor, fuse_weight: Optional[Tensor],
                           fuse_bias: Optional[Tensor], x_proj: list[Tensor],
                           dt_weight: list[Tensor], dt_bias: list[Tensor], A_log: list[Tensor],
                           D: list[Tensor], norm_eps: float, path: str) -> list[Tensor]:
    """[d xz, the flat gradient buffer (`_grad_parts`)]: its own op so that AOTAutograd
    (torch.compile) traces the backward as one opaque node too."""
    scan._USED.add(BACKEND)
    return _backward_impl(_kernels(), dout.contiguous(), xz, conv_weight, conv_bias, xs, x_dbl,
                          states, cat, fused, norm_weight, norm_bias, fuse_weight, fuse_bias,
                          x_proj, dt_weight, dt_bias, A_log, D, norm_eps, path)


@_mssm_core_backward_op.register_fake
def _(dout, xz, conv_weight, conv_bias, xs, x_dbl, states, cat, fused, norm_weight, norm_bias,
      fuse_weight, fuse_bias, x_proj, dt_weight, dt_bias, A_log, D, norm_eps, path):
    b, h, w, c2 = xz.shape
    inner, num_scales = c2 // 2, len(x_proj)
    n, f = A_log[0].shape[-1], x_proj[0].shape[1]
    pixels = sum(hs * ws for hs, ws in _scale_sizes(h, w, num_scales))
    flat = sum(_grad_parts(b, pixels, inner, num_scales, n, f, f - 2 * n).values())
    return [torch.empty_like(xz), xz.new_empty(flat, dtype=_compute_dtype(xz.dtype))]


def _backward_impl(kernels, dout, xz, conv_weight, conv_bias, xs, x_dbl, states, cat, fused,
                   norm_weight, norm_bias, fuse_weight, fuse_bias, x_proj, dt_weight, dt_bias,
                   A_log, D, norm_eps, path):
    b, h, w, c2 = xz.shape
    inner, num_scales, dtype = c2 // 2, len(x_proj), xz.dtype
    ct = _compute_dtype(dtype)
    CT = _tl_dtype(kernels, dtype)
    n, f = A_log[0].shape[-1], x_proj[0].shape[1]
    rank = f - 2 * n
    sizes = _scale_sizes(h, w, num_scales)
    pixels = sum(hs * ws for hs, ws in sizes)
    tiles = ScanTiles.from_env()

    # one zeroed buffer for everything accumulated with atomic adds (one launch)
    flat = torch.zeros(sum(_grad_parts(b, pixels, inner, num_scales, n, f, rank).values()),
                       dtype=ct, device=xz.device)
    g = _split(flat, _grad_parts(b, pixels, inner, num_scales, n, f, rank))

    dxz = torch.empty_like(xz)
    npix = b * h * w
    dfused = xz.new_empty(b, h, w, inner)
    ip = _pow2(inner)
    pix = max(1, 2048 // ip)
    kernels.norm_gate_bwd_kernel[(-(-npix // pix),)](
        dout, fused if num_scales > 1 else cat, fuse_bias if fuse_bias is not None else norm_bias,
        xz, norm_weight, norm_bias, dfused, dxz, g["dnorm_w"], g["dnorm_b"], g["dfuse_b"],
        npix, inner, norm_eps, HAS_FUSE_BIAS=fuse_bias is not None, P=pix, IP=ip, CT=CT)

    if num_scales > 1:
        dcat = xz.new_empty(b, h, w, num_scales * inner)
        _grouped_matmul(kernels, dfused, [fuse_weight], dcat, b, h, w, inner, num_scales * inner,
                        transpose_b=False)
        _weight_grad(kernels, cat, dfused, g["dfuse_w"], b, h, w, num_scales * inner, inner, 1)
        coarse = b * (pixels - h * w)
        dys = torch.empty(coarse * inner, dtype=ct, device=xz.device)
        span = _pow2(2 ** num_scales + 3)  # 2f + 3 candidates of the coarsest scale
        pc, cb = 16, min(16, _pow2(inner))
        hs1, ws1 = sizes[1]
        kernels.merge_bwd_kernel[(-(-hs1 * ws1 // pc), b * -(-inner // cb), num_scales - 1)](
            dcat, dys, b, h, w, inner, NUM_SCALES=num_scales, P=pc, CB=cb, SPAN=span, CT=CT)
    else:
        dcat, dys = dfused, dfused

    cbb = min(tiles.bwd_channels, _pow2(inner))
    nseg = _segments(h, w, tiles)
    summaries = (xs.new_empty(_summary_elements(b, inner, n, num_scales, nseg), dtype=ct)
                 if nseg > 1 else xs)  # one segment: the kernels never touch it
    scan_args = (xs, x_dbl, states, dcat, dys, g["du"], g["dxd"], g["dA"], g["dD"], g["dE"],
                 g["dW"], summaries,
                 *_pointers(A_log), *_pointers(D), *_pointers(dt_weight), *_pointers(dt_bias),
                 b, h, w, inner, rank, n, tiles.segment, nseg)
    scan_opts = dict(SERPENTINE=path == "serpentine", NUM_SCALES=num_scales, SEGMENTED=nseg > 1,
                     T=tiles.chunk, CB=cbb, NP=_pow2(n), RP=_pow2(rank), CT=CT,
                     num_warps=tiles.bwd_warps)
    grid = (b * 4 * -(-inner // cbb), num_scales, nseg)
    if nseg > 1:  # every segment's leaving carry and product of a from a zero carry
        kernels.scan_bwd_kernel[grid](*scan_args, SUMMARY=True, **scan_opts)
    kernels.scan_bwd_kernel[grid](*scan_args, SUMMARY=False, **scan_opts)

    # x_dbl = xs @ W_s^T of every scale: du += d x_dbl @ W_s, dW_s = d x_dbl^T @ xs
    _grouped_matmul(kernels, g["dxd"], x_proj, g["du"], b, h, w, 4 * f, inner,
                    transpose_b=False, accumulate=True)
    _weight_grad(kernels, xs, g["dxd"], g["dXp"], b, h, w, inner, 4 * f, num_scales)

    tile, cb = _pyramid_tile(num_scales), min(32, _pow2(inner))
    grid = (-(-h // tile) * -(-w // tile), b, -(-inner // cb))
    kernels.pyramid_bwd_pre_kernel[grid](
        xz, conv_weight, conv_bias, g["du"], g["dconv_w"], g["dconv_b"], b, h, w, inner, c2,
        NUM_SCALES=num_scales, TILE=tile, CB=cb, CT=CT)
    kernels.pyramid_bwd_in_kernel[grid](
        g["du"], conv_weight, dxz, h, w, inner, c2, TILE=tile, CB=cb, CT=CT)
    return [dxz, flat]


_mssm_core_op.register_autograd(_backward, setup_context=_setup_context)
