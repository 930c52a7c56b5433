"""Files the suite writes: whole-file replacement that readers never see half done, and the
one rule that turns names (cards, settings, data sets) into file names."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable, IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None] | str | bytes) -> None:
    """Write `path` through a temporary file in the same folder, fsync, then os.replace: a
    reader (or a crash) sees the old file or the new one, never a part. `write` is the
    content (str or bytes) or a function that writes into the open binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode("utf-8") if isinstance(write, str) else write)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def slug(*parts, keep: str = "_-") -> str:
    """File-name-safe text: the parts joined by '_', lower-cased ASCII letters and digits kept
    with the characters in `keep`, every other run of characters one '-'.
    'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; keep='.' keeps version numbers."""
    text = "_".join(str(p) for p in parts if p not in (None, "")).lower()
    out = re.sub(f"[^a-z0-9{re.escape(keep)}]+", "-", text)
    return re.sub("-{2,}", "-", out).strip("-_.")
