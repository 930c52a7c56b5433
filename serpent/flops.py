"""FLOP handles of Serpent's fused custom ops, for the harness's counters (bench/measure/flops.py).

Each handle maps the op's arguments (tensors, meta tensors or anything with .shape) to the
multiply-adds per category that the counters count for the unfused layers it replaces, so a
model counts the same whichever path it takes. FlopCounterMode's convention leaves out the
categories only fvcore counts (FVCORE_ONLY), at 2 FLOPs per multiply-add.
"""
from __future__ import annotations

from serpent.fused import mssm_core_op_macs
from serpent.fused_linear import fused_linear_macs

FLOP_HANDLES = {"serpent::mssm_core": mssm_core_op_macs,
                "serpent::fused_linear": fused_linear_macs}
FVCORE_ONLY = ("norm", "upsample", "pool")


def torch_flops(name: str, args) -> int:
    """FLOPs of one call as FlopCounterMode counts (2 per multiply-add, fvcore-only left out)."""
    return 2 * sum(v for k, v in FLOP_HANDLES[name](args).items() if k not in FVCORE_ONLY)
