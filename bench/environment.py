"""Where a number came from: every results row carries this."""
from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                              cwd=_REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool]:
    """(commit, dirty). BENCH_GIT_COMMIT overrides where the tree travels without .git."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"], os.environ.get("BENCH_GIT_DIRTY", "0") == "1"
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"]) or "unknown"
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    return commit, dirty


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def driver_version() -> str:
    """The NVIDIA driver version ('' without one), from nvidia-smi: a subprocess, not CUDA, so
    a fork server may look it up before forking (it costs ~0.1 s per call)."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else ""


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = driver_version()
        physical = os.environ.get("BENCH_PHYSICAL_GPU")  # set by a sharded sweep's parent
        return {"device_name": props.name, "device_mem_mb": props.total_memory / 2**20,
                "driver": driver or None, "sm": f"{props.major}.{props.minor}",
                "gpu_index": int(physical) if physical else (device.index or 0),
                "gpu_uuid": str(getattr(props, "uuid", "")) or None}
    return {"device_name": f"cpu: {_cpu_name()}", "device_mem_mb": None, "driver": None,
            "threads": torch.get_num_threads()}


def environment(device: torch.device | str = "cpu") -> dict:
    """Software, hardware and numeric settings; cheap enough to call per row."""
    device = torch.device(device)
    commit, dirty = git_state()
    env = {
        **device_info(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mamba_ssm": _version("mamba-ssm") or _version("mamba_ssm"),
        "python": platform.python_version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "git_commit": commit + ("+dirty" if dirty else ""),
        "host": socket.gethostname(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return env
