"""How far each model reaches on one card: every model swept up in resolution (2048, 4096, 8192
by default) per setting (dtype x mode) until it runs out of memory, fails, or one call takes
longer than --max-call-s; each config in a fresh process, rows appended as they come.

    python -m benchmarks.large_images --out results/large.jsonl [--models ...] [--deadline-s 500]

Re-entrant: configs already in --out are not measured again, and a model whose setting already
failed at a smaller size is not tried larger. Few timed calls (these are seconds-long calls on
a GPU-bound workload: the spread is small), reported like any other row; `bench report` turns
the rows into the "largest image per model" table and figure.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="serpent_t,serpent_s,serpent_b,nafnet_w32,nafnet_w64,"
                                        "restormer,swinir,mambair")
    ap.add_argument("--res", default="2048,4096,8192")
    ap.add_argument("--settings", default="bf16:infer,fp32:infer,bf16:train",
                    help="dtype:mode pairs, in order")
    ap.add_argument("--max-call-s", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=240.0, help="per config, seconds")
    ap.add_argument("--deadline-s", type=float, default=None, help="stop starting configs after")
    args = ap.parse_args(argv)

    from bench.measure.config import plan_sweep
    from bench.measure.sweep import done_keys, run_isolated
    from bench.options import int_list, resolve_device, split_names
    from bench.results import append_rows, read_rows

    t0 = time.perf_counter()
    device = resolve_device("auto")
    done = done_keys(args.out)
    failed = {(r["model"], r["dtype"], r["mode"]) for r in read_rows(args.out)
              if r.get("status") not in ("ok", None)} if done else set()
    for model in split_names(args.models):
        for setting in split_names(args.settings):
            dtype, mode = setting.split(":")
            for res in int_list(args.res, "--res"):
                if (model, dtype, mode) in failed:
                    break
                if args.deadline_s and time.perf_counter() - t0 > args.deadline_s:
                    print(f"deadline reached after {time.perf_counter() - t0:.0f} s", flush=True)
                    return 0
                cfg, = plan_sweep(models=[model], res=[res], dtype=dtype, mode=mode,
                                  device=device, warmup=1, iters=3, min_time=0.0,
                                  max_call_s=args.max_call_s)
                if cfg.key() in done:
                    continue
                row = run_isolated(cfg, args.timeout)
                append_rows(args.out, [row])
                print(f"{model:>11} {setting:>10} {res:>5}: {row['status']:>7} "
                      f"{row.get('latency_ms_median') or '':>10} ms "
                      f"{(row.get('mem_peak_alloc_mb') or 0) / 1024:6.1f} GiB "
                      f"{(row.get('message') or '')[:80]}", flush=True)
                if row["status"] != "ok":
                    failed.add((model, dtype, mode))
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
