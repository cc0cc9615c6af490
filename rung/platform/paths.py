"""Where rung keeps what it builds or measures per machine, outside the package tree: one cache root.

`RUNG_CACHE_DIR` sets it; otherwise `$XDG_CACHE_HOME/rung` or `~/.cache/rung`. Kernel builds and nano-batch tuning
results live below it, keyed so that a stale or foreign entry is never read.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache root, or a folder below it (not created)."""
    root = os.environ.get("RUNG_CACHE_DIR")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rung"
    return Path(root).joinpath(*parts)
