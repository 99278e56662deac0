"""Train a byte-level BPE tokenizer (train) or compare tokenizers in bytes per token (stats).

    lmforge tokenizer train --data ~/.cache/lmforge/data/english,~/.cache/lmforge/data/russian --vocab-size 32768 --out tok32k
    lmforge tokenizer stats --tokenizer tok32k
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.errors import LmforgeError


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list, metadata={"help": "files/folders/JSONL/parquet/hf:NAME, comma-separated; drawn from evenly"})
    out: str = field(default="", metadata={"help": "folder for tokenizer.json + HF config files"})
    vocab_size: int = 32768
    max_bytes: int | None = field(default=None, metadata={"help": "train on at most this much text (e.g. 20e6)"})
    doc_chars: int | None = field(default=1 << 20, metadata={"help": "at most this many characters from one document"})
    min_frequency: int = 2
    seed: int = 0
    on_error: Literal["fail", "skip"] = "fail"
    text_field: str = "text"


def train(cfg: TrainConfig) -> int:
    """Train a byte-level BPE tokenizer with ChatML and tool-call special tokens; save a folder transformers loads."""
    from lmforge.tokenizer_train import train_tokenizer

    if not cfg.data:
        raise LmforgeError("--data is required (files or folders of text, JSONL, parquet)")
    if not cfg.out:
        raise LmforgeError("--out is required (the folder to write the tokenizer to)")
    info = train_tokenizer(cfg.data, cfg.out, vocab_size=cfg.vocab_size, max_bytes=cfg.max_bytes, doc_chars=cfg.doc_chars,
                           min_frequency=cfg.min_frequency, seed=cfg.seed, on_error=cfg.on_error, text_field=cfg.text_field)
    print(f"trained vocab {info['vocab_size']} on {info['trained_on_bytes'] / 1e6:.1f} MB in {info['seconds']} s -> {cfg.out}")
    return 0


@dataclass
class StatsConfig:
    tokenizer: list[str] = field(default_factory=list, metadata={"help": "tokenizer.json files, folders or models to measure"})
    english: str | None = field(default=None, metadata={"help": "English text file/folder (default: the cache's held-out English)"})
    russian: str | None = field(default=None, metadata={"help": "Russian text file/folder (default: the cache's held-out Russian)"})
    baselines: bool = field(default=True, metadata={"help": "also measure GPT-2's and the default model's tokenizers"})
    out_json: str | None = field(default=None, metadata={"help": "write the rows (with command, commit, machine) here"})
    home: str | None = None


def stats(cfg: StatsConfig) -> int:
    """Bytes per token on held-out English and Russian text, against GPT-2's and the default model's tokenizers."""
    from lmforge.data.prepare import resolve_tokenizer
    from lmforge.tokenizer_train import clean_name, compare, format_table, gpt2_tokenizer, heldout_texts, run_metadata

    texts = heldout_texts(cfg.home, cfg.english, cfg.russian)
    toks: dict = {}
    notes = []
    if cfg.baselines:
        g = gpt2_tokenizer(cfg.home)
        if g is None:
            notes.append("GPT-2 skipped: its files are not in the cache (lmforge fetch --sources gpt2-tokenizer)")
        else:
            toks["gpt2"] = g
        try:
            toks["default-model (SmolLM2)"] = resolve_tokenizer(None)
        except LmforgeError as e:
            notes.append(f"default model skipped: {e}")
    for spec in cfg.tokenizer:
        toks[clean_name(spec)] = resolve_tokenizer(spec)
    if not toks:
        raise LmforgeError("no tokenizer to measure (pass --tokenizer PATH)")
    rows = compare(toks, texts)
    print(format_table(rows, list(texts)))
    print("text: " + ", ".join(f"{k} {len(v.encode('utf-8')) / 1e3:.0f} kB" for k, v in texts.items()))
    for n in notes:
        print(n)
    if cfg.out_json:
        out = {**run_metadata(), "texts": {k: {"bytes": len(v.encode("utf-8")), "chars": len(v)} for k, v in texts.items()},
               "rows": rows, "notes": notes}
        Path(cfg.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out_json).write_text(json.dumps(out, indent=1, ensure_ascii=False))
        print(f"wrote {cfg.out_json}")
    return 0


SUBCOMMANDS = {"train": (TrainConfig, train), "stats": (StatsConfig, stats)}
