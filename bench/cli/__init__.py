"""`bench` command line. Subcommands live in their own modules and are imported only when used,
so `bench --help` answers without importing torch."""
from __future__ import annotations

import importlib
import sys

import click

from bench.errors import UsageError

# name -> (module:attribute, one-line help shown by `bench --help` without importing the module)
COMMANDS = {
    "run": ("bench.cli.run:run", "Sweep models x resolutions: params, FLOPs, latency, memory."),
    "models": ("bench.cli.run:models", "List registered models with family and parameters."),
    "train": ("bench.cli.train:train", "Train a model on an image folder for a task."),
    "eval": ("bench.cli.eval:eval_cmd", "Score a model on evaluation sets (PSNR/SSIM/LPIPS)."),
    "report": ("bench.cli.report:report", "Tables and figures from results files."),
    "compare": ("bench.cli.compare:compare", "Fail on speed/memory/FLOP regressions vs a baseline."),
    "baseline": ("bench.cli.compare:baseline", "Manage committed regression baselines."),
    "data": ("bench.cli.data:data", "List the image sets under the data root."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="serpent-bench")
def cli():
    """serpent-bench: trustworthy efficiency and quality comparisons of restoration models."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors become one line on stderr and exit code 2."""
    try:
        rv = cli.main(args=argv, prog_name="bench", standalone_mode=False)
    except (UsageError, click.UsageError) as e:
        msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"bench: error: {msg}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
