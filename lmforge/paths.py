"""Where lmforge keeps its files, and the checksum it verifies them with.

Torch-free on purpose: `lmforge fetch`, `lmforge pull`, data preparation and the eval/tool caches
use these without loading torch (importing `lmforge.loading` would).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def lmforge_home() -> Path:
    """The cache root: $LMFORGE_HOME, default ~/.cache/lmforge (read on every call, so tests can
    point it elsewhere)."""
    return Path(os.environ.get("LMFORGE_HOME", Path.home() / ".cache" / "lmforge"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read 1 MiB at a time (wheels and tarballs are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
