"""Token shards for pretraining: documents -> token ids on disk, plus a manifest training checks.

    lmforge data prepare --data ~/.cache/lmforge/data/english --tokenizer tok/ --out data/en

Output folder:
    train_000.bin, train_001.bin, ...   token ids (numpy uint16 when the vocabulary fits, else uint32)
    val_000.bin, ...                    the validation split, same format
    manifest.json                       dtype, counts, byte counts, tokenizer sha256, sources
    tokenizer/                          the tokenizer used (tokenizer.json + HF config files)

Every document is followed by the EOS token (`<|endoftext|>` when the vocabulary has it, else the
tokenizer's EOS), so shards decode to the documents joined by EOS. A document goes to val when
sha256(f"{seed}:{doc.id}") read as a fraction in [0, 1) is below `val_fraction`: the split is
fixed by the document ids alone (not by order, worker count or shard size). The manifest's
`bytes` are the UTF-8 bytes of the documents' text (EOS excluded), so bits per byte =
loss_nats * tokens / (bytes * ln 2) with `tokens` counting the EOS tokens too.

Training opens the folder with `open_prepared(dir, tokenizer)`, which raises LmforgeError when the
model's tokenizer is not the one the shards were made with.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from lmforge.data.sources import ReadStats, iter_documents, plan, total_bytes
from lmforge.errors import LmforgeError

FORMAT = "lmforge-tokens"
VERSION = 1
EOS_PREFERRED = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# tokenizers: resolve, fingerprint


def resolve_tokenizer(spec):
    """An lmforge Tokenizer from a tokenizer.json file, a folder holding one, a model (GGUF / HF
    folder / run folder; None = the default model) or an already loaded tokenizer."""
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        return spec
    p = Path(spec).expanduser() if spec is not None and str(spec) else None  # "" means the default model
    if p is not None and ((p.suffix == ".json" and p.is_file()) or _plain_tokenizer_dir(p)):
        from lmforge.tokenizer import Tokenizer

        return Tokenizer.from_dir(p)  # what load_tokenizer does here too, without its seconds of torch import
    from lmforge.loading import load_tokenizer  # imports torch: only when a model must be resolved

    return load_tokenizer(spec)


def _plain_tokenizer_dir(p: Path) -> bool:
    """A folder holding tokenizer.json that is not a run folder (those resolve to a checkpoint)."""
    return (p / "tokenizer.json").is_file() and not os.path.lexists(p / "latest") and not (p / "checkpoints").exists()


def backend_of(tok):
    """The `tokenizers.Tokenizer` inside an lmforge Tokenizer (or the object itself)."""
    return getattr(tok, "backend", tok)


def tokenizer_fingerprint(tok) -> str:
    """sha256 of what decides the ids: vocabulary, merges, added tokens, normalizer,
    pre-tokenizer and post-processor. Runtime settings (padding, truncation) and the
    serialization's version-dependent spelling of merges ("a b" vs ["a", "b"]) are left out."""
    data = json.loads(backend_of(tok).to_str())
    model = dict(data.get("model") or {})
    if isinstance(model.get("merges"), list):
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    keep = {
        "model": model,
        "added_tokens": [{k: t.get(k) for k in ("id", "content", "special")} for t in data.get("added_tokens") or []],
        "normalizer": data.get("normalizer"),
        "pre_tokenizer": data.get("pre_tokenizer"),
        "post_processor": data.get("post_processor"),
    }
    blob = json.dumps(keep, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def eos_for(tok) -> tuple[int, str]:
    """(id, token) appended after every document."""
    be = backend_of(tok)
    i = be.token_to_id(EOS_PREFERRED)
    if i is not None:
        return i, EOS_PREFERRED
    eos = getattr(tok, "eos_token", None)
    if eos is not None and be.token_to_id(eos) is not None:
        return be.token_to_id(eos), eos
    raise LmforgeError(f"the tokenizer has neither {EOS_PREFERRED} nor an EOS token to separate documents")


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_val(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    h = hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < val_fraction


# ---------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Appends token arrays to `<split>_NNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.f = None
        self.tokens = self.docs = self.bytes = 0

    def _open(self):
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.f = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def write(self, ids: np.ndarray, docs: int, nbytes: int) -> None:
        """`ids`: whole documents, EOS included; a shard boundary may fall inside one."""
        self.docs += docs
        self.bytes += nbytes
        pos = 0
        while pos < len(ids):
            if self.f is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                if self.f is not None:
                    self.f.close()
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part = ids[pos : pos + room]
            part.astype(self.dtype, copy=False).tofile(self.f)
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)
            pos += len(part)

    def close(self) -> dict:
        if self.f is not None:
            self.f.close()
        return {"docs": self.docs, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}


@dataclass
class EncodedBatch:
    ids: np.ndarray  # every document's ids followed by EOS, concatenated, in the shards' dtype
    lens: np.ndarray  # tokens per document, EOS included
    nbytes: np.ndarray  # UTF-8 bytes per document
    val: np.ndarray  # True where the document belongs to the val split


def batch_encoder(be, eos_id: int, dtype: np.dtype, val_fraction: float, seed: int):
    """A function from a list of documents to their EncodedBatch."""
    encode_batch = getattr(be, "encode_batch_fast", be.encode_batch)  # same ids; skips the offsets (tokenizers >= 0.20)

    def encode(docs) -> EncodedBatch:
        texts = [d.text for d in docs]
        ids = [e.ids for e in encode_batch(texts, add_special_tokens=False)]
        for x in ids:
            x.append(eos_id)
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype, int(lens.sum()))  # one copy, no per-document arrays
        nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, len(texts))
        val = np.fromiter((is_val(d.id, val_fraction, seed) for d in docs), bool, len(docs))
        return EncodedBatch(flat, lens, nbytes, val)

    return encode


def write_batch(writers: dict[str, ShardWriter], b: EncodedBatch) -> None:
    """Each split's documents of the batch, in input order, as one write per split."""
    for split, in_split in (("train", ~b.val), ("val", b.val)):
        if in_split.all():
            writers[split].write(b.ids, len(in_split), int(b.nbytes.sum()))
        elif in_split.any():
            writers[split].write(b.ids[np.repeat(in_split, b.lens)], int(in_split.sum()), int(b.nbytes[in_split].sum()))


def _batches(docs, stats: ReadStats, max_docs: int = 512, max_chars: int = 1 << 20):
    """(documents, input bytes read up to them) in groups of about `max_chars` characters."""
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d.text)
        if len(batch) >= max_docs or size >= max_chars:
            yield batch, stats.bytes_read
            batch, size = [], 0
    if batch:
        yield batch, stats.bytes_read


def encode_ahead(encode, batches, workers: int):
    """(encode(docs), mark) for each (docs, mark) of `batches`, in input order, with up to `workers`
    batches encoding at once.

    Threads, not processes: encode_batch releases the GIL and spreads a batch's documents over
    the Rust (Rayon) thread pool, so threads cost no process start-up (a spawned pool took seconds
    to import) and no pickling of texts and ids, and nothing forks after Rayon started (the case
    TOKENIZERS_PARALLELISM=false exists for). Several batches at once keep the cores busy while
    one long document, which Rayon cannot split, finishes; with TOKENIZERS_PARALLELISM=false they
    are the only parallelism. At most workers + 1 batches are held, so memory stays bounded.
    """
    with ThreadPoolExecutor(workers, thread_name_prefix="lmforge-tokenize") as pool:
        pending: deque = deque()
        try:
            for docs, mark in batches:
                pending.append((pool.submit(encode, docs), mark))
                if len(pending) > workers:
                    yield _result(pending.popleft())
            while pending:
                yield _result(pending.popleft())
        finally:
            for f, _ in pending:
                f.cancel()


def _result(pending_batch):
    future, mark = pending_batch
    return future.result(), mark


def plain_backend(be):
    """`be`, or a copy without padding and truncation, which would add pad ids or cut documents."""
    if be.padding is None and be.truncation is None:
        return be
    from tokenizers import Tokenizer

    be = Tokenizer.from_str(be.to_str())
    be.no_padding()
    be.no_truncation()
    return be


def _describe(tokenizer) -> str:
    if tokenizer is None:
        return "default model"
    return str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else type(tokenizer).__name__


@dataclass
class PrepareResult:
    out: Path
    manifest: dict
    stats: ReadStats = field(repr=False)


def prepare(
    data,
    tokenizer,
    out: str | Path,
    val_fraction: float = 0.005,
    seed: int = 0,
    workers: int | None = None,
    on_error: str = "fail",
    text_field: str = "text",
    shard_tokens: int = 1 << 27,
    progress: bool = True,
    log=print,
) -> PrepareResult:
    """Tokenize documents into shards + manifest (see the module docstring). `workers`: batches
    tokenized at once (default: CPU count, at most 8), see encode_ahead."""
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise LmforgeError("shard_tokens must be positive")
    tok = resolve_tokenizer(tokenizer)
    be = backend_of(tok)
    vocab = be.get_vocab_size(with_added_tokens=True)
    eos_id, eos_token = eos_for(tok)
    dtype = dtype_for(vocab)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")) + [out / "manifest.json"]:
        old.unlink(missing_ok=True)  # a re-run must not leave shards of an older, larger run

    stats = ReadStats()
    items = plan(data if isinstance(data, (list, tuple)) else [data], stats)
    for h in stats.heldout_skipped:
        log(f"skipping held-out folder {h}")
    total = total_bytes(items)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    workers = max(1, workers if workers is not None else min(os.cpu_count() or 1, 8))
    encode = batch_encoder(plain_backend(be), eos_id, dtype, val_fraction, seed)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, smoothing=0.1)
    t0 = time.time()
    last = 0
    docs = iter_documents(None, on_error=on_error, text_field=text_field, stats=stats, items=items)
    try:
        with closing(encode_ahead(encode, _batches(docs, stats), workers)) as encoded:
            for batch, mark in encoded:
                write_batch(writers, batch)
                bar.update(mark - last)  # the bar shows input tokenized, not input read ahead
                last = mark
                ntok = writers["train"].tokens + writers["val"].tokens
                bar.set_postfix_str(f"{ntok / max(time.time() - t0, 1e-9):,.0f} tok/s, {ntok:,} tokens", refresh=False)
    finally:
        bar.close()
        results = {s: w.close() for s, w in writers.items()}

    if results["train"]["docs"] + results["val"]["docs"] == 0:
        raise LmforgeError(f"no documents found in {', '.join(map(str, data if isinstance(data, (list, tuple)) else [data]))}")
    if stats.errors:
        log(f"skipped {stats.errors} malformed record(s); first: {stats.messages[0]}")
    if stats.empty:
        log(f"skipped {stats.empty} empty or whitespace-only record(s); first: {stats.empty_where[0]}")
    if val_fraction > 0 and results["val"]["docs"] == 0:
        log(f"warning: no document fell in the val split ({results['train']['docs']} documents, val_fraction {val_fraction})")

    tok_dir = out / "tokenizer"
    if hasattr(tok, "backend"):  # an lmforge Tokenizer writes the HF folder layout
        tok.save(tok_dir)
    else:
        tok_dir.mkdir(exist_ok=True)
        be.save(str(tok_dir / "tokenizer.json"))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eos_id": eos_id,
        "eos_token": eos_token,
        "tokenizer": {"sha256": tokenizer_fingerprint(be), "source": _describe(tokenizer), "dir": "tokenizer"},
        "sources": [str(d) for d in (data if isinstance(data, (list, tuple)) else [data])],
        "text_field": text_field,
        "split": {"val_fraction": val_fraction, "seed": seed, "rule": "sha256(f'{seed}:{doc_id}')[:8] / 2**64 < val_fraction"},
        "train": results["train"],
        "val": results["val"],
        "errors": stats.errors,
        "error_messages": stats.messages,
        "heldout_skipped": stats.heldout_skipped,
        "empty_skipped": stats.empty,
        "seconds": round(time.time() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return PrepareResult(out, manifest, stats)


# ---------------------------------------------------------------------------------------------
# reading (what the trainer calls)


class TokenShards:
    """The shards of one split as one long array of token ids (memory-mapped, read-only)."""

    def __init__(self, files: list[Path], dtype: np.dtype):
        self.files = files
        self.arrays = [np.memmap(f, dtype=dtype, mode="r") if f.stat().st_size else np.zeros(0, dtype) for f in files]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as a new array, across shard boundaries."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"tokens [{start}, {start + n}) outside 0..{len(self)}")
        out, pos = [], start
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while n > 0:
            a, lo = self.arrays[i], pos - int(self.offsets[i])
            part = a[lo : lo + n]
            out.append(np.asarray(part))
            n -= len(part)
            pos += len(part)
            i += 1
        return np.concatenate(out) if out else np.zeros(0, self.arrays[0].dtype if self.arrays else np.uint16)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self.read(start, max(0, stop - start))[::step]
        if key < 0:
            key += len(self)
        return self.read(key, 1)[0]


@dataclass
class PreparedData:
    dir: Path
    manifest: dict
    train: TokenShards
    val: TokenShards

    @property
    def eos_id(self) -> int:
        return self.manifest["eos_id"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def bits_per_byte(self, mean_loss_nats: float, split: str = "val") -> float:
        """Convert a mean per-token loss over the whole split into bits per UTF-8 byte."""
        s = self.manifest[split]
        return mean_loss_nats * s["tokens"] / (s["bytes"] * np.log(2))


def read_manifest(path: str | Path) -> dict:
    d = Path(path)
    mf = d / "manifest.json"
    if not mf.exists():
        raise LmforgeError(f"{d} is not prepared data (no manifest.json; run `lmforge data prepare --out {d}`)")
    try:
        m = json.loads(mf.read_text())
    except ValueError as e:
        raise LmforgeError(f"{mf} is not valid JSON: {e}") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise LmforgeError(f"{mf}: unsupported format {m.get('format')} v{m.get('version')} (expected {FORMAT} v{VERSION})")
    return m


def check_tokenizer(manifest: dict, tokenizer, where: str = "the data") -> None:
    """Raise LmforgeError unless `tokenizer` (an lmforge Tokenizer, a tokenizers.Tokenizer, or a
    path/model spec) is the one the shards were made with."""
    tok = resolve_tokenizer(tokenizer)
    got = tokenizer_fingerprint(tok)
    want = manifest["tokenizer"]["sha256"]
    if got != want:
        vocab = backend_of(tok).get_vocab_size(with_added_tokens=True)
        raise LmforgeError(
            f"{where} was tokenized with another tokenizer (sha256 {want[:12]}…, vocab {manifest['vocab_size']}) "
            f"than the model's (sha256 {got[:12]}…, vocab {vocab}); re-run `lmforge data prepare` with the model's tokenizer"
        )


def open_prepared(path: str | Path, tokenizer=None) -> PreparedData:
    """Open a prepared folder; with `tokenizer`, also check it is the one the shards were made with."""
    d = Path(path)
    m = read_manifest(d)
    if tokenizer is not None:
        check_tokenizer(m, tokenizer, where=str(d))
    dtype = np.dtype(m["dtype"])
    splits = {}
    for split in ("train", "val"):
        files = []
        for s in m[split]["shards"]:
            f = d / s["file"]
            if not f.exists() or f.stat().st_size != s["tokens"] * dtype.itemsize:
                raise LmforgeError(f"{f} is missing or truncated (manifest says {s['tokens']} tokens); re-run lmforge data prepare")
            files.append(f)
        splits[split] = TokenShards(files, dtype)
    return PreparedData(d, m, splits["train"], splits["val"])
