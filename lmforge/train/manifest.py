"""Checkpoint manifests: the size and SHA-256 of every file of a checkpoint, written last.

A checkpoint whose files do not match its manifest (truncated, overwritten, half-copied) is
never loaded: resuming and `--model RUN` fall back to the newest intact checkpoint and say
which one was skipped and why. Checkpoints written before manifests existed carry none and are
trusted as they are. No torch here: the model loader uses it too.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record every file under `folder` (the manifest itself excluded)."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    path = folder / MANIFEST
    path.write_text(json.dumps({"files": files}, indent=1) + "\n")
    return path


def damage(folder: Path) -> str | None:
    """Why `folder` cannot be trusted (a missing, short or changed file), or None when it matches
    its manifest or predates manifests."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is unreadable"
    for name, want in files.items():
        f = folder / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes, its manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its manifest's SHA-256"
    return None


def newest_intact(candidates: list[Path], complete, warn=print) -> Path | None:
    """The newest of `candidates` (sorted oldest first) that is `complete(p)` and undamaged;
    each damaged one skipped on the way is reported through `warn`."""
    for p in reversed(candidates):
        if p.name.endswith(".tmp") or not complete(p):
            continue
        why = damage(p)
        if why is None:
            return p
        warn(f"warning: skipping damaged checkpoint {p.name}: {why}")
    return None
