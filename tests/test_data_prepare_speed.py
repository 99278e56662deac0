"""lmforge data prepare's batched, threaded path writes exactly what encoding each document alone gives."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from lmforge.data import prepare as P
from lmforge.data.sources import iter_documents
from lmforge.errors import LmforgeError
from lmforge.tokenizer_train import train_bpe

WORDS = "the quick brown fox jumps over a lazy dog while Привет мир 🎉 code: def f(x): return x * 2 and 12345".split()


def make_corpus(root, n_files=40, n_lines=60, seed=0):
    """Text files and JSONL of varied length (one long document, unicode, blank-only lines skipped)."""
    rng = np.random.default_rng(seed)

    def text(n):
        return " ".join(rng.choice(WORDS, n)) + rng.choice(["", "\n", "\n\n", "  "])

    (root / "sub").mkdir(parents=True)
    for i in range(n_files):
        (root / ("sub" if i % 3 else ".") / f"doc{i:03d}.txt").write_text(text(int(rng.integers(1, 300))))
    (root / "long.md").write_text("\n".join(text(200) for _ in range(40)))
    lines = [json.dumps({"text": text(int(rng.integers(1, 80)))}) for _ in range(n_lines)]
    lines.insert(7, json.dumps({"text": "   "}))  # whitespace only: not a document
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root


def reference_prepare(data, tok, val_fraction, seed, shard_tokens, on_error="fail"):
    """{file name: bytes} and the split summaries, from one `encode` per document."""
    be = P.backend_of(tok)
    eos_id, _ = P.eos_for(tok)
    dtype = P.dtype_for(be.get_vocab_size(with_added_tokens=True))
    ids = {"train": [], "val": []}
    summary = {s: {"docs": 0, "tokens": 0, "bytes": 0, "shards": []} for s in ids}
    for d in iter_documents([data], on_error=on_error):
        split = "val" if P.is_val(d.id, val_fraction, seed) else "train"
        doc = be.encode(d.text, add_special_tokens=False).ids + [eos_id]
        ids[split] += doc
        summary[split]["docs"] += 1
        summary[split]["bytes"] += len(d.text.encode("utf-8"))
    files = {}
    for split, all_ids in ids.items():
        arr = np.asarray(all_ids, dtype=dtype)
        summary[split]["tokens"] = len(arr)
        for k, start in enumerate(range(0, len(arr), shard_tokens)):
            name = f"{split}_{k:03d}.bin"
            files[name] = arr[start : start + shard_tokens].tobytes()
            summary[split]["shards"].append({"file": name, "tokens": len(files[name]) // dtype.itemsize})
    return files, summary


def shard_files(out):
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.bin"))}


@pytest.fixture(scope="module")
def tok():
    return train_bpe([" ".join(WORDS) * 5, "JSONL and text documents " * 20], vocab_size=320)


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 3 documents, so a small corpus makes many batches and several are in flight."""
    monkeypatch.setattr(P, "_batches", functools.partial(P._batches, max_docs=3))


@pytest.mark.parametrize("workers,shard_tokens,val_fraction", [(1, 1 << 27, 0.3), (3, 97, 0.3), (2, 50, 0.0), (4, 1000, 0.9)])
def test_shards_and_manifest_match_per_document_encode(tok, tmp_path, small_batches, workers, shard_tokens, val_fraction):
    data = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    r = P.prepare([data], tok, out, val_fraction=val_fraction, seed=1, workers=workers, shard_tokens=shard_tokens,
                  progress=False, log=lambda m: None)
    files, summary = reference_prepare(data, tok, val_fraction, 1, shard_tokens)
    assert shard_files(out) == files
    assert {s: r.manifest[s] for s in ("train", "val")} == summary
    assert r.manifest["tokenizer"]["sha256"] == P.tokenizer_fingerprint(tok)
    assert json.loads((out / "manifest.json").read_text()) == r.manifest


def test_same_bytes_for_any_worker_count_and_tokenizers_parallelism(tok, tmp_path, small_batches, monkeypatch):
    data = make_corpus(tmp_path / "corpus", seed=3)
    outs = []
    for i, (workers, parallel) in enumerate([(1, "true"), (2, "false"), (5, "false"), (3, "true")]):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallel)
        r = P.prepare([data], tok, tmp_path / f"o{i}", val_fraction=0.2, workers=workers, shard_tokens=64,
                      progress=False, log=lambda m: None)
        manifest = {k: v for k, v in r.manifest.items() if k != "seconds"}
        outs.append((shard_files(tmp_path / f"o{i}"), manifest))
    assert all(o == outs[0] for o in outs[1:])


def test_uint32_ids_for_a_large_vocabulary(tmp_path):
    big = train_bpe(["plain words here " * 30], vocab_size=300)
    big.backend.add_tokens([f"zq{i}" for i in range(66_000)])  # ids past 65535: the shards hold uint32
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"plain zq{i} words zq65999"}) for i in range(0, 66_000, 997)) + "\n")
    r = P.prepare([f], big, tmp_path / "o", val_fraction=0.1, workers=2, shard_tokens=40, progress=False, log=lambda m: None)
    files, summary = reference_prepare(f, big, 0.1, 0, 40)
    assert r.manifest["dtype"] == "uint32" and shard_files(tmp_path / "o") == files
    assert {s: r.manifest[s] for s in ("train", "val")} == summary
    assert int(np.frombuffer(files["train_000.bin"], np.uint32).max()) > 65535


def test_padding_and_truncation_settings_do_not_reach_the_shards(tok, tmp_path):
    data = make_corpus(tmp_path / "corpus", n_files=6, n_lines=5)
    padded = train_bpe([" ".join(WORDS) * 5, "JSONL and text documents " * 20], vocab_size=320)
    padded.backend.enable_padding(pad_id=1, pad_token="<|pad|>")
    padded.backend.enable_truncation(max_length=8)
    P.prepare([data], padded, tmp_path / "o", val_fraction=0.0, workers=2, progress=False, log=lambda m: None)
    files, _ = reference_prepare(data, tok, 0.0, 0, 1 << 27)
    assert shard_files(tmp_path / "o") == files
    assert padded.backend.truncation["max_length"] == 8 and padded.backend.padding is not None  # the caller's copy is untouched


def test_malformed_record_mid_stream(tok, tmp_path, small_batches):
    data = make_corpus(tmp_path / "corpus")
    lines = (data / "records.jsonl").read_text().splitlines()
    lines[40] = '{"text": broken'
    (data / "records.jsonl").write_text("\n".join(lines) + "\n")
    threads = threading.active_count()
    with pytest.raises(LmforgeError) as e:
        P.prepare([data], tok, tmp_path / "o", workers=3, progress=False, log=lambda m: None)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{data / 'records.jsonl'}:41: malformed JSON line")
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert threading.active_count() == threads  # no tokenizing thread outlives the error
    r = P.prepare([data], tok, tmp_path / "o", on_error="skip", val_fraction=0.3, workers=3, shard_tokens=100,
                  progress=False, log=lambda m: None)
    files, summary = reference_prepare(data, tok, 0.3, 0, 100, on_error="skip")
    assert r.manifest["errors"] == 1 and shard_files(tmp_path / "o") == files
    assert {s: r.manifest[s] for s in ("train", "val")} == summary


def test_tokenizer_file_loads_without_torch(tok, tmp_path):
    tok.save(tmp_path / "tok")
    code = (
        "import sys; from lmforge.data.prepare import resolve_tokenizer, tokenizer_fingerprint\n"
        f"a = resolve_tokenizer({str(tmp_path / 'tok')!r}); b = resolve_tokenizer({str(tmp_path / 'tok' / 'tokenizer.json')!r})\n"
        "print(tokenizer_fingerprint(a), tokenizer_fingerprint(b), a.eos_token, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    fp = P.tokenizer_fingerprint(tok)
    assert out == [fp, fp, "<|endoftext|>", "False"]
