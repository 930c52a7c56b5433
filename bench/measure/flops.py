"""FLOPs without activations, by two independent counters.

Both run the model on meta tensors (shapes only, no memory, no arithmetic), so any model at any
resolution is counted on a CPU in seconds.

1. fvcore: fvcore's per-op handles (the formulas the field reports with) applied to the ATen ops
   that the forward dispatches, plus our handles for what fvcore lacks:
   `scaled_dot_product_attention` (seen whole, before it decomposes) and the selective scan
   (`serpent::selective_scan`, VMamba's formula). fvcore's own JIT tracer cannot run on meta
   tensors (PyTorch's Python meta kernels break under tracing), which is why the op stream comes
   from a dispatch mode instead. fvcore counts one multiply-add as one "flop": we report that as
   GMACs and GFLOPs = 2 x GMACs.
2. torch.utils.flop_counter.FlopCounterMode, with formulas registered for the selective scan and
   for CPU SDPA (which it otherwise counts as zero). It counts 2 FLOPs per multiply-add.

Ops that neither handle nor ignore (elementwise arithmetic, activations, softmax, reductions:
fvcore's convention is not to count them) are listed with their call counts in
`unsupported_ops`, never dropped silently. Known, listed differences between the counters:
fvcore counts norms (5 per element with affine, 4 without), bilinear upsampling (4 per output
element), nearest upsampling and adaptive average pooling (1 per element); FlopCounterMode
counts none of these. Everything else (convolutions, matrix products, attention, selective scan)
must agree exactly; tests check it.

All counts are for ONE forward pass of ONE image (batch 1), the convention papers use.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from serpent.flops import FLOP_HANDLES, torch_flops
from serpent.scan import selective_scan_macs

with warnings.catch_warnings():  # fvcore imports torch.jit.script, deprecated in recent torch
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn.jit_handles import conv_flop_count

# Ops that move or create data without arithmetic (fvcore's ignore list, at the ATen level).
_NO_ARITHMETIC = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::permute", "aten::transpose",
    "aten::t", "aten::expand", "aten::clone", "aten::contiguous", "aten::slice", "aten::select",
    "aten::cat", "aten::stack", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::unbind", "aten::squeeze", "aten::unsqueeze", "aten::flatten", "aten::unflatten",
    "aten::copy_", "aten::_to_copy", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::zeros", "aten::zeros_like", "aten::ones", "aten::ones_like", "aten::full",
    "aten::full_like", "aten::new_zeros", "aten::new_empty", "aten::new_full", "aten::arange",
    "aten::index", "aten::index_select", "aten::gather", "aten::roll", "aten::flip",
    "aten::constant_pad_nd", "aten::reflection_pad2d", "aten::replicate_pad2d",
    "aten::replication_pad2d", "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::detach",
    "aten::alias", "aten::lift_fresh", "aten::as_strided", "aten::fill_", "aten::zero_",
    "aten::masked_fill", "aten::_reshape_alias", "aten::narrow", "aten::repeat",
    "aten::im2col", "aten::col2im", "aten::eq", "aten::ne", "aten::lt", "aten::gt", "aten::le",
    "aten::ge", "aten::where", "aten::index_put_", "aten::index_put", "aten::slice_scatter",
    "aten::select_scatter", "aten::diagonal", "aten::tril", "aten::triu", "aten::_assert_async",
    "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::item", "aten::_local_scalar_dense",
}


def _shape(t) -> list[int]:
    return list(t.shape)


def _conv_macs(args, out) -> int:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    # fvcore's formula: output elements x (input channels per group x kernel volume).
    return conv_flop_count(_shape(x), _shape(w), _shape(out), transposed=transposed)


def _matmul_macs(a, b) -> int:
    """(..., n, k) @ (..., k, m): n*k*m per batch element."""
    return math.prod(_shape(a)) * _shape(b)[-1]


def _sdpa_macs(q, k, v) -> int:
    """QK^T and attention @ V: B*H*Lq*Lk*(E + Ev). The mask add and softmax are elementwise."""
    *batch, lq, e = _shape(q)
    lk, ev = _shape(k)[-2], _shape(v)[-1]
    return math.prod(batch) * lq * lk * (e + ev)


def _scan_macs(args) -> int:
    u, A = args[0], args[2]
    b, d, l = _shape(u)
    n = _shape(A)[-1]
    D, z = args[5] if len(args) > 5 else None, args[6] if len(args) > 6 else None
    return selective_scan_macs(b, d, l, n, D is not None, z is not None)


def _norm_macs(x, affine: bool) -> int:
    return math.prod(_shape(x)) * (5 if affine else 4)  # fvcore's norm_flop_counter


def _aten_macs(name: str, args, out):
    """MACs of one ATen op by fvcore's handles (plus ours); None if unhandled."""
    if name == "aten::convolution" or name == "aten::_convolution":
        return "conv", _conv_macs(args, out)
    if name in ("aten::mm", "aten::bmm"):
        return "matmul", _matmul_macs(args[0], args[1])
    if name in ("aten::addmm", "aten::baddbmm", "aten::addbmm"):
        return "matmul", _matmul_macs(args[1], args[2])
    if name == "aten::native_layer_norm":
        return "norm", _norm_macs(args[0], args[2] is not None)
    if name == "aten::native_group_norm":
        return "norm", _norm_macs(args[0], args[1] is not None)
    if name in ("aten::native_batch_norm", "aten::_native_batch_norm_legit",
                "aten::_native_batch_norm_legit_no_training"):
        return "norm", _norm_macs(args[0], args[1] is not None)
    if name == "aten::upsample_bilinear2d":
        return "upsample", math.prod(_shape(out)) * 4
    if name == "aten::upsample_nearest2d":
        return "upsample", math.prod(_shape(out))
    if name in ("aten::_adaptive_avg_pool2d", "aten::adaptive_avg_pool2d"):
        return "pool", math.prod(_shape(args[0]))
    if name == "serpent::selective_scan":
        return "selective_scan", _scan_macs(args)
    return None


class _OpRecorder(TorchDispatchMode):
    """Counts MACs per category and unhandled ops while the forward runs."""

    def __init__(self):
        super().__init__()
        self.macs: Counter = Counter()
        self.unsupported: Counter = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = func._schema.name
        if name in FLOP_HANDLES:  # Serpent's fused ops: several categories per call
            for category, macs in FLOP_HANDLES[name](args).items():
                self.macs[category] += macs
            return out
        handled = _aten_macs(name, args, out[0] if isinstance(out, (tuple, list)) else out)
        if handled is not None:
            self.macs[handled[0]] += handled[1]
        elif name not in _NO_ARITHMETIC:
            self.unsupported[name] += 1
        return out


class _SdpaAsOneOp(TorchFunctionMode):
    """Sees scaled_dot_product_attention whole (it decomposes before dispatch on some devices)."""

    def __init__(self, recorder: _OpRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.recorder.macs["sdpa"] += _sdpa_macs(*args[:3]) if len(args) >= 3 else \
                _sdpa_macs(kwargs.get("query", args[0] if args else None), kwargs["key"], kwargs["value"])
            self.recorder.paused += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.recorder.paused -= 1
        return func(*args, **kwargs)


# ---- FlopCounterMode formulas for what it does not count (2 FLOPs per MAC, its convention) ----

def _register_torch_formulas() -> None:
    @register_flop_formula(torch.ops.serpent.selective_scan)
    def _scan_flops(u_shape, delta_shape, A_shape, *rest, out_shape=None, **kw):
        b, d, l = u_shape
        D_shape = rest[2] if len(rest) > 2 else kw.get("D")
        z_shape = rest[3] if len(rest) > 3 else kw.get("z")
        return 2 * selective_scan_macs(b, d, l, A_shape[-1], D_shape is not None, z_shape is not None)

    for name in FLOP_HANDLES:  # raw arguments: the handles read shapes of tensors and lists
        register_flop_formula(getattr(torch.ops.serpent, name.split("::")[1]), get_raw=True)(
            lambda *args, out_val=None, _name=name, **kwargs: torch_flops(_name, args))

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *rest, out_shape=None, **kw):
        *batch, lq, e = q_shape
        return 2 * math.prod(batch) * lq * k_shape[-2] * (e + v_shape[-1])


_register_torch_formulas()


@dataclass
class FlopCount:
    """GFLOPs (2 per multiply-add) and GMACs of one forward of one image, by two counters."""

    gmacs: float
    gflops: float
    gflops_torch: float
    by_category_gmacs: dict = field(default_factory=dict)
    unsupported_ops: dict = field(default_factory=dict)
    # categories fvcore counts and FlopCounterMode does not (see module docstring)
    fvcore_only_gmacs: float = 0.0

    def as_row(self) -> dict:
        return {"gflops": self.gflops, "gmacs": self.gmacs, "gflops_torch": self.gflops_torch,
                "flops_by_op_gmacs": self.by_category_gmacs,
                "unsupported_ops": self.unsupported_ops,
                "flops_convention": "1 MAC = 2 FLOPs; forward, batch 1; meta tensors"}


_FVCORE_ONLY = ("norm", "upsample", "pool")


def count_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> FlopCount:
    """Count one forward of `model` on an input of `input_shape` (batch forced to 1).

    The model is moved to the meta device for counting: pass a model you no longer need, or a
    copy (its parameters are replaced by meta tensors).
    """
    shape = (1, *input_shape[1:])
    model = model.to("meta").eval()
    x = torch.empty(shape, device="meta")
    recorder = _OpRecorder()
    with torch.no_grad(), _SdpaAsOneOp(recorder), recorder:
        model(x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    macs = sum(recorder.macs.values())
    return FlopCount(
        gmacs=macs / 1e9,
        gflops=2 * macs / 1e9,
        gflops_torch=counter.get_total_flops() / 1e9,
        by_category_gmacs={k: v / 1e9 for k, v in sorted(recorder.macs.items())},
        unsupported_ops=dict(sorted(recorder.unsupported.items())),
        fvcore_only_gmacs=sum(recorder.macs[c] for c in _FVCORE_ONLY) / 1e9,
    )
