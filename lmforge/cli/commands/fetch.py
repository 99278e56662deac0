"""Fetch public corpora, evaluation sets and tokenizer files (docs/DATA.md) into the cache.

    lmforge fetch --list                    what is where, and what each source needs
    lmforge fetch --sources english         a group (english, russian, eval, tokenizers) or names
    lmforge fetch                           everything

Idempotent: a source whose files match its `.done` checksums is left alone. Sources that need
Debian's apt are skipped elsewhere, with a message. docs/DATA.md describes every source: its
package, what is read from it, and the folders it fills.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List  # `list` is also a field name below, so the builtin can't be used in hints

from lmforge.errors import LmforgeError


@dataclass
class Config:
    sources: List[str] = field(default_factory=list, metadata={"help": "names or groups (english, russian, eval, tokenizers); default all"})
    list: bool = field(default=False, metadata={"help": "show each source's status and exit"})
    force: bool = field(default=False, metadata={"help": "rebuild even when the cache is up to date"})
    home: str | None = field(default=None, metadata={"help": "cache root (default $LMFORGE_HOME or ~/.cache/lmforge)"})


def run(cfg: Config) -> int:
    from lmforge.data import fetch as F

    if cfg.list:
        rows = F.list_status(cfg.home)
        print(f"{'source':<20} {'status':<12} {'MB':>7}  {'needs':<22} folder")
        for r in rows:
            mb = f"{r['mb']:.1f}" if r["mb"] is not None else "-"
            print(f"{r['source']:<20} {r['status']:<12} {mb:>7}  {r['needs']:<22} {r['dir']}")
        return 0
    status = F.fetch(cfg.sources or None, home=cfg.home, force=cfg.force)
    failed = [n for n, s in status.items() if s.startswith("failed")]
    skipped = [n for n, s in status.items() if s.startswith("skipped")]
    print(f"data in {F.data_root(cfg.home)}: {sum(s in ('done', 'up to date') for s in status.values())} ready, "
          f"{len(skipped)} skipped, {len(failed)} failed"
          + (" (docs/DATA.md: what each source needs)" if skipped or failed else ""))
    if failed:
        raise LmforgeError(f"could not fetch: {', '.join(failed)} "
                           "(see messages above; docs/DATA.md lists each source's packages)")
    return 0
