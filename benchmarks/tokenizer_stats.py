"""Bytes per token of a 32k English+Russian BPE against GPT-2's and the default model's tokenizers.

    python benchmarks/tokenizer_stats.py [--max-bytes 20e6] [--vocab-size 32768] [--keep DIR]

Fetches the corpora it needs (idempotent), trains the tokenizer on a sample drawn evenly from
the English and Russian folders (held-out text excluded), measures bytes/token on the held-out
English and Russian text, prints a table and writes benchmarks/results/tokenizer_stats.json.
The issue's bar: the trained tokenizer beats GPT-2's bytes/token on the Russian text.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from lmforge.data.fetch import data_root, fetch
from lmforge.data.prepare import resolve_tokenizer
from lmforge.errors import LmforgeError
from lmforge.tokenizer_train import compare, format_table, gpt2_tokenizer, heldout_texts, run_metadata, train_tokenizer

RESULT = Path(__file__).parent / "results" / "tokenizer_stats.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--max-bytes", type=float, default=20e6)
    ap.add_argument("--keep", help="save the trained tokenizer here (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()

    status = fetch(["english", "russian", "gpt2-tokenizer"])
    root = data_root()
    for lang in ("english", "russian"):
        if not (root / lang).exists():
            raise SystemExit(f"no {lang} corpus in {root}: {status}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp) / "tok"
        info = train_tokenizer([root / "english", root / "russian"], out, vocab_size=args.vocab_size,
                               max_bytes=int(args.max_bytes), progress=False)
        print(f"trained vocab {info['vocab_size']} on {info['trained_on_bytes'] / 1e6:.1f} MB in {info['seconds']} s")
        toks = {f"lmforge-bpe-{args.vocab_size // 1024}k-en-ru": resolve_tokenizer(out)}
        gpt2 = gpt2_tokenizer()
        if gpt2 is None:
            raise SystemExit("GPT-2's tokenizer files are missing: lmforge fetch --sources gpt2-tokenizer")
        toks["gpt2"] = gpt2
        try:
            toks["default-model (SmolLM2)"] = resolve_tokenizer(None)
        except LmforgeError as e:
            print(f"default model skipped: {e}")
        texts = heldout_texts()
        rows = compare(toks, texts)
    print(format_table(rows, list(texts)))
    mine, ref = rows[0], next(r for r in rows if r["tokenizer"] == "gpt2")
    beats = mine["russian_bytes_per_token"] > ref["russian_bytes_per_token"]
    print(f"Russian: {mine['russian_bytes_per_token']:.3f} vs GPT-2 {ref['russian_bytes_per_token']:.3f} bytes/token "
          f"({mine['russian_vs_gpt2']:.2f}x) -> {'beats' if beats else 'does NOT beat'} GPT-2")
    result = {
        **run_metadata(),
        "train": {k: v for k, v in info.items() if k != "special_tokens"},
        "heldout": {k: {"bytes": len(v.encode("utf-8")), "source": str(root / "heldout" / k)} for k, v in texts.items()},
        "rows": rows,
        "russian_beats_gpt2": beats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {args.out}")
    return 0 if beats else 1


if __name__ == "__main__":
    sys.exit(main())
