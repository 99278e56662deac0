"""Broken files give one-line errors that name the file and the key; nothing is lost silently."""
from __future__ import annotations

import json
import struct

import pytest

from _align_tiny import tiny_lm_dir
from lmforge.errors import LmforgeError


@pytest.mark.parametrize("key,value,says", [
    ("num_hidden_layers", "two", "'num_hidden_layers' must be an integer, got 'two'"),
    ("hidden_size", 64.5, "'hidden_size' must be an integer"),
    ("vocab_size", -3, "'vocab_size' is -3, outside 1.."),
    ("num_attention_heads", True, "'num_attention_heads' must be an integer, got True"),
    ("rms_norm_eps", "tiny", "'rms_norm_eps' must be a finite number"),
    ("num_hidden_layers", None, "'num_hidden_layers' must be an integer, got None"),
])
def test_bad_config_json_names_file_and_key(tmp_path, key, value, says):
    from lmforge.loading import load_model

    d = tiny_lm_dir(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert says in msg and str(d / "config.json") in msg and "\n" not in msg


def test_config_json_that_is_not_an_object(tmp_path):
    from lmforge.loading import load_model

    d = tiny_lm_dir(tmp_path / "m")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(LmforgeError, match="expected a JSON object"):
        load_model(str(d))


def _gguf_header(n_tensors: int, n_kv: int, rest: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + rest


@pytest.mark.parametrize("blob,says", [
    (_gguf_header(2**64 - 1, 0), "tensor count"),
    (_gguf_header(0, 2**63), "metadata key count"),
    (_gguf_header(0, 1, struct.pack("<Q", 2**62) + b"key"), "string byte count"),
    (_gguf_header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**61)), "array element count"),
])
def test_gguf_with_absurd_counts_fails_before_allocating(tmp_path, blob, says):
    from lmforge.loading.gguf_file import read_gguf_file

    path = tmp_path / "bad.gguf"
    path.write_bytes(blob + b"\0" * 64)
    with pytest.raises(LmforgeError) as e:
        read_gguf_file(path)
    assert str(path) in str(e.value) and says in str(e.value) and "\n" not in str(e.value)


def test_empty_records_are_counted_and_reported(tmp_path):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer_train import train_bpe

    rows = [{"text": "a real document about ships and the sea."}, {"text": ""}, {"text": "   \n"},
            {"text": "another real document."}]
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe([r["text"] for r in rows] * 20, vocab_size=300, min_frequency=1)
    tok.save(tmp_path / "tok")
    said = []
    res = prepare([str(src)], str(tmp_path / "tok"), str(tmp_path / "out"), val_fraction=0.0, workers=1,
                  progress=False, log=said.append, on_error="skip")
    assert res.manifest["empty_skipped"] == 2
    assert res.manifest["train"]["docs"] == 2
    assert any("skipped 2 empty or whitespace-only record(s); first: " + f"{src}:2" in s for s in said)


def test_gguf_with_garbage_tensor_data_names_the_tensor(tmp_path):
    """Random bytes over a tensor's data: a one-line error naming it, at load, not a numpy warning
    and a failure minutes later."""
    import numpy as np

    from lmforge.loading.gguf_file import read_gguf, read_gguf_file

    src = tmp_path / "m.gguf"
    from lmforge.export.gguf import write_gguf
    from lmforge.loading import load_model

    model, tok = load_model(str(tiny_lm_dir(tmp_path / "hf")))
    write_gguf(model, tok, src, gguf_type="f16")
    _, tensors = read_gguf_file(src)
    victim = next(t for t in tensors if t.name.endswith("attn_q.weight"))
    raw = bytearray(src.read_bytes())
    start = raw.find(victim.data.tobytes()[:64])
    raw[start:start + 64] = np.full(32, np.float16(np.inf)).tobytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(LmforgeError, match=rf"tensor '{victim.name}' holds non-finite values") as e:
        read_gguf(bad)
    assert str(bad) in str(e.value)
