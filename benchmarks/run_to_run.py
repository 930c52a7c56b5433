"""Do two runs of the same sweep agree? Median latency of every config both measured (issue 2).

    python -m benchmarks.run_to_run FIRST.jsonl SECOND.jsonl [--out agreement.jsonl]

Joins ok rows on their configuration (bench.results.config_key) and card, and reports the
relative change of the median latency, whether it is within --tolerance (default 2%), and
the GPU work per call against the host's pace where both are known (`cuda_graph` rows of the
same config, when FIRST is an eager sweep and a graph sweep is given with --graph): a config
whose eager latency is several times its graph replay is launch-bound, and its eager timing
follows the host. Exit 1 if any config disagrees by more than the tolerance.
"""
from __future__ import annotations

import argparse
import sys

from tabulate import tabulate

from bench.results import append_rows, config_key, read_rows


def _ok_rows(path: str, **as_if) -> dict:
    """ok rows with a latency, keyed by (config, card); `as_if` overrides fields of the key only
    (cuda_graph=False: a graph row under the key of its eager twin)."""
    rows = {}
    for r in read_rows(path):
        if r.get("kind") == "efficiency" and r.get("status") == "ok" and r.get("latency_ms_median"):
            rows[(config_key({**r, **as_if}), r.get("device_name"))] = r
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--graph", help="a --cuda-graph sweep of the same configs (for context)")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--out", help="append one summary row per config here")
    args = ap.parse_args(argv)
    a, b = _ok_rows(args.first), _ok_rows(args.second)
    graph = _ok_rows(args.graph, cuda_graph=False) if args.graph else {}
    rows, table = [], []
    for key in sorted(set(a) & set(b), key=lambda k: (k[0][0], k[0][3], str(k))):
        ra, rb = a[key], b[key]
        change = rb["latency_ms_median"] / ra["latency_ms_median"] - 1
        g = graph.get(key)
        host_bound = ra["latency_ms_median"] / g["latency_ms_median"] if g else None
        rows.append({"kind": "run_to_run", "model": ra["model"], "res": ra["res"],
                     "dtype": ra["dtype"], "mode": ra["mode"], "cuda_graph": bool(ra.get("cuda_graph")),
                     "first_ms": ra["latency_ms_median"], "second_ms": rb["latency_ms_median"],
                     "rel_change": change, "within_tolerance": abs(change) <= args.tolerance,
                     "tolerance": args.tolerance, "eager_over_graph": host_bound,
                     "device_name": ra["device_name"], "first": args.first, "second": args.second})
        table.append([ra["model"], ra["res"], ra["dtype"], ra["mode"], f"{ra['latency_ms_median']:.2f}",
                      f"{rb['latency_ms_median']:.2f}", f"{change:+.2%}",
                      "yes" if abs(change) <= args.tolerance else "NO",
                      f"{host_bound:.1f}x" if host_bound else ""])
    print(tabulate(table, headers=["model", "res", "dtype", "mode", "first ms", "second ms",
                                   "change", f"within {args.tolerance:.0%}",
                                   "eager / graph" if graph else ""]))
    agree = sum(r["within_tolerance"] for r in rows)
    only = len(set(a) ^ set(b))
    print(f"{agree} of {len(rows)} configs within {args.tolerance:.0%}"
          + (f"; {only} config(s) measured in one run only (not compared)" if only else ""))
    if args.out:
        append_rows(args.out, rows)
    return 0 if rows and agree == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
