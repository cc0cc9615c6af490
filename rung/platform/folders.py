"""Writing a whole folder (a model export, a quantized copy of one) so that readers see the old folder or the
complete new one, never half of either: it is built in a staging folder beside the target and renamed into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rung.errors import RungError


def refuse_unless_empty(out: Path, overwrite: bool) -> None:
    """An `--out` that holds something is replaced only when the user said so."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RungError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """The staging folder to fill; when the block ends without an error it replaces `out`, else it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
