"""Prepare pretraining data: documents -> token shards + manifest (prepare).

    lmforge data prepare --data ~/.cache/lmforge/data/english --tokenizer tok32k --out data/en
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.errors import LmforgeError


@dataclass
class PrepareConfig:
    data: list[str] = field(default_factory=list, metadata={"help": "files/folders (.txt .md .jsonl .parquet), hf:NAME[:SPLIT]; comma-separated"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.json, a folder with one, or a model (default: the default model's)"})
    out: str = ""
    val_fraction: float = 0.005
    seed: int = 0
    workers: int | None = field(default=None, metadata={"help": "batches tokenized at once, each by the Rust tokenizer on its own threads (default: CPU count, at most 8)"})
    on_error: Literal["fail", "skip"] = field(default="fail", metadata={"help": "malformed records: stop (naming file:line) or skip and count"})
    text_field: str = "text"
    shard_tokens: int = field(default=1 << 27, metadata={"help": "tokens per shard file"})


def prepare(cfg: PrepareConfig) -> int:
    """Tokenize documents into train/val shards (uint16/uint32 memmaps) with EOS between documents and a manifest."""
    from lmforge.data.prepare import prepare as run_prepare

    if not cfg.data:
        raise LmforgeError("--data is required")
    if not cfg.out:
        raise LmforgeError("--out is required")
    r = run_prepare(cfg.data, cfg.tokenizer, cfg.out, val_fraction=cfg.val_fraction, seed=cfg.seed, workers=cfg.workers,
                    on_error=cfg.on_error, text_field=cfg.text_field, shard_tokens=cfg.shard_tokens)
    m = r.manifest
    print(f"{cfg.out}: train {m['train']['docs']:,} docs {m['train']['tokens']:,} tokens, "
          f"val {m['val']['docs']:,} docs {m['val']['tokens']:,} tokens, {m['dtype']}, "
          f"{(m['train']['bytes'] + m['val']['bytes']) / max(1, m['train']['tokens'] + m['val']['tokens']):.2f} bytes/token"
          + (f", {m['errors']} malformed records skipped" if m["errors"] else ""))
    return 0


SUBCOMMANDS = {"prepare": (PrepareConfig, prepare)}
