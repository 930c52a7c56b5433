"""Where a forward pass spends its operations: per-op-class device time (profiler) and, on any
device, a count of ATen ops, copies and bytes moved (dispatch mode).

Classes: conv, matmul, norm, attention, elementwise, copy. An op is classed by what it is first
(convolutions, matrix products, copies and layout changes, softmax), else by the module it runs
in: everything else inside a channel norm is "norm", inside an attention module "attention"
(the convolutions and matrix products in there stay conv / matmul), the rest "elementwise".
Backward ops inherit the module of the forward op they differentiate (autograd sequence
numbers), so the official Restormer norm's backward counts as norm too.

    python -m benchmarks.op_census            # CPU: ops / copies / MB per forward, each formulation
"""
from __future__ import annotations

import argparse
import contextlib
import os
from collections import Counter, defaultdict

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

CLASSES = ("conv", "matmul", "norm", "attention", "elementwise", "copy")
SCOPE_PREFIX = "scope::"

_CONV = ("conv", "cudnn_convolution", "depthwise")
_MATMUL = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear",
           "aten::addbmm", "aten::_addmm_activation"}
_COPY = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to",
         "aten::cat", "aten::stack", "aten::pixel_shuffle", "aten::pixel_unshuffle",
         "aten::constant_pad_nd", "aten::reflection_pad2d", "aten::index_select", "aten::index",
         "aten::flip"}
_ATTENTION = ("softmax", "scaled_dot_product", "flash_attention", "efficient_attention")


def op_class(name: str, scope: str | None) -> str:
    """Class of ATen op `name` run inside module scope `scope` ("norm", "attention" or None)."""
    if any(k in name for k in _CONV):
        return "conv"
    if name in _MATMUL:
        return "matmul"
    if name in _COPY:
        return "copy"
    if any(k in name for k in _ATTENTION):
        return "attention"
    if scope in ("norm", "attention"):
        return scope
    return "elementwise"


def module_scope(module: nn.Module) -> str | None:
    """The census scope of a module: channel norms and attention modules; None otherwise."""
    name = type(module).__name__
    if name in ("LayerNorm", "LayerNorm2d"):
        return "norm"
    if name in ("Attention", "WindowAttention", "SS2D"):
        return "attention"
    return None


@contextlib.contextmanager
def scoped(model: nn.Module):
    """Mark every norm / attention forward with a profiler range named `scope::<class>`."""
    handles = []

    def pre(module, args):
        rf = torch.profiler.record_function(SCOPE_PREFIX + module._census_scope)
        rf.__enter__()
        module._census_ranges.append(rf)

    def post(module, args, out):
        module._census_ranges.pop().__exit__(None, None, None)

    for m in model.modules():
        scope = module_scope(m)
        if scope:
            m._census_scope, m._census_ranges = scope, []
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _device_us(evt) -> float:
    t = getattr(evt, "self_device_time_total", 0.0) or 0.0
    return t if t > 0 else 0.0


def class_breakdown(events, calls: int = 1, use_cpu_time: bool = False) -> dict:
    """Per-class self time (ms per call) and top ops from a profiler's `events()`.

    Device time of the kernels each op launched (CPU time with `use_cpu_time`, for CPU runs);
    `kernels_per_call` counts device kernels.
    """
    seq_scope: dict[int, str] = {}
    for e in events:  # forward ops: the scope they ran in, by autograd sequence number
        s = _scope_of(e, seq_scope=None)
        if s and getattr(e, "sequence_nr", -1) >= 0:
            seq_scope.setdefault(e.sequence_nr, s)
    per_class = Counter()
    per_op = defaultdict(lambda: [0.0, 0, ""])
    kernels = 0
    for e in events:
        if _is_kernel(e):
            kernels += 1
            continue
        t = e.self_cpu_time_total if use_cpu_time else _device_us(e)
        if t <= 0 or e.name.startswith(SCOPE_PREFIX):
            if e.name.startswith(SCOPE_PREFIX) and t > 0:  # kernels launched right in a scope
                per_class[e.name[len(SCOPE_PREFIX):]] += t
            continue
        cls = op_class(e.name, _scope_of(e, seq_scope))
        per_class[cls] += t
        entry = per_op[e.name]
        entry[0] += t
        entry[1] += 1
        entry[2] = cls
    ms = {c: per_class.get(c, 0.0) / 1e3 / calls for c in CLASSES}
    top = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:20]
    return {"class_ms": ms, "total_ms": sum(ms.values()),
            "kernels_per_call": kernels / calls,
            "top_ops": [{"op": k, "class": v[2], "ms": v[0] / 1e3 / calls, "calls": v[1] / calls}
                        for k, v in top]}


def _is_kernel(e) -> bool:
    kind = getattr(e, "device_type", None)
    return kind is not None and str(kind).endswith(("CUDA", "PrivateUse1"))


def _scope_of(e, seq_scope: dict[int, str] | None) -> str | None:
    p = e
    while p is not None:
        if p.name.startswith(SCOPE_PREFIX):
            return p.name[len(SCOPE_PREFIX):]
        if seq_scope is not None and p.name.startswith("autograd::engine::evaluate_function"):
            return seq_scope.get(getattr(p, "sequence_nr", -1))
        p = p.cpu_parent
    return None


# --------------------------------------------------------------------------- dispatch census

_VIEWS = {"aten::view", "aten::_unsafe_view", "aten::permute", "aten::transpose", "aten::t",
          "aten::expand", "aten::slice", "aten::select", "aten::split", "aten::split_with_sizes",
          "aten::chunk", "aten::unbind", "aten::squeeze", "aten::unsqueeze", "aten::alias",
          "aten::as_strided", "aten::detach", "aten::unflatten", "aten::_reshape_alias",
          "aten::diagonal", "aten::lift_fresh", "aten::empty", "aten::empty_like",
          "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided", "aten::sym_size",
          "aten::sym_stride", "aten::sym_numel", "aten::is_same_size",
          "aten::_record_function_enter_new", "aten::_record_function_exit"}


class OpCensus(TorchDispatchMode):
    """Counts compute ops, copies (explicit, plus the ones kernels make inside themselves:
    `native_layer_norm` of a non-contiguous input, a convolution whose input is not in the
    memory format the weights ask for) and the bytes each op reads and writes."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.copies = 0
        self.implicit_copies = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = f"aten::{func.__name__.split('.')[0]}"
        if name in _VIEWS:
            return out
        self.ops[name] += 1
        tensors = [t for t in _flat(args) + _flat(out) if isinstance(t, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        if name in _COPY:
            self.copies += 1
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "aten::native_layer_norm" and x is not None and not x.is_contiguous():
            self.implicit_copies += 1
            self.bytes += 2 * x.numel() * x.element_size()
        if name == "aten::convolution" and x is not None and _needs_layout_copy(x, args[1]):
            self.implicit_copies += 1
            self.bytes += 2 * x.numel() * x.element_size()
        return out

    def observe_launch(self, name: str, tensors) -> None:
        """A Triton kernel launch (baselines.channel_norm.LAUNCH_OBSERVERS): one op."""
        self.ops[name] += 1
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)

    def summary(self, calls: int = 1) -> dict:
        return {"ops": sum(self.ops.values()) / calls,
                "copies": (self.copies + self.implicit_copies) / calls,
                "implicit_copies": self.implicit_copies / calls,
                "mb_moved": self.bytes / 2**20 / calls,
                "by_op": {k: v / calls for k, v in self.ops.most_common()}}


def _needs_layout_copy(x: torch.Tensor, w: torch.Tensor) -> bool:
    cl = torch.channels_last
    wants_cl = x.is_contiguous(memory_format=cl) or w.is_contiguous(memory_format=cl)
    wants_cl = wants_cl and not (x.is_contiguous() and w.is_contiguous())
    return not x.is_contiguous(memory_format=cl if wants_cl else torch.contiguous_format)


def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flat(item)]
    return [x]


def census(model: nn.Module, x: torch.Tensor) -> dict:
    """OpCensus of one inference forward of `model` on `x` (Triton launches included)."""
    from baselines.channel_norm import LAUNCH_OBSERVERS

    mode = OpCensus()
    LAUNCH_OBSERVERS.append(mode.observe_launch)
    try:
        with torch.no_grad(), mode:  # not inference_mode: it hands the mode undecomposed ops
            model(x)
    finally:
        LAUNCH_OBSERVERS.remove(mode.observe_launch)
    return mode.summary()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--res", type=int, default=64)
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (baselines)
    torch.set_num_threads(1)
    from baselines import channel_norm, nafnet, restormer

    channel_norm.INTERPRET_ON_CPU = True  # count the Triton formulations' own launches

    models = {"restormer": (restormer.restormer, {}, restormer.FORMULATIONS),
              "nafnet_w64": (nafnet.nafnet, {"width": 64}, nafnet.FORMULATIONS)}
    print(f"One inference forward at {args.res}x{args.res}, float32, CPU (TRITON_INTERPRET="
          f"{os.environ['TRITON_INTERPRET']}); copies include the ones kernels make themselves.")
    print("| model | formulation | ATen ops | copies (implicit) | MB read+written |")
    print("|---|---|---:|---:|---:|")
    for name, (build, kw, forms) in models.items():
        torch.manual_seed(0)
        model = build(task="deblur", scale=1, **kw).eval()
        x = torch.rand(1, 3, args.res, args.res)
        for form in forms:
            model.set_formulation(form)
            s = census(model, x)
            print(f"| {name} | {form} | {s['ops']:.0f} | {s['copies']:.0f} "
                  f"({s['implicit_copies']:.0f}) | {s['mb_moved']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
