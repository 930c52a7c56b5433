"""Markdown summary of `benchmarks.baseline_formulations` rows: each formulation against the
official one, per config (ms and MB, ratio), the recommended default per model, the checks,
the large-image diagnosis and the per-op-class profiles.

    python -m benchmarks.formulation_report DIR/rows.jsonl [MORE.jsonl ...] [--out FILE.md]

A ratio is formulation / official median latency; "ok" where it is at most 1.02 (issue 13's
acceptance: no slower than the official formulation within 2%). The recommended default of a
model is the formulation with the lowest geometric-mean ratio over the configs that every
candidate measured, among formulations that passed the checks and cover all of them.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

# models that share one DEFAULT_FORMULATION constant
FAMILIES = {"restormer": ("restormer",), "nafnet": ("nafnet_w32", "nafnet_w64")}
TOLERANCE = 1.02


def load_rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows


def latest(rows: list[dict], kind: str) -> dict[str, dict]:
    """Rows of `kind` by key: the last one written, but a measured row is never replaced by a
    row that measured nothing (a skip in a later run over the same config)."""
    out = {}
    for r in rows:
        if r.get("kind") != kind:
            continue
        old = out.get(r["key"])
        if old is None or r.get("status") == "ok" or old.get("status") != "ok":
            out[r["key"]] = r
    return out


def _timings(rows) -> dict[tuple, dict]:
    """(model, res, dtype, mode) -> formulation -> ok timing row."""
    table: dict[tuple, dict] = defaultdict(dict)
    for r in latest(rows, "timing").values():
        if r.get("status") == "ok":
            table[(r["model"], r["res"], r["dtype"], r["mode"])][r["formulation"]] = r
    return table


def _failed(rows) -> set[tuple[str, str]]:
    return {(r["model"], r.get("formulation")) for r in latest(rows, "check").values()
            if r.get("formulation") and not r.get("passed")}


def _cell(r: dict | None, ref: dict | None) -> str:
    if r is None:
        return "-"
    ms, mb = r["latency_ms_median"], r.get("mem_peak_alloc_mb")
    text = f"{ms:.1f} ({mb:.0f} MB)" if mb is not None else f"{ms:.1f}"
    if ref is not None and r is not ref:
        ratio = ms / ref["latency_ms_median"]
        text += f" x{ratio:.3f} {'ok' if ratio <= TOLERANCE else 'SLOWER'}"
    return text


def timing_tables(rows) -> str:
    table = _timings(rows)
    out = []
    for model in sorted({k[0] for k in table}):
        keys = sorted((k for k in table if k[0] == model),
                      key=lambda k: (k[1], k[3], k[2]))
        forms = sorted({f for k in keys for f in table[k]},
                       key=lambda f: (f not in ("official", "ours"), f))
        out.append(f"### {model}\n")
        out.append("ms median of the timed calls (peak MB after warm-up); xR = ms / official ms\n")
        out.append("| res | mode | dtype | " + " | ".join(forms) + " |")
        out.append("|---|---|---|" + "---|" * len(forms))
        for k in keys:
            ref = table[k].get("official")
            out.append(f"| {k[1]} | {k[3]} | {k[2]} | "
                       + " | ".join(_cell(table[k].get(f), ref) for f in forms) + " |")
        out.append("")
    return "\n".join(out)


def recommend(rows) -> dict[str, dict]:
    """Per model family: the fastest formulation (geometric mean of ms / official ms over the
    configs every full-coverage candidate measured)."""
    table = _timings(rows)
    failed = _failed(rows)
    result = {}
    for family, models in FAMILIES.items():
        configs = [k for k in table if k[0] in models and "official" in table[k]]
        if not configs:
            continue
        forms = {f for k in configs for f in table[k]}
        full = sorted(f for f in forms if all(f in table[k] for k in configs)
                      and not any((m, f) in failed for m in models))
        scores = {}
        for f in full:
            ratios = [table[k][f]["latency_ms_median"] / table[k]["official"]["latency_ms_median"]
                      for k in configs]
            scores[f] = {"geomean_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                         "worst_ratio": max(ratios), "configs": len(ratios),
                         "slower_configs": [list(k) for k, r in zip(configs, ratios)
                                            if r > TOLERANCE]}
        if not scores:
            continue
        best = min(scores, key=lambda f: scores[f]["geomean_ratio"])
        partial = {}
        for f in sorted(forms - set(full)):
            common = [k for k in configs if f in table[k]]
            ratios = [table[k][f]["latency_ms_median"] / table[k][best]["latency_ms_median"]
                      for k in common if best in table[k]]
            if ratios:
                partial[f] = {"vs_best_geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                              "configs": len(ratios)}
        result[family] = {"best": best, "scores": scores, "partial": partial}
    return result


def recommendation_text(rows) -> str:
    out = []
    for family, rec in recommend(rows).items():
        best = rec["best"]
        s = rec["scores"][best]
        slower = (f"; slower than official +2% at {s['slower_configs']}" if s["slower_configs"]
                  else "; never slower than official +2%")
        out.append(f"- **{family}**: DEFAULT_FORMULATION = \"{best}\": geometric mean "
                   f"{s['geomean_ratio']:.3f} x official over {s['configs']} configs, worst "
                   f"{s['worst_ratio']:.3f}{slower}")
        for f, p in sorted(rec["scores"].items(), key=lambda kv: kv[1]["geomean_ratio"]):
            if f != best:
                out.append(f"  - {f}: geomean {p['geomean_ratio']:.3f}, "
                           f"worst {p['worst_ratio']:.3f}")
        for f, p in rec["partial"].items():
            out.append(f"  - {f} (measured on {p['configs']} configs only): "
                       f"{p['vs_best_geomean']:.3f} x {best} there")
    return "\n".join(out)


def checks_table(rows) -> str:
    checks = list(latest(rows, "check").values())
    if not checks:
        return ""
    out = ["Relative errors (max |difference| / max |reference|) on the GPU:", "",
           "| what | formulation / layout | dtype | out | gradients | official's bf16 out "
           "| passed |", "|---|---|---|---|---|---|---|"]
    for r in checks:
        passed = r.get("passed", r.get("status"))
        if r["model"] == "channel_norm":
            grads = f"dx {_num(r.get('rel_err_dx'))}, dw {_num(r.get('rel_err_dw'))}"
            ran = "triton" if r.get("triton_ran", True) else "fallback (triton did not run)"
            out.append(f"| channel_norm {r.get('shape')} | {ran} / {r.get('layout')} | "
                       f"{r.get('dtype')} | {_num(r.get('rel_err_out'))} | {grads} | | {passed} |")
            continue
        form = r.get("formulation")
        out.append(f"| {r['model']} | {form} | fp32 | {_num(r.get('rel_err_fp32_out'))} | "
                   f"{_num(r.get('rel_err_fp32_grads_max'))} | | {passed} |")
        out.append(f"| {r['model']} | {form} | bf16 vs fp32 | "
                   f"{_num(r.get('rel_err_bf16_out_vs_fp32'))} | | "
                   f"{_num(r.get('official_rel_err_bf16_out_vs_fp32'))} | |")
    return "\n".join(out)


def _num(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def huge_section(rows) -> str:
    out = []
    convs = list(latest(rows, "huge_conv").values())
    if convs:
        out += ["Convolutions at 4096 px bf16 around 2^31 output elements:", "",
                "| conv | layout | channels | > 2^31 | ms | ns / output element |",
                "|---|---|---|---|---|---|"]
        for r in convs:
            out.append(f"| {r['conv']} | {r['layout']} | {r['channels']} | {r.get('over_int32')} | "
                       f"{_ms(r)} | {_f(r.get('ns_per_output_element'), 4)} |")
        out.append("")
    grams = list(latest(rows, "huge_gram").values())
    if grams:
        out += ["q @ k^T (c x L) @ (L x c), bf16:", "",
                "| c | L | split | ms | GB/s | rel. err vs fp64 |", "|---|---|---|---|---|---|"]
        for r in grams:
            out.append(f"| {r['head_dim']} | {r['length']} | {r['split']} | {_ms(r)} | "
                       f"{_f(r.get('gb_per_s'), 0)} | {_num(r.get('rel_err_vs_fp64'))} |")
        out.append("")
    for kind, title in (("huge_block", "One full-resolution block (dim 96, 1 head), bf16 "
                                       "inference"),
                        ("huge_model", "Whole Restormer, bf16 inference")):
        items = list(latest(rows, kind).values())
        if not items:
            continue
        out += [f"{title}:", "", "| px | formulation | overrides | ms | peak MB | status |",
                "|---|---|---|---|---|---|"]
        for r in items:
            mb = _f(r.get("mem_peak_alloc_mb"), 0)
            out.append(f"| {r.get('side', r.get('res'))} | {r['formulation']} | "
                       f"{r.get('overrides') or ''} | {_ms(r)} | {mb} "
                       f"| {r['status']} {r.get('reason', '')} |")
            prof = r.get("profile")
            if prof:
                top = ", ".join(f"{o['op']} {o['ms']:.1f}" for o in prof["top_ops"][:6])
                out.append(f"|  |  | top ops (ms) | {top} |  |  |")
        out.append("")
    return "\n".join(out)


def _ms(r) -> str:
    return f"{r['latency_ms_median']:.2f}" if r.get("status") == "ok" else r.get("status", "-")


def _f(v, digits) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def profile_table(rows) -> str:
    items = [r for r in latest(rows, "profile").values() if r.get("status") == "ok"]
    if not items:
        return ""
    classes = ("conv", "matmul", "norm", "attention", "elementwise", "copy")
    out = ["Device ms per call by op class (bf16; torch.profiler self device time):", "",
           "| model | res | mode | formulation | " + " | ".join(classes) + " | total | kernels |",
           "|---|---|---|---|" + "---|" * (len(classes) + 2)]
    for r in sorted(items, key=lambda r: (r["model"], r["res"], r["mode"], r["formulation"])):
        out.append(f"| {r['model']} | {r['res']} | {r['mode']} | {r['formulation']} | "
                   + " | ".join(f"{r['class_ms'][c]:.2f}" for c in classes)
                   + f" | {r['total_ms']:.2f} | {r['kernels_per_call']:.0f} |")
    return "\n".join(out)


def summarize(rows: list[dict]) -> str:
    env = next((r for r in rows if r.get("kind") == "run"), rows[0] if rows else {})
    head = (f"Card: {env.get('cuda_device_name', env.get('device_name'))}; torch "
            f"{env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Triton "
            f"{env.get('triton')}; cudnn.benchmark {env.get('cudnn_benchmark')}, TF32 off "
            f"(matmul {env.get('tf32_matmul')}, cudnn {env.get('tf32_cudnn')}); batch 1; "
            f"commit {env.get('git_commit')}.")
    skipped = [r for r in latest(rows, "timing").values() if r.get("status") == "skipped"]
    parts = ["## Baseline formulations vs the official formulation", "", head, "",
             "### Recommended defaults", "", recommendation_text(rows), "",
             timing_tables(rows)]
    if skipped:
        parts += [f"Skipped timing configs: {len(skipped)} ("
                  + ", ".join(sorted({r.get('reason', '?') for r in skipped})) + ").", ""]
    for title, text in (("Checks", checks_table(rows)), ("Large images", huge_section(rows)),
                        ("Per-op-class profiles", profile_table(rows))):
        if text:
            parts += [f"### {title}", "", text, ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args(argv)
    text = summarize(load_rows(args.rows))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
