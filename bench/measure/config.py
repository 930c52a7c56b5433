"""What one efficiency measurement is (`RunConfig`), and the plan of a sweep (`plan_sweep`).

`plan_sweep` holds the defaults and option rules of `bench run`, as a function: the command
line and the benchmark scripts build their sweeps through it, so a script cannot drift from what
a user's `bench run` measures. It raises `UsageError` for what cannot be measured as asked.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

from bench import options
from bench.errors import UsageError
from bench.results import config_key

CPU_DEFAULT_RES = (32,)  # a CPU forward of MambaIR at 64 px takes ~25 s: keep `bench run` short
CUDA_DEFAULT_RES = (256, 512, 1024)


class TimingDefaults(NamedTuple):
    """How long `bench run` times one config (the rule: bench.measure.timing's module doc)."""

    warmup: int  # warm-up calls, at least (more while consecutive calls still differ by >10%)
    iters: int  # timed calls, at least (more while the median's 95% CI is wider than +-1%)
    min_time: float  # timed seconds, at least
    budget: float  # seconds per config (warm-up + timed) within which the counts adapt


# Per device. CUDA: ~2 s per config whatever the model, where 10 warm-up and >= 50 timed calls
# took ~100 s for SwinIR at 1024 px (issue 15); CPU: 1 warm-up and 3 timed calls gave first
# numbers 6x off (a fresh process's first calls are slow), hence warm-up until steady.
TIMING_DEFAULTS = {"cuda": TimingDefaults(3, 10, 0.0, 2.0), "cpu": TimingDefaults(2, 10, 0.0, 2.0)}


@dataclass(frozen=True)
class RunConfig:
    model: str
    task: str = "deblur"
    scale: int = 1
    res: int = 256
    batch: int = 1
    dtype: str = "fp32"
    mode: str = "infer"
    device: str = "cpu"
    measure: tuple[str, ...] = options.MEASURES
    warmup: int = 10
    iters: int = 50
    min_time: float = 0.0
    budget: float = 0.0  # seconds; 0 = exactly `warmup` and `iters` calls (timing.measure)
    compile: bool = False
    channels_last: bool = False
    cuda_graph: bool = False
    overrides: dict = field(default_factory=dict)
    max_call_s: float | None = None  # a first call slower than this: row `skipped` (too slow)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["measure"] = tuple(d.get("measure", options.MEASURES))
        return cls(**d)

    def key(self) -> tuple:
        """Identity for --resume: the public config keys plus what changes the numbers."""
        return config_key(self.to_json())


def check_cuda_graph(cfg: RunConfig) -> None:
    """What `--cuda-graph` cannot measure, as a usage error instead of a wrong number."""
    if not cfg.cuda_graph:
        return
    if not cfg.device.startswith("cuda"):
        raise UsageError("--cuda-graph needs a CUDA device (--device cuda)")
    if cfg.compile:
        raise UsageError("--cuda-graph and --compile exclude each other (torch.compile's "
                         "mode='reduce-overhead' already uses CUDA graphs); pick one")
    if cfg.mode == "train" and cfg.dtype == "fp16":
        raise UsageError("--cuda-graph cannot capture an fp16 training step (GradScaler "
                         "synchronises with the host); use --dtype bf16 or fp32")


def _ints(value, what: str) -> list[int]:
    return options.int_list(value, what) if isinstance(value, str) else [int(v) for v in value]


def _choices(value, choices, what: str) -> list[str]:
    return options.choice_list(value if isinstance(value, str) else ",".join(value), choices, what)


def plan_sweep(*, models: str | Sequence[str] = "all", res: str | Sequence[int] | None = None,
               task: str = "deblur", scale: int | None = None,
               batch: str | Sequence[int] = "1", dtype: str | Sequence[str] = "fp32",
               mode: str = "infer", device: str = "cpu",
               measure: str | Sequence[str] | None = None, warmup: int | None = None,
               iters: int | None = None, min_time: float | None = None,
               budget: float | None = None, compile: bool = False,
               channels_last: bool = False, cuda_graph: bool = False,
               overrides: dict | None = None, max_call_s: float | None = None
               ) -> list[RunConfig]:
    """The configs of one sweep: models x resolutions x batches x modes x dtypes, in that order.

    `device` is a resolved device name ('cpu', 'cuda', 'cuda:N': see options.resolve_device).
    Defaults follow the device: resolutions CUDA_DEFAULT_RES / CPU_DEFAULT_RES, timing
    TIMING_DEFAULTS, and every measure that the device can take (no peak memory on a CPU).
    `budget=0` times exactly `warmup` and `iters` calls (plus `min_time`).
    """
    from bench import registry

    names = registry.resolve_models(models)
    task = _choices(task, options.TASKS, "task")[0]
    scale = options.resolve_scale(task, scale)
    cuda = device.startswith("cuda")
    resolutions = (_ints(res, "--res") if res is not None
                   else list(CUDA_DEFAULT_RES if cuda else CPU_DEFAULT_RES))
    batches = _ints(batch, "--batch")
    dtypes = _choices(dtype, options.PRECISIONS, "dtype")
    if not cuda and "fp16" in dtypes:
        raise UsageError("fp16 autocast is a CUDA measurement; use fp32 or bf16 on the CPU")
    if measure is None:  # peak memory is read from the CUDA allocator: nothing to read on a CPU
        measures = options.MEASURES if cuda else tuple(m for m in options.MEASURES if m != "memory")
    else:
        measures = tuple(_choices(measure, options.MEASURES, "measure"))
        if "memory" in measures and not cuda:
            raise UsageError("--measure memory needs CUDA (peak memory is read from the CUDA "
                             "allocator); drop it or use --device cuda")
    if mode not in (*options.MODES, "both"):
        raise UsageError(f"unknown mode {mode!r}; choose from {', '.join(options.MODES)}, both")
    modes = list(options.MODES) if mode == "both" else [mode]
    for name, value, least in (("--warmup", warmup, 0), ("--iters", iters, 1),
                               ("--min-time", min_time, 0), ("--budget", budget, 0)):
        if value is not None and value < least:
            raise UsageError(f"{name} must be >= {least}, got {value:g}")
    if max_call_s is not None and max_call_s <= 0:
        raise UsageError("--max-call-s must be positive (seconds)")
    on_device = bool({"latency", "memory"} & set(measures))
    if cuda_graph and not on_device:
        raise UsageError("--cuda-graph changes how latency and memory are measured; "
                         "add latency or memory to --measure")
    timing = TIMING_DEFAULTS["cuda" if cuda else "cpu"]
    configs = [
        RunConfig(model=m, task=task, scale=scale, res=r, batch=b, dtype=dt, mode=md,
                  device=device if on_device else "cpu", measure=measures,
                  warmup=timing.warmup if warmup is None else warmup,
                  iters=timing.iters if iters is None else iters,
                  min_time=timing.min_time if min_time is None else min_time,
                  budget=timing.budget if budget is None else budget,
                  compile=compile, channels_last=channels_last, cuda_graph=cuda_graph,
                  overrides=dict(overrides or {}), max_call_s=max_call_s)
        for m in names for r in resolutions for b in batches for md in modes for dt in dtypes
    ]
    for cfg in configs:
        check_cuda_graph(cfg)
    return configs
