"""lmforge data prepare: round trip, deterministic split, shards, manifest checks, malformed input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.data.prepare import (
    check_tokenizer,
    dtype_for,
    is_val,
    open_prepared,
    prepare,
    resolve_tokenizer,
    tokenizer_fingerprint,
)
from lmforge.data.sources import iter_documents
from lmforge.errors import LmforgeError
from lmforge.tokenizer_train import train_bpe

DOCS = {
    "a.txt": "First document.\nIt has two lines.",
    "b.md": "# Second\n\nRussian: Привет, мир! Emoji 🎉.",
    "sub/c.txt": "Third document in a sub-folder, with code: def f(x): return x * 2",
}
JSONL = ["JSONL record one.", "JSONL record two: второй.", "JSONL record three 333."]


@pytest.fixture(scope="module")
def tok():
    corpus = list(DOCS.values()) + JSONL + ["Some more English text to learn merges from. " * 20]
    return train_bpe(corpus, vocab_size=400)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for rel, text in DOCS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "meta": i}) for i, t in enumerate(JSONL)) + "\n\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    (root / ".hidden.txt").write_text("hidden")
    held = root / "heldout"
    held.mkdir()
    (held / ".heldout").write_text("")
    (held / "eval.txt").write_text("HELD OUT TEXT")
    return root


def all_docs() -> set[str]:
    return set(DOCS.values()) | set(JSONL)


def decode_split(tok, shards, eos_id) -> list[str]:
    ids = shards.read(0, len(shards)).tolist()
    assert not ids or ids[-1] == eos_id
    docs, cur = [], []
    for i in ids:
        if i == eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def test_round_trip_and_manifest(tok, corpus, tmp_path):
    out = tmp_path / "out"
    ids = [d.id for d in iter_documents([corpus])]
    seed = next(s for s in range(100) if 0 < sum(is_val(i, 0.4, s) for i in ids) < len(ids))  # both splits used
    r = prepare([corpus], tok, out, val_fraction=0.4, seed=seed, workers=1, progress=False, log=lambda m: None)
    m = r.manifest
    assert m["dtype"] == "uint16" and m["eos_token"] == "<|endoftext|>" and m["eos_id"] == 0
    assert m["train"]["docs"] + m["val"]["docs"] == 6 and m["val"]["docs"] > 0 and m["train"]["docs"] > 0
    assert m["heldout_skipped"] == [str(corpus / "heldout")]
    data = open_prepared(out, tokenizer=tok)
    train, val = decode_split(tok, data.train, data.eos_id), decode_split(tok, data.val, data.eos_id)
    assert set(train) | set(val) == all_docs() and not set(train) & set(val)
    assert "HELD OUT TEXT" not in train + val and "hidden" not in train + val
    # documents come out in input order, each followed by EOS
    order = [d.text for d in iter_documents([corpus])]
    assert train == [d for d in order if d in train]
    # byte and token counts
    assert m["train"]["bytes"] + m["val"]["bytes"] == sum(len(d.encode()) for d in all_docs())
    assert m["train"]["tokens"] == len(data.train) and m["val"]["tokens"] == len(data.val)
    assert m["tokenizer"]["sha256"] == tokenizer_fingerprint(tok)
    # the saved copy of the tokenizer is the same tokenizer, and passes the check
    check_tokenizer(m, str(out / "tokenizer"))
    assert data.bits_per_byte(np.log(2), "val") == pytest.approx(m["val"]["tokens"] / m["val"]["bytes"])


def test_split_is_deterministic_and_by_id_only(tok, corpus, tmp_path):
    a = prepare([corpus], tok, tmp_path / "a", val_fraction=0.4, workers=1, progress=False, log=lambda m: None)
    b = prepare([corpus], tok, tmp_path / "b", val_fraction=0.4, workers=2, shard_tokens=7, progress=False, log=lambda m: None)
    ta, tb = open_prepared(tmp_path / "a"), open_prepared(tmp_path / "b")
    # same tokens whatever the worker count and shard size
    assert np.array_equal(ta.train.read(0, len(ta.train)), tb.train.read(0, len(tb.train)))
    assert np.array_equal(ta.val[:], tb.val[:])
    assert len(b.manifest["train"]["shards"]) > 1 and all(s["tokens"] <= 7 for s in b.manifest["train"]["shards"])
    ids = [d.id for d in iter_documents([corpus])]
    assert [is_val(i, 0.4, 0) for i in ids] == [is_val(i, 0.4, 0) for i in ids]
    assert sum(is_val(f"doc{i}", 0.25, 0) for i in range(4000)) == pytest.approx(1000, abs=100)
    assert [is_val(f"doc{i}", 0.25, 0) for i in range(50)] != [is_val(f"doc{i}", 0.25, 1) for i in range(50)]
    assert a.manifest["val"]["docs"] == sum(is_val(i, 0.4, 0) for i in ids)


def test_shards_read_across_boundaries(tok, corpus, tmp_path):
    prepare([corpus], tok, tmp_path / "o", val_fraction=0.0, shard_tokens=5, workers=1, progress=False, log=lambda m: None)
    d = open_prepared(tmp_path / "o")
    full = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in d.train.files])
    assert len(d.train.files) > 3 and len(full) == len(d.train)
    for start, n in [(0, 1), (3, 9), (4, 1), (len(full) - 6, 6), (0, len(full))]:
        assert np.array_equal(d.train.read(start, n), full[start : start + n])
    assert d.train[7] == full[7] and np.array_equal(d.train[2:13:3], full[2:13:3])
    with pytest.raises(IndexError):
        d.train.read(len(full) - 1, 2)
    assert len(d.val) == 0


def test_manifest_check_rejects_other_tokenizer(tok, corpus, tmp_path):
    prepare([corpus], tok, tmp_path / "o", workers=1, progress=False, log=lambda m: None)
    other = train_bpe(["completely different text " * 30], vocab_size=300)
    with pytest.raises(LmforgeError, match="another tokenizer"):
        open_prepared(tmp_path / "o", tokenizer=other)
    open_prepared(tmp_path / "o", tokenizer=tok.backend)  # a bare tokenizers.Tokenizer works too
    # a truncated shard is caught
    shard = tmp_path / "o" / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(LmforgeError, match="truncated"):
        open_prepared(tmp_path / "o")
    with pytest.raises(LmforgeError, match="no manifest.json"):
        open_prepared(tmp_path)


def test_malformed_jsonl_fail_and_skip(tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "good one"}\n{"text": "good two"}\n{"text": broken\n{"other": 1}\n{"text": 5}\n{"text": "good three"}\n')
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:3: malformed JSON line"):
        prepare([f], tok, tmp_path / "o", workers=1, progress=False)
    logs: list[str] = []
    r = prepare([f], tok, tmp_path / "o", on_error="skip", workers=1, progress=False, log=logs.append)
    assert r.manifest["errors"] == 3 and r.manifest["train"]["docs"] + r.manifest["val"]["docs"] == 3
    assert any("bad.jsonl:4: field 'text' missing" in m for m in r.manifest["error_messages"])
    assert any("bad.jsonl:5: field 'text' not a string" in m for m in r.manifest["error_messages"])
    assert any("skipped 3 malformed" in m for m in logs)


def test_cli_prepare(tok, corpus, tmp_path, capsys):
    from lmforge.cli.main import main

    tok.save(tmp_path / "tok")
    out = tmp_path / "o"
    assert main(["data", "prepare", "--data", str(corpus), "--tokenizer", str(tmp_path / "tok" / "tokenizer.json"),
                 "--out", str(out), "--workers", "1", "--val-fraction", "0.3"]) == 0
    assert "train" in capsys.readouterr().out and (out / "manifest.json").exists()
    (corpus / "e.jsonl").write_text('{"text": "ok"}\nnot json\n')
    assert main(["data", "prepare", "--data", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it: the progress bar
    assert last.startswith("error: ") and "e.jsonl:2: malformed JSON line" in last
    assert main(["data", "prepare", "--data", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(out),
                 "--workers", "1", "--on-error", "skip"]) == 0
    assert "1 malformed records skipped" in capsys.readouterr().out


def test_parquet_and_hf_dataset(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row one", "parquet row two"], "n": [1, 2]}), tmp_path / "t.parquet")
    docs = list(iter_documents([tmp_path / "t.parquet"]))
    assert [(d.id, d.text) for d in docs] == [("t.parquet:1", "parquet row one"), ("t.parquet:2", "parquet row two")]
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["hf row one", "hf row two", "hf row three"]})
    ds.save_to_disk(str(tmp_path / "hfds"))
    r = prepare([tmp_path / "hfds", tmp_path / "t.parquet"], tok, tmp_path / "o", val_fraction=0.0, workers=1, progress=False)
    assert r.manifest["train"]["docs"] == 5
    d = open_prepared(tmp_path / "o")
    assert decode_split(tok, d.train, 0) == ["hf row one", "hf row two", "hf row three", "parquet row one", "parquet row two"]


def test_dtype_by_vocab_and_errors(tok, tmp_path):
    assert dtype_for(49152) == np.uint16 and dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    assert dtype_for(151_000) == np.uint32
    with pytest.raises(LmforgeError, match="data path not found"):
        prepare([tmp_path / "missing"], tok, tmp_path / "o", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmforgeError, match="no readable files"):
        prepare([empty], tok, tmp_path / "o", progress=False)
    assert resolve_tokenizer(tok) is tok


def test_default_model_tokenizer(default_model_path, tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("The capital of France is Paris.")
    r = prepare([f], None, tmp_path / "o", val_fraction=0.0, workers=1, progress=False)
    m = r.manifest
    assert m["vocab_size"] == 49152 and m["dtype"] == "uint16" and m["eos_token"] == "<|endoftext|>" and m["eos_id"] == 0
    # the copy saved beside the shards is the default model's tokenizer (loading the GGUF's takes
    # seconds, so it is loaded once, by prepare)
    d = open_prepared(tmp_path / "o", tokenizer=str(tmp_path / "o" / "tokenizer"))
    assert int(d.train[-1]) == 0 and len(d.train) > 5
    assert d.manifest["tokenizer"]["source"] == "default model"
