"""`bench report`: paper tables and figures from results files. Heavy imports happen inside."""
from __future__ import annotations

import click


@click.command()
@click.argument("results", nargs=-1, required=True, metavar="RESULTS.jsonl...")
@click.option("--out", required=True, help="Report folder, e.g. reports/h100 (replaced whole).")
@click.option("--relative-to", "reference", default=None,
              help="Reference model of the ratio columns and the headline figure "
                   "(default: serpent_s when present).")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Keep rows whose column KEY matches VALUE (comma list = any of; globs for "
                   "text), e.g. --filter dtype=bf16 --filter model='serpent*,swinir'. "
                   "Repeatable; each key narrows the rows that have that column.")
@click.option("--headline", "headline_filters", multiple=True, metavar="KEY=VALUE",
              help="Pick the memory setting of the headline figure, e.g. --headline mode=train "
                   "(default: inference, the setting covering the most models).")
@click.option("--flops-res", type=int, default=None,
              help="Resolution whose GFLOPs the quality-vs-GFLOPs figures use (default 256).")
@click.option("--formats", default="pdf,png,svg", show_default=True,
              help="Figure formats, comma list of pdf, png, svg.")
@click.option("--dpi", type=int, default=300, show_default=True, help="PNG resolution.")
def report(results, out, reference, filters, headline_filters, flops_res, formats, dpi):
    """Write tables (Markdown, LaTeX, CSV), figures (PDF/PNG/SVG) and a README to --out.

    \b
    Example:
      bench report results/h100_sweep.jsonl results/quality.jsonl --out reports/h100 \\
          --relative-to serpent_s --filter dtype=bf16
    """
    import warnings

    from bench.report.build import build_report, parse_formats

    with warnings.catch_warnings(record=True) as caught:  # one line each, not a Python warning
        warnings.simplefilter("always")
        try:
            rep = build_report(list(results), out, reference=reference, filters=filters,
                               formats=parse_formats(formats), dpi=dpi,
                               headline_filters=headline_filters, flops_res=flops_res)
        finally:
            for w in caught:
                if issubclass(w.category, UserWarning):
                    click.echo(f"bench report: warning: {w.message}", err=True)
    n_tables = sum(f.endswith(".md") and f.startswith("tables/") for f in rep.files)
    n_figs = len({f.rsplit(".", 1)[0] for f in rep.files if f.startswith("figures/")})
    click.echo(f"{n_tables} tables and {n_figs} figures written to {rep.out} "
               f"(open {rep.out / 'README.md'})")
