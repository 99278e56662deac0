"""SentencePiece vocabularies in GGUF (`tokenizer.ggml.model = llama`: Llama 2, Mistral, Gemma,
Phi-3): written by `convert --to gguf` from a Llama-style `tokenizer.json` and read back with
the same ids as the source tokenizer, as `transformers`' GGUF loader and llama.cpp (slow) read
the same file, with and without the space prefix (Llama / Gemma)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from lmforge.tokenizer import Tokenizer

SPACE = "\u2581"
TEXTS = [
    "The keeper's lamp burned at 9:15, and 48 ships came home.",
    "  two leading spaces and   three inside",
    "line one\nline two\n\n  indented",
    "naïve café — Ünïcödé, 東京 and 🚀 fall back to bytes",
    "<s>a special token inside</s> and <start_of_turn>user\nHi<end_of_turn>",
    "",
    " ",
]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
            "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def llama_style(prefix: bool = True) -> Tokenizer:
    """A SentencePiece-style BPE laid out as Llama's: <unk> <s> </s>, the 256 byte tokens, the
    pieces (trained here on the repo's prose, "▁" for spaces), then two turn markers."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFT

    text = (Path(__file__).parent / "data" / "heldout_prose.txt").read_text().split("\n")
    trained = HFT(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    trained.train_from_iterator(text, trainers.BpeTrainer(vocab_size=420, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    vocab = {t: i for i, t in enumerate(head + pieces)}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    bk = HFT(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    bk.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if prefix else []) + [normalizers.Replace(" ", SPACE)])
    bk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    bk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]])
    return Tokenizer(bk, bos_token="<s>", eos_token="</s>", add_bos=True, chat_template=TEMPLATE)


@pytest.fixture(scope="module", params=[True, False], ids=["llama-prefix", "gemma-no-prefix"])
def written(request, tmp_path_factory):
    """(source tokenizer, GGUF path) with a tiny random model of the vocabulary's size."""
    from conftest import tiny_config
    from lmforge.export.gguf import write_gguf
    from lmforge.model import Transformer

    tok = llama_style(prefix=request.param)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size)).init_weights(seed=0).eval()
    path = tmp_path_factory.mktemp("spm") / "m.gguf"
    write_gguf(model, tok, path, "f16")
    return tok, path


def read_back(path) -> Tokenizer:
    from lmforge.loading.gguf_file import read_gguf_file

    return Tokenizer.from_gguf_fields(read_gguf_file(Path(path))[0])


def test_the_file_holds_a_sentencepiece_vocabulary(written):
    import gguf

    tok, path = written
    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert "tokenizer.ggml.merges" not in r.fields
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256  # unknown, control, bytes
    # llama.cpp merges the highest score first: the BPE's first merge makes the best piece
    scores = r.fields["tokenizer.ggml.scores"].contents()
    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    first = tok.backend.token_to_id("".join(merges[0].split(" ") if isinstance(merges[0], str) else merges[0]))
    assert scores[first] == max(scores[259:]) == 0.0
    assert r.fields["tokenizer.ggml.add_space_prefix"].contents() == (tok.encode("a", add_bos=False)[0] == tok.token_to_id(SPACE + "a"))


def test_read_back_encodes_and_decodes_as_the_source(written):
    tok, path = written
    back = read_back(path)
    assert back.add_bos and back.bos_token == "<s>" and back.eos_token == "</s>"
    for text in TEXTS:
        assert back.encode(text, add_bos=False) == tok.encode(text, add_bos=False), text
        assert back.decode(back.encode(text, add_bos=False)) == tok.decode(tok.encode(text, add_bos=False))
    assert back.decode(back.encode("naïve 🚀", add_bos=False)) == "naïve 🚀"
    assert back.encode("🚀", add_bos=False)[-4:] == [back.token_to_id(f"<0x{b:02X}>") for b in "🚀".encode()]


def test_transformers_reads_the_file_with_the_same_ids(written):
    transformers = pytest.importorskip("transformers")
    tok, path = written
    back = read_back(path)
    from lmforge.tokenizer_spm import adds_space_prefix

    if not adds_space_prefix(json.loads(back.backend.to_str())):
        pytest.skip("transformers' GGUF reader puts a space prefix before every text, even where the file says none")
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # plain text only: where a text starts with spaces or follows a special token, transformers
    # writes one "▁" fewer than llama.cpp, which the slow test below holds lmforge to
    for text in [t for t in TEXTS if not t.startswith(" ") and "<" not in t]:
        assert hf.encode(text, add_special_tokens=False) == back.encode(text, add_bos=False), text


def test_a_conversation_encodes_at_once_as_transformers_does(written):
    """SentencePiece puts "▁" before the text and after a special token only: a conversation
    encoded message by message would put one before every message."""
    transformers = pytest.importorskip("transformers")
    from lmforge.chat import render_prompt

    tok, path = written
    back = read_back(path)
    msgs = [{"role": "user", "content": "The keeper's lamp burned at 9:15."}, {"role": "assistant", "content": "Yes, it did."},
            {"role": "user", "content": "And the ships?"}]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<s>", eos_token="</s>")
    hf.chat_template = TEMPLATE
    want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert render_prompt(back, msgs) == render_prompt(tok, msgs) == list(want)


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_file_as_lmforge(written):
    from test_export_gguf import llama_python

    py = llama_python()
    if py is None:
        pytest.skip("llama-cpp-python is not installed (set LMFORGE_LLAMA_PYTHON to a Python that has it)")
    tok, path = written
    script = ("import json, sys\nfrom llama_cpp import Llama\nllm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
              "print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=True) for t in json.loads(sys.argv[2])]))")
    res = subprocess.run([py, "-c", script, str(path), json.dumps(TEXTS)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    back = read_back(path)
    for text, ids in zip(TEXTS, theirs):
        assert back.encode(text, add_bos=False) == ids, text
