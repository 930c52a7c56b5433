"""`bench data`: the image sets a data root offers, so `--train-set` / `--eval-set` names are
never guessed."""
from __future__ import annotations

import click

from bench.errors import UsageError


@click.command("data")
@click.option("--data-root", default=None,
              help="Folder holding the image sets, one subfolder each (default "
                   "$SERPENT_BENCH_DATA).")
def data(data_root):
    """List the image sets under the data root: images, sizes (W x H), MiB on disk.

    \b
    Example:
      export SERPENT_BENCH_DATA=/data/restoration   # or: bench data --data-root DIR
      bench data
    """
    from tabulate import tabulate

    from bench.quality.data import DATA_ENV, available_sets, data_root as resolve_root
    from bench.quality.data import list_images

    root = resolve_root(data_root)
    if root is None:
        raise UsageError(f"no data root: pass --data-root DIR or set {DATA_ENV}=DIR, a folder "
                         "with one subfolder of images per set (Kodak24/, Set5/, ...)")
    rows = []
    for name in available_sets(root):
        files = list_images(root / name)
        sizes = [s for s in map(_size, files) if s]
        rows.append([name, len(files), _size_range(sizes),
                     f"{sum(f.stat().st_size for f in files) / 2**20:.2f}"])
    if not rows:
        raise UsageError(f"data root {root} holds no image-set folders")
    click.echo(f"data root: {root}")
    click.echo(tabulate(rows, headers=["set", "images", "sizes (W x H)", "MiB"],
                        colalign=("left", "right", "left", "right"), disable_numparse=True))
    click.echo("Name sets with --train-set / --val-set / --eval-set (comma lists), "
               "e.g. --eval-set Kodak24,Set14.")


def _size(path) -> tuple[int, int] | None:
    """(width, height) from the image header (nothing decoded); None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _size_range(sizes: list[tuple[int, int]]) -> str:
    if not sizes:
        return "-"
    distinct = sorted(set(sizes), key=lambda s: (s[0] * s[1], s))
    if len(distinct) <= 2:
        return ", ".join(f"{w}x{h}" for w, h in distinct)
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
    return f"{min(ws)}-{max(ws)} x {min(hs)}-{max(hs)}"
