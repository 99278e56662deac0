"""Tokenizers: ids equal transformers' on the default model; tiktoken files; saved files load in HF."""
import base64

import pytest

from lmforge.loading import load_tokenizer
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's a test, isn't it?",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "code": "def add(a, b):\n    return a + b  # sum\n\nclass Foo:\n\tpass\n",
    "emoji": "I love 🍕 and 🐍! 👍🏽 Ünïcödé — “quotes”…",
    "chat": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def ours(default_model_path):
    return load_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def theirs(default_model_path):
    return transformers.AutoTokenizer.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name)


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_ids_equal_transformers(ours, theirs, kind):
    text = TEXTS[kind]
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


def test_digits_split_one_per_token_as_llama_cpp_smollm(ours):
    # llama.cpp's "smollm" pre-tokenizer isolates every digit (transformers' GGUF loader does not)
    ids = ours.encode("12345")
    assert [ours.decode([i]) for i in ids] == list("12345")


def test_special_ids(ours):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert ours.token_to_id("<|im_end|>") in ours.stop_ids()
    assert "<|im_start|>" in ours.special_tokens


def test_saved_tokenizer_loads_in_transformers(ours, tmp_path):
    ours.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS.values():
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    again = Tokenizer.from_dir(tmp_path)
    assert again.chat_template == ours.chat_template and again.eos_token == "<|im_end|>"


def test_tiktoken_file_round_trip(tmp_path):
    """A tiny tiktoken-format file: merges are recovered from ranks and encoding is BPE by rank."""
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" t", b" the", b"he"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    tok = Tokenizer.from_tiktoken(path)
    ids = tok.encode("the theme")
    assert tok.decode(ids) == "the theme"
    assert ids[0] == 257 and 259 in ids  # "the", " the"
    assert tok.eos_id == 261
