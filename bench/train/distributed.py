"""torchrun support for `bench train`: the process-group view, its setup and the few collectives
the training loop needs.

Why these pieces:
- `Dist.from_env` reads what torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK), so `torchrun -m
  bench train`, `torchrun $(which bench) train` and a plain `bench train` share one code path.
- Each rank drives cuda:LOCAL_RANK (NCCL) or the CPU (gloo); NCCL's NVLink multicast (NVLS) is
  kept off by default: it reserves extra memory and has hung on some hosts.
- `process_group` destroys the group on the way out, errors included, but only a group it
  created itself (a caller that set one up keeps it).
- The helpers are no-ops in a single process, so the loop has no `if world > 1` branches.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as td

from bench.errors import UsageError
from bench.options import torchrun_ranks


@dataclass(frozen=True)
class Dist:
    """Process-group view: rank-aware logging, checkpointing and data slicing."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        return cls(*torchrun_ranks())

    def check_batch(self, global_batch: int) -> None:
        """--batch is the global batch: every rank takes an equal slice of it."""
        if global_batch % self.world:
            raise UsageError(f"--batch {global_batch} (the global batch) is not divisible by the "
                             f"{self.world} processes; use a multiple of {self.world}")

    def device(self, requested: str) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK under torchrun on GPUs, else `requested`."""
        device = torch.device(requested)
        if self.world == 1 or device.type != "cuda":
            return device
        if device.index is not None:
            raise UsageError(f"--device {requested}: under torchrun each process uses "
                             "cuda:LOCAL_RANK; pass --device cuda (or auto)")
        count = torch.cuda.device_count()
        if count == 1:  # a launcher that shows each process only its own GPU
            return torch.device("cuda", 0)
        if self.local_rank >= count:
            raise UsageError(f"LOCAL_RANK {self.local_rank} but this node has {count} GPUs; "
                             f"start at most {count} processes per node (--nproc_per_node)")
        return torch.device("cuda", self.local_rank)


@contextlib.contextmanager
def process_group(dist: Dist, device: torch.device):
    """Join the torchrun process group for the duration of the block (nothing in one process)."""
    if dist.world == 1 or td.is_initialized():
        yield
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={dist.world} but {' and '.join(missing)} not set: start "
                         "the processes with torchrun")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if device.type == "cuda":
        import inspect

        torch.cuda.set_device(device)
        bind = ({"device_id": device}  # torch >= 2.3: communicators bound to this GPU up front
                if "device_id" in inspect.signature(td.init_process_group).parameters else {})
        td.init_process_group("nccl", **bind)
    else:
        td.init_process_group("gloo")
    try:
        yield
    finally:
        td.destroy_process_group()


def active(dist: Dist) -> bool:
    return dist.world > 1 and td.is_initialized()


def barrier(dist: Dist) -> None:
    if active(dist):
        td.barrier()


def all_reduce_sum(values: list[float], dist: Dist, device: torch.device,
                   dtype=torch.float64) -> list[float]:
    """Element-wise sum over ranks of a few numbers (one collective, one host sync)."""
    t = torch.tensor(values, dtype=dtype, device=device)
    if active(dist):
        td.all_reduce(t)
    return t.tolist()


def broadcast_floats(values: list[float], dist: Dist, device: torch.device,
                     src: int = 0) -> list[float]:
    """Rank `src`'s numbers on every rank (one collective): decisions taken from one clock,
    such as the end of a time budget, must be the same on all ranks or DDP would hang."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if active(dist):
        td.broadcast(t, src)
    return t.tolist()


def step_check(loss: torch.Tensor, norm: torch.Tensor | None, dist: Dist) -> tuple[float, bool]:
    """(global mean loss, any rank's gradient norm non-finite), agreed by every rank.

    One all-reduce of [loss, flag] per step; a non-finite loss on any rank makes the global
    mean non-finite, so all ranks stop at the same iteration.
    """
    bad = torch.zeros((), device=loss.device) if norm is None else (~torch.isfinite(norm)).float()
    t = torch.stack([loss.detach().float(), bad])
    if active(dist):
        td.all_reduce(t)
    total, flags = t.tolist()
    return total / dist.world, flags > 0


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` (the module itself in one process).

    Buffers are synced once at construction, not every forward: the registered models hold only
    constant buffers (no batch-norm statistics), identical on every rank from the seeded init.
    Gradients are views into the all-reduce buckets: no copy kernel per parameter each step
    (these models' steps are bound by kernel launches at small per-GPU batches).
    """
    if not active(dist):
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # Depthwise-conv weights (C, 1, k, k) get gradients whose stride on the size-1 axis differs
    # from the parameter's; DDP then copies them into the bucket (correct, a little slower) and
    # warns on every rank. Nothing for the user to do about it.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    no_sync = ({"forward_sync_buffers": False}  # newer torch; broadcast_buffers is deprecated
               if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None,
               gradient_as_bucket_view=True, **no_sync)


def gather(obj, dist: Dist) -> list:
    """`obj` of every rank, in rank order (a list of one in a single process)."""
    if not active(dist):
        return [obj]
    out = [None] * dist.world
    td.all_gather_object(out, obj)
    return out


def describe(device: torch.device) -> str:
    """host/device/card name of this rank, for the run's record."""
    import socket

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{socket.gethostname()}/{device}/{name}"


def rank_seed(seed: int, rank: int, iteration: int) -> int:
    """Seed of rank>0's global RNG (dropout, drop path): distinct per rank and resume point."""
    from bench.quality.data import _splitmix64

    return _splitmix64(_splitmix64(seed) ^ (rank << 32) ^ iteration)
