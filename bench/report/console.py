"""The table `bench run` prints: one line per row, units in the headers."""
from __future__ import annotations


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _status(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {(r.get('message') or '')[:40]}"
    return "ok, noisy" if r.get("noisy") else "ok"


def _timer(rows: list[dict]) -> str:
    """How the latencies in `rows` were timed (CUDA events on a GPU, perf_counter on a CPU)."""
    timed = [r for r in rows if r.get("latency_ms_median") is not None]
    cpu = any(str(r.get("device_name") or "").startswith("cpu") for r in timed)
    gpu = any(not str(r.get("device_name") or "cpu").startswith("cpu") for r in timed)
    how = [t for t, on in (("CUDA events on the GPU", gpu), ("time.perf_counter on the CPU", cpu))
           if on]
    return f" ({', '.join(how)})" if how else ""


def run_table(rows: list[dict]) -> str:
    from tabulate import tabulate

    headers = ["model", "task", "res", "batch", "dtype", "mode", "params (M)", "GFLOPs",
               "GFLOPs (torch)", "median (ms)", "IQR (ms)", "img/s", "peak alloc (MB)",
               "static (MB)", "scan", "status"]
    body = []
    for r in rows:
        params = r.get("params")
        body.append([
            r["model"], r["task"] + (f"x{r['scale']}" if r["task"] == "sr" else ""), r["res"],
            r["batch"], r["dtype"], r["mode"], _fmt(params / 1e6 if params else None, ".3f"),
            _fmt(r.get("gflops"), ".2f"), _fmt(r.get("gflops_torch"), ".2f"),
            _fmt(r.get("latency_ms_median"), ".3f"), _fmt(r.get("latency_ms_iqr"), ".3f"),
            _fmt(r.get("throughput_img_s"), ".2f"), _fmt(r.get("mem_peak_alloc_mb"), ".1f"),
            _fmt(r.get("mem_static_mb"), ".1f"), r.get("scan_backend") or "", _status(r),
        ])
    devices = sorted({r.get("device_name") or "?" for r in rows})
    note = ("GFLOPs: one forward of one image, 1 MAC = 2 FLOPs (fvcore handles; torch = "
            f"FlopCounterMode). Latency: median of timed calls{_timer(rows)}. "
            "Device: " + "; ".join(devices))
    if any(r.get("noisy") for r in rows):
        note += ("\nnoisy: IQR above 10% of the median, the median is not to be trusted; rerun "
                 "on a quiet machine or raise --budget")
    return tabulate(body, headers=headers, disable_numparse=True) + "\n" + note
