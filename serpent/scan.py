"""Selective scan (Mamba's S6) as one torch custom op with interchangeable backends.

Why one custom op: FLOP counters (fvcore's jit handles, FlopCounterMode) must see the scan as a
single node, `torch.ops.serpent.selective_scan`, whatever runs underneath; otherwise they either
miss mamba-ssm's CUDA kernel (an opaque autograd.Function) or count hundreds of small ops of the
PyTorch fallback. Semantics and shapes follow `mamba_ssm.ops.selective_scan_interface.
selective_scan_fn` (real A only):

    u, delta, z: (b, d, l)   A: (d, n)   B, C: (b, n, l) or grouped (b, g, n, l), d % g == 0
    D, delta_bias: (d,)      output: (b, d, l) in u's dtype

    delta <- softplus(delta + delta_bias)            (each step only if given / requested)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_{-1} = 0,  h_t: (b, d, n)
    y_t = <C_t, h_t> + D * u_t;   y <- y * silu(z)

Math runs in float32 (float64 when u is float64), as mamba's kernel and reference do.

Backends (`resolve_backend` picks one; `used_backends` reports what actually ran):
- "mamba": mamba-ssm's CUDA kernel through its public `selective_scan_fn`, imported lazily.
  Backward re-runs `selective_scan_fn` under autograd and back-propagates through it (one extra
  forward kernel). We do not call the `selective_scan_cuda.fwd/bwd` extension directly because
  its argument list differs between mamba-ssm releases (cu_seqlens / prev_state were added in
  some), and a custom op cannot carry the kernel's saved chunk states from forward to backward.
- "chunked": PyTorch, two-level scan over chunks of length T ~ sqrt(l): a T-step loop that
  advances all l/T chunks at once (every step is one vectorised op over all chunks), then a
  sequential pass over the l/T chunk-end states and one broadcast op that carries each into the
  next chunk. Time-major layout, fixed-size time blocks on CPU (see `chunked_scan`). Only
  products of decays exp(delta*A) <= 1 appear (A < 0): no exp of large positive numbers, no
  division by cumulative decays. Backward: the op recomputes the forward under autograd; the
  linear recurrence itself has an analytic backward (the same chunked scan run in reverse).
- "sequential": the plain loop over l, kept as the test reference.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("mamba", "chunked", "sequential")
_MAMBA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_USED: set[str] = set()


def used_backends() -> set[str]:
    """Backends that actually ran (forward or backward) since the last `reset_used_backends`."""
    return set(_USED)


def reset_used_backends() -> None:
    _USED.clear()


@functools.cache
def mamba_available() -> bool:
    """True when mamba-ssm and its compiled CUDA extension import (never needed on CPU)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or OSError/RuntimeError from a broken extension build
        return False
    return True


def resolve_backend(device, requested: str = "auto", dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs for tensors on `device` (and of `dtype`, if given).

    "auto" means mamba-ssm's kernel on CUDA when it imports (and supports the dtype), else the
    chunked PyTorch scan. An explicit request that cannot be honoured is an error, not a
    silent fallback, so a results row never names a backend that did not run.
    """
    device = torch.device(device)
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"unknown selective-scan backend {requested!r}; "
                         f"choose one of auto, {', '.join(BACKENDS)}")
    mamba_ok = dtype is None or dtype in _MAMBA_DTYPES
    if requested == "auto":
        return "mamba" if device.type == "cuda" and mamba_ok and mamba_available() else "chunked"
    if requested == "mamba":
        if device.type != "cuda":
            raise ValueError(f"backend 'mamba' needs CUDA tensors, got device {device}")
        if not mamba_ok:
            raise ValueError(f"backend 'mamba' supports {_MAMBA_DTYPES}, not {dtype}")
        if not mamba_available():
            raise RuntimeError("backend 'mamba' requested but mamba_ssm does not import; "
                               "install it with `pip install -e .[cuda]` or use backend='chunked'")
    return requested


def selective_scan_macs(b: int, d: int, l: int, n: int, with_D: bool, with_z: bool) -> int:
    """Multiply-adds of one selective scan (VMamba's count, from the Mamba authors)."""
    return 9 * b * l * d * n + b * d * l * int(bool(with_D)) + b * d * l * int(bool(with_z))


# --------------------------------------------------------------------------- shared pieces


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _softplus(x: Tensor) -> Tensor:
    """softplus = max(x, 0) + log1p(exp(-|x|)) without torch.log1p, which is not vectorised on
    CPU (8x slower here than log): log1p(e) = log(v) - ((v - 1) - e) / v with v = 1 + e rounded,
    whose rounding error (v - 1) - e is computed exactly (compensated log: ~1 ulp, and e itself
    when 1 + e rounds to 1). No threshold (F.softplus returns x above 20: 1e-10 off in float64)."""
    e = torch.exp(-x.abs())
    v = e + 1
    return torch.log(v).addcdiv_((v - 1).sub_(e), v, value=-1).add_(x.clamp_min(0))


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Upcast, apply delta bias/softplus, and give B and C a group axis: (b, g, n, l)."""
    ct = _compute_dtype(u)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = _softplus(delta)
    if B.dim() == 3:
        B = B[:, None]
    if C.dim() == 3:
        C = C[:, None]
    return u, delta, A, B, C


def _finish(y, u, D, z, dtype):
    if D is not None:
        y = torch.addcmul(y, u, D.to(y.dtype)[:, None])
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype).contiguous()


# --------------------------------------------------------------------------- chunked backend


def chunk_length(l: int) -> int:
    """T ~ sqrt(l) (a power of two, at least 8) balances the T in-chunk steps against the l/T
    boundary steps."""
    return max(8, 1 << round(math.log2(max(l, 1)) / 2))


def chunk_plan(b: int, d: int, n: int, l: int, device) -> tuple[int, int]:
    """(chunk length T, time-block length) that `chunked_scan` uses by default. On CPU, blocks of
    BLOCK_ELEMENTS / (b*d*n) steps and T ~ sqrt(block / 4): an in-chunk step (two ops over all
    chunks) costs more than a boundary step (one op over one state), so T is shorter than the
    balance of op counts, sqrt(block). Measured by benchmarks/scan_cpu.py. On CUDA one
    block, T ~ sqrt(l)."""
    if torch.device(device).type != "cpu":
        return chunk_length(l), l
    block = max(1, BLOCK_ELEMENTS // (b * d * n))
    return chunk_length(max(1, min(block, l) // 4)), block


def _scan_(a: Tensor, x: Tensor) -> Tensor:
    """In place: x <- h with h_t = a_t * h_{t-1} + x_t (h_{-1} = 0).

    a and x are contiguous (nc, T, ...) in natural time order: step t of chunk c is time c*T + t.
    An in-chunk step is then one strided slice over all chunks (nc rows of contiguous
    elements), and a chunk is one contiguous block for the carry. a is overwritten with the
    cumulative decays inside each chunk (products of a's entries).
    """
    nc, T = a.shape[:2]
    av, xv = a.view(nc, T, -1), x.view(nc, T, -1)
    a_t, x_t = av.unbind(1), xv.unbind(1)  # views made once: indexing costs show at this size
    for t in range(1, T):  # all chunks advance together, each from a zero state
        x_t[t].addcmul_(a_t[t], x_t[t - 1])
        if nc > 1:
            a_t[t].mul_(a_t[t - 1])
    if nc > 1:  # final states of all chunks: one short pass over the chunk ends, then each
        # chunk gets the decayed final state of the one before in one broadcast op
        ends = x_t[-1].clone()
        e_c, a_c = ends.unbind(0), a_t[-1].unbind(0)
        for c in range(1, nc):
            e_c[c].addcmul_(a_c[c], e_c[c - 1])
        xv[1:].addcmul_(av[1:], ends[:-1, None])
    return x


def _shift(x: Tensor, step: int) -> Tensor:
    """Shift a (nc, T, ...) sequence by one time step (+1: x_{t+1}, -1: x_{t-1}), zero-filled."""
    out = torch.zeros_like(x, memory_format=torch.contiguous_format)
    src, dst = x.flatten(0, 1), out.view(-1, *x.shape[2:])
    if step > 0:
        dst[:-1] = src[1:]
    else:
        dst[1:] = src[:-1]
    return out


class _LinearScan(torch.autograd.Function):
    """h_t = a_t h_{t-1} + x_t with the analytic backward: g_t = dh_t + a_{t+1} g_{t+1}
    (the same scan, time reversed), dx = g, da_t = g_t h_{t-1}. Saves only a and h."""

    @staticmethod
    def forward(ctx, a, x):
        cf = torch.contiguous_format
        h = _scan_(a.clone(memory_format=cf), x.clone(memory_format=cf))
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, gh):
        a, h = ctx.saved_tensors
        rev = (0, 1)  # flipping both layout axes reverses time
        g = _scan_(_shift(a, 1).flip(rev), gh.flip(rev).contiguous()).flip(rev)
        return (g * _shift(h, -1) if ctx.needs_input_grad[0] else None), g


def _linear_scan(a: Tensor, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and (a.requires_grad or x.requires_grad):
        return _LinearScan.apply(a, x)
    return _scan_(a.contiguous(), x.contiguous())  # temporaries of the caller: scan in place


_WORKSPACE = threading.local()


def _workspace(name: str, *operands: Tensor) -> Optional[Tensor]:
    """CPU output buffer for the broadcast product of `operands`, reused across calls (per
    thread, grow-only, at most a block's work tensor each): a fresh 16 MB allocation costs as
    much in page faults as the whole scan (measured: 22 ms vs 11 ms at l=4096, d=64). On CUDA
    the caching allocator already recycles memory: None (allocate normally)."""
    like = operands[0]
    if like.device.type != "cpu":
        return None
    shape = torch.broadcast_shapes(*(t.shape for t in operands))
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    buf = bufs.get((name, like.dtype))
    if buf is None or buf.numel() < math.prod(shape):
        # never an inference tensor: a buffer first allocated under torch.inference_mode is
        # written again by untracked scans outside it (a custom op's forward in training)
        with torch.inference_mode(False):
            buf = bufs[(name, like.dtype)] = torch.empty(math.prod(shape), dtype=like.dtype)
    return buf[: math.prod(shape)].view(shape)


BLOCK_ELEMENTS = 1 << 20  # per work tensor (4 MB in fp32): the block's tensors stay in L3


def _time_major(x: Tensor, pad: int, workspace: Optional[str] = None) -> Tensor:
    """(..., l) -> contiguous (l + pad, prod(...)), zero-padded at the end, into the named CPU
    workspace if given. A plain 2-D transpose of the contiguous input: torch copies that through
    a cache-blocked path (2.5x faster on CPU than a general permute)."""
    x = x.reshape(-1, x.shape[-1])
    x = (F.pad(x, (0, pad)) if pad else x).t()
    out = workspace and _workspace(workspace, x)
    return x.contiguous() if out is None else out.copy_(x)


def chunked_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 chunk: Optional[int] = None, block: Optional[int] = None) -> Tensor:
    """The chunked PyTorch backend as a plain differentiable function (no custom op).

    Inputs are copied once to time-major (l, ...) layout, so a time block is a contiguous
    slice. On CPU, long inputs run in time blocks of `block` steps (default: `chunk_plan`;
    rounded up to a multiple of the chunk length), each starting from the previous block's
    final state: the work tensors stay cache-sized (every pass over them is memory-bound; 16 MB
    ones spill out of L3). On CUDA one block (more blocks = more launches).
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, l = u.shape
    g, n = B.shape[1], A.shape[1]
    T, step = chunk_plan(b, d, n, l, u.device)
    T, step = chunk or T, block or step
    step = -(-step // T) * T  # a multiple of the chunk length
    pad = -l % T  # padded steps have delta = 0: decay 1, input 0, state kept, output cropped
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    dt, dtu, Bt, Ct = (_time_major(t, pad, None if tracked else name) for t, name in (
        (delta, "dt"), (delta * u, "dtu"), (B, "Bt"), (C, "Ct")))
    # exp(x) as exp2(x * log2 e): torch's exp2 is 3x faster than exp on CPU (AVX-512)
    A2 = (A * math.log2(math.e)).view(g, d // g, n).transpose(1, 2).contiguous()  # (g, n, e)
    y = None if tracked else _workspace("y", dt) if dt.is_cpu else torch.empty_like(dt)
    ys, state = [], None
    for s in range(0, l + pad, step):
        t = slice(s, s + step)
        y_t, state = _chunked_block(dt[t], dtu[t], A2, Bt[t], Ct[t], state, T, b,
                                    None if tracked else y[t])
        ys.append(y_t)
    y = y if not tracked else ys[0] if len(ys) == 1 else torch.cat(ys)
    return _finish(y[:l].t().contiguous().view(b, d, l), u, D, z, dtype)


def _chunked_block(dt, dtu, A2, Bt, Ct, state, T, b, out):
    """One time block of time-major inputs: (y (l, b*d), final state (b, g, n, e)), `state` the
    initial one; y goes to `out` when given (untracked: no autograd through out=).

    Work tensors are laid out (nc, T, b, g, n, e) with the channel e = d/g innermost: every
    broadcast (delta over n, B over e) is a plain scalar-times-vector loop, and y = <C, h> is one
    batched (1 x n) @ (n x e) matmul instead of a product pass plus a short inner reduction.
    """
    g, n, e = A2.shape
    nc = dt.shape[0] // T
    dt, dtu = (t.view(nc, T, b, g, 1, e) for t in (dt, dtu))
    Bt = Bt.view(nc, T, b, g, n, 1)
    tracked = out is None
    # (nc, T, b, g, n, e): decays (<= 1 when A < 0) and inputs
    a = torch.mul(dt, A2, out=None if tracked else _workspace("a", dt, A2)).exp2_()
    x = torch.mul(dtu, Bt, out=None if tracked else _workspace("x", dtu, Bt))
    if state is not None:
        x[0, 0].addcmul_(a[0, 0], state)
    h = _linear_scan(a, x)
    y = torch.bmm(Ct.view(-1, 1, n), h.view(-1, n, e),
                  out=None if tracked else out.view(-1, 1, e))
    return y.view(-1, b * g * e), h[-1, -1].clone()


# --------------------------------------------------------------------------- reference / mamba


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                    delta_softplus=False) -> Tensor:
    """Plain loop over l (the test reference; slow)."""
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, l = u.shape
    g, n = B.shape[1], A.shape[1]
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    inp = torch.einsum("bgel,bgnl->bgeln", (delta * u).view(b, g, d // g, l), B).reshape(b, d, l, n)
    h = u.new_zeros(b, d, n)
    ys = []
    for t in range(l):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append(torch.einsum("bgen,bgn->bge", h.view(b, g, -1, n), C[..., t]).reshape(b, d))
    return _finish(torch.stack(ys, dim=-1), u, D, z, dtype)


def _mamba_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's kernel; casts to the dtypes its C++ checks demand (fp32 A, D, delta_bias)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    it, f32 = u.dtype, torch.float32
    return selective_scan_fn(
        u, delta.to(it), A.to(f32), B.to(it), C.to(it),
        None if D is None else D.to(f32), None if z is None else z.to(it),
        None if delta_bias is None else delta_bias.to(f32), delta_softplus)


_IMPLS = {"mamba": _mamba_scan, "chunked": chunked_scan, "sequential": sequential_scan}


# --------------------------------------------------------------------------- the custom op


@torch.library.custom_op("serpent::selective_scan", mutates_args=())
def _selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool, backend: str) -> Tensor:
    name = resolve_backend(u.device, backend, u.dtype)
    _USED.add(name)
    with _no_autocast(u.device):
        return _IMPLS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _no_autocast(device: torch.device):
    """The backends choose their own precision; an outer autocast must not recast their ops."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    torch._check(delta.shape == u.shape, lambda: "delta must have u's shape (b, d, l)")
    torch._check(A.dim() == 2 and A.shape[0] == u.shape[1], lambda: "A must be (d, n)")
    return u.new_empty(u.shape)


def _setup_context(ctx, inputs, output):
    *tensors, delta_softplus, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _backward(ctx, grad):
    """Recompute the forward of the same backend under autograd, then back-propagate."""
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[: len(saved)]
    name = resolve_backend(saved[0].device, ctx.backend, saved[0].dtype)
    _USED.add(name)
    with torch.enable_grad(), _no_autocast(saved[0].device):
        leaves = [None if t is None else t.detach().requires_grad_(bool(need))
                  for t, need in zip(saved, needs)]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        y = _IMPLS[name](*leaves, ctx.delta_softplus)
        grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True) if wanted else ())
    return (*(next(grads) if t is not None and t.requires_grad else None for t in leaves),
            None, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   backend: str = "auto") -> Tensor:
    """Selective scan with `selective_scan_fn` semantics (see module docstring); one op node."""
    return torch.ops.serpent.selective_scan(u, delta, A, B, C, D, z, delta_bias,
                                            bool(delta_softplus), backend)
