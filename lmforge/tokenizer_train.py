"""Train a byte-level BPE tokenizer, and measure tokenizers in bytes per token.

    tok = train_bpe(texts, vocab_size=32768)          # an lmforge Tokenizer
    tok.save("tok32k/")                               # tokenizer.json + HF config files
    rows = compare({"mine": tok, "gpt2": gpt2_tokenizer()}, {"russian": text})

The trained tokenizer is GPT-2-style byte-level BPE (any UTF-8 text round-trips, no unknown
token) with single-digit splitting first, as SmolLM2's tokenizer does. Its special tokens are
the document separator, ChatML's turn markers (the default model's chat format), the tool-call
tags of the tools protocol, and a pad token; `tokenizer_config.json` carries a ChatML chat
template, so `transformers.AutoTokenizer.from_pretrained(dir)` loads the folder as it is.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.errors import LmforgeError
from lmforge.provenance import run_metadata  # noqa: F401  (re-exported: benchmarks import it from here)

# The first is the document separator (EOS of the base model), kept at id 0 as GPT-2 and SmolLM do.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<|pad|>",
]

# Plain ChatML, the default model's format without its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Split long text at line ends into pieces of about `size` characters (BPE training
    parallelises over pieces; a 4 MB dictionary letter as one piece would run on one core)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        yield text[start:end]
        start = end


def sample_texts(paths, max_bytes: int | None = None, doc_chars: int | None = None, seed: int = 0,
                 on_error: str = "fail", text_field: str = "text", counts: dict | None = None, log=print) -> Iterator[str]:
    """Text for training, an equal share of bytes from each input path (so `--data english,russian`
    is about half Russian however large the English folder is; once an input runs out the others
    share the rest). Each path's documents come in a shuffled but fixed order, at most
    `doc_chars` characters from any one document, about `max_bytes` in all.
    `counts`, when given, receives the UTF-8 bytes taken from each path."""
    from lmforge.data.sources import ReadStats, iter_documents, plan

    if isinstance(paths, (str, Path)):
        paths = [paths]
    streams = []
    for p in paths:
        stats = ReadStats()
        items = plan([p], stats)
        for h in stats.heldout_skipped:
            log(f"skipping held-out folder {h}")
        items.sort(key=lambda it: hashlib.sha256(f"{seed}:{it[2]}".encode()).digest())
        streams.append((str(p), iter_documents(None, on_error=on_error, text_field=text_field, items=items)))
    counts = counts if counts is not None else {}
    for name, _ in streams:
        counts.setdefault(name, 0)
    total = 0
    while streams:
        # the input with the fewest bytes taken so far goes next: equal shares by bytes, not documents
        entry = min(streams, key=lambda e: counts[e[0]])
        name, s = entry
        doc = next(s, None)
        if doc is None:
            streams.remove(entry)
            continue
        text = doc.text
        if doc_chars is not None and len(text) > doc_chars:
            text = text[: text.rfind("\n", 0, doc_chars) + 1 or doc_chars]
        if max_bytes is not None:
            room = max_bytes - total
            if room <= 0:
                return
            text = text[:room]
        n = len(text.encode("utf-8"))
        total += n
        counts[name] += n
        yield from _chunks(text)


def train_bpe(texts: Iterable[str], vocab_size: int = 32768, min_frequency: int = 2, show_progress: bool = False):
    """A byte-level BPE `lmforge.tokenizer.Tokenizer` trained on `texts` (strings)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from lmforge.tokenizer import Tokenizer, byte_level_pre_tokenizer

    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise LmforgeError(f"vocab_size must be at least {n_min} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    backend = HFTokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = byte_level_pre_tokenizer("smollm")  # one digit per piece, then GPT-2's split
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(
        backend,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        chat_template=CHATML_TEMPLATE,
        add_bos=False,
    )


def train_tokenizer(data, out: str | Path, vocab_size: int = 32768, max_bytes: int | None = None,
                    doc_chars: int | None = 1 << 20, min_frequency: int = 2, seed: int = 0,
                    on_error: str = "fail", text_field: str = "text", progress: bool = True, log=print) -> dict:
    """Train on documents of `data` and save the folder; returns a summary (also saved as train_info.json)."""
    t0 = time.time()
    counts: dict[str, int] = {}
    texts = sample_texts(data, max_bytes=max_bytes, doc_chars=doc_chars, seed=seed, on_error=on_error,
                         text_field=text_field, counts=counts, log=log)
    tok = train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress)
    if not sum(counts.values()):
        raise LmforgeError("no training text found")
    out = Path(out)
    tok.save(out)
    info = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": vocab_size,
        "special_tokens": SPECIAL_TOKENS,
        "trained_on_bytes": sum(counts.values()),
        "bytes_per_input": counts,
        "data": [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)],
        "max_bytes": max_bytes,
        "doc_chars": doc_chars,
        "min_frequency": min_frequency,
        "seed": seed,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------------------------------------
# reference tokenizers and bytes per token


def gpt2_tokenizer(home: str | Path | None = None):
    """GPT-2's tokenizer from the fetched encoder.json + vocab.bpe (`lmforge fetch --sources
    gpt2-tokenizer`), or None when they are not in the cache."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.data.fetch import data_root
    from lmforge.tokenizer import Tokenizer, byte_level_pre_tokenizer

    d = data_root(home) / "tokenizers" / "gpt2"
    if not (d / "encoder.json").exists() or not (d / "vocab.bpe").exists():
        return None
    vocab = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = byte_level_pre_tokenizer("gpt2")
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return Tokenizer(backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def bytes_per_token(tok, text: str) -> float:
    """UTF-8 bytes of `text` per token (higher packs more text into a context)."""
    n = len(getattr(tok, "backend", tok).encode(text, add_special_tokens=False).ids)
    return len(text.encode("utf-8")) / max(n, 1)


def compare(tokenizers: dict, texts: dict[str, str], reference: str | None = "gpt2") -> list[dict]:
    """One row per tokenizer: vocab size, tokens and bytes/token per text, and the ratio to
    `reference`'s bytes/token on the same text when it is among the tokenizers."""
    rows = []
    for name, tok in tokenizers.items():
        row = {"tokenizer": name, "vocab_size": getattr(tok, "backend", tok).get_vocab_size(with_added_tokens=True)}
        for tname, text in texts.items():
            n = len(getattr(tok, "backend", tok).encode(text, add_special_tokens=False).ids)
            row[f"{tname}_tokens"] = n
            row[f"{tname}_bytes_per_token"] = round(len(text.encode("utf-8")) / max(n, 1), 4)
        rows.append(row)
    ref = next((r for r in rows if r["tokenizer"] == reference), None)
    if ref is not None:
        for r in rows:
            for tname in texts:
                r[f"{tname}_vs_{reference}"] = round(r[f"{tname}_bytes_per_token"] / ref[f"{tname}_bytes_per_token"], 4)
    return rows


def format_table(rows: list[dict], texts: list[str], reference: str | None = "gpt2") -> str:
    head = f"{'tokenizer':<28} {'vocab':>7}"
    for t in texts:
        head += f" {t + ' B/tok':>16}" + (f" {'vs ' + reference:>9}" if reference and f"{t}_vs_{reference}" in rows[0] else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['tokenizer'][:28]:<28} {r['vocab_size']:>7}"
        for t in texts:
            line += f" {r[f'{t}_bytes_per_token']:>16.3f}"
            if reference and f"{t}_vs_{reference}" in r:
                line += f" {r[f'{t}_vs_{reference}']:>8.3f}x"
        lines.append(line)
    return "\n".join(lines)


def heldout_texts(home: str | Path | None = None, english: str | None = None, russian: str | None = None) -> dict[str, str]:
    """The held-out evaluation text: given files/folders, else the cache's `heldout/` (lmforge fetch)."""
    from lmforge.data.fetch import data_root
    from lmforge.data.sources import read_text

    out = {}
    for lang, given in (("english", english), ("russian", russian)):
        path = Path(given) if given else data_root(home) / "heldout" / lang
        if not path.exists():
            if given:
                raise LmforgeError(f"{lang} text not found: {path}")
            continue
        out[lang] = read_text([path])
    if not out:
        raise LmforgeError(
            f"no held-out text in {data_root(home) / 'heldout'}: run `lmforge fetch --sources sotu,moby-dick,fortunes-ru` "
            "or pass --english FILE / --russian FILE"
        )
    return out


def clean_name(path: str) -> str:
    p = Path(path)
    return re.sub(r"\s+", "_", p.name if p.name not in ("", "tokenizer.json") else p.parent.name)
