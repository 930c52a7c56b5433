"""`bench compare` (the regression gate) and `bench baseline` (committed baselines).

Exit codes of `bench compare`: 0 no regression, 1 regression, 2 usage error (missing or empty
file, bad rules, no comparable rows). Heavy imports happen inside the commands.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

DEFAULT_BASELINE_DIR = "results/baselines"


@click.command()
@click.argument("baseline_file", metavar="BASELINE")
@click.argument("current_file", metavar="CURRENT")
@click.option("--rules", "rules_file", default=None, metavar="FILE",
              help="JSON rules overriding the defaults (`bench baseline rules` prints them).")
@click.option("--markdown", "markdown_file", default=None, metavar="FILE",
              help="Write a Markdown summary (for a pull-request comment).")
@click.option("--json", "json_file", default=None, metavar="FILE",
              help="Write the machine-readable verdict (per config, per metric).")
@click.option("--only-changes", is_flag=True,
              help="On screen, list only configs that are not plain ok.")
@click.pass_context
def compare(ctx, baseline_file, current_file, rules_file, markdown_file, json_file, only_changes):
    """Compare CURRENT results against a BASELINE results file; exit 1 on regression.

    Rows are joined on their config (model, task, scale, res, batch, dtype, mode, compile,
    channels_last, overrides) within one environment key (device, torch, CUDA). Params and FLOPs
    must match exactly; peak memory within 2%; latency and throughput regress only when the
    95% bootstrap interval of the median ratio lies entirely beyond 5%. Missing configs and
    ok -> oom/error are regressions.
    """
    from bench.compare.verdict import compare_files, load_rules
    from bench.compare.render import render_markdown, render_text

    rules = load_rules(rules_file)
    result = compare_files(baseline_file, current_file, rules)
    click.echo(render_text(result, only_changes=only_changes))
    if markdown_file:
        _write_text(markdown_file, render_markdown(result))
    if json_file:
        _write_text(json_file, json.dumps(result.to_json(), indent=1) + "\n")
    ctx.exit(0 if result.passed else 1)


def _write_text(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


@click.group()
def baseline():
    """Committed regression baselines (results/baselines/, one file per environment key)."""


@baseline.command("update")
@click.argument("results_file", metavar="RESULTS")
@click.option("--out", default=None, metavar="FILE",
              help="Baseline file to write (RESULTS must then hold one environment key). "
              "Default: one file per environment key in --dir, named after it.")
@click.option("--dir", "out_dir", default=DEFAULT_BASELINE_DIR, show_default=True,
              help="Directory for baselines named after their environment key.")
@click.option("--force", is_flag=True, help="Replace an existing baseline file.")
def update(results_file, out, out_dir, force):
    """Write baselines from a RESULTS file (every status kept, atomically).

    One row per config (the last one, if a config appears twice); ok, oom, error and skipped rows
    are all kept, so that `compare` sees ok -> oom and oom -> ok."""
    from bench.compare.verdict import baseline_filename, baseline_groups, env_label, write_jsonl_atomic
    from bench.errors import UsageError

    groups, notes = baseline_groups(results_file)
    if out and len(groups) > 1:
        raise UsageError(
            f"{results_file} holds {len(groups)} environment keys "
            f"({'; '.join(env_label(e) for e in groups)}); omit --out to write one baseline per "
            f"key into --dir")
    targets = {env: Path(out) if out else Path(out_dir) / baseline_filename(env) for env in groups}
    clash = [str(p) for p in targets.values() if p.exists()] if not force else []
    if clash:
        raise UsageError(f"{', '.join(clash)} exist(s); pass --force to replace")
    for note in notes:
        click.echo(f"note: {note}")
    for env, path in targets.items():
        rows = groups[env]
        write_jsonl_atomic(path, rows, force=force)
        statuses = {s: sum(r.get("status") == s for r in rows) for s in {r.get("status") for r in rows}}
        click.echo(f"wrote {path}: {len(rows)} row(s) "
                   f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items(), key=str))}) "
                   f"for [{env_label(env)}]")


@baseline.command("rules")
def rules():
    """Print the default rules as JSON (template for --rules)."""
    from bench.compare.verdict import load_rules

    click.echo(json.dumps(load_rules(), indent=2))


@baseline.command("name")
@click.argument("results_file", metavar="RESULTS")
def name(results_file):
    """Print the baseline path for a RESULTS file's environment.

    One line per environment key in RESULTS: results/baselines/<name derived from the key>."""
    from bench.compare.verdict import baseline_filename, baseline_groups

    for env in baseline_groups(results_file)[0]:
        click.echo(str(Path(DEFAULT_BASELINE_DIR) / baseline_filename(env)))
