"""Index your documents for the `search` tool, and search them (SQLite FTS5, BM25).

    lmforge index build --data ~/notes                 # incremental; default --out $LMFORGE_HOME/index.sqlite
    lmforge index search --query "capital of France"
    lmforge index stats
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError


@dataclass
class BuildConfig:
    data: str = field(default="", metadata={"help": "folder of .txt .md .rst .html .pdf files (required)"})
    out: str | None = field(default=None, metadata={"help": "index file (default $LMFORGE_HOME/index.sqlite)"})
    chunk_chars: int = field(default=1000, metadata={"help": "characters per chunk (fixed when the index is created)"})
    overlap: int = field(default=200, metadata={"help": "characters shared by neighbouring chunks"})
    stemming: bool = field(default=True, metadata={"help": "Snowball stems (English, Russian) when snowballstemmer is installed"})


@dataclass
class SearchConfig:
    query: str = field(default="", metadata={"help": "words to look for (required)"})
    index: str | None = field(default=None, metadata={"help": "index file (default $LMFORGE_HOME/index.sqlite)"})
    k: int = field(default=5, metadata={"help": "how many snippets"})


@dataclass
class StatsConfig:
    index: str | None = field(default=None, metadata={"help": "index file (default $LMFORGE_HOME/index.sqlite)"})


def build(cfg: BuildConfig) -> int:
    """Index (or re-index: changed files only) every document under --data."""
    from lmforge.tools.search import build_index, default_index_path

    if not cfg.data:
        raise LmforgeError("lmforge index build needs --data FOLDER")
    out = cfg.out or str(default_index_path())
    report = build_index(cfg.data, out, chunk_chars=cfg.chunk_chars, overlap=cfg.overlap,
                         stemming=cfg.stemming, progress=True)
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}")
    print(f"{out}: {report.summary()}")
    return 0


def search_cmd(cfg: SearchConfig) -> int:
    """Print the best matching snippets with file, line and characters."""
    from lmforge.tools.search import search_tool

    if not cfg.query.strip():
        raise LmforgeError("lmforge index search needs --query WORDS")
    print(search_tool(cfg.query, index=cfg.index, k=cfg.k))
    return 0


def stats(cfg: StatsConfig) -> int:
    """Files, chunks, folders and settings of an index."""
    from lmforge.tools.search import index_stats

    for key, value in index_stats(cfg.index).items():
        print(f"{key}: {value}")
    return 0


SUBCOMMANDS = {"build": (BuildConfig, build), "search": (SearchConfig, search_cmd), "stats": (StatsConfig, stats)}
