"""The fast mode is the default of the inference commands: --quant auto (int8 on CPU) and
--draft auto (prompt-lookup speculative decoding when greedy), with unchanged greedy output."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.quant import QuantLinear, _fbgemm_available, resolve_quant


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random model with the default model's tokenizer, saved as an HF folder."""
    from _align_tiny import tiny_lm_dir
    from lmforge.loading.resolve import default_model_path

    if default_model_path() is None:
        pytest.skip("default model (its tokenizer) not installed")
    return tiny_lm_dir(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def sharp_lm(tiny_dir):
    """The tiny model with larger weights, so greedy choices are not near ties (a k-row and a
    one-row matmul round differently; a near tie could flip either way)."""
    import lmforge

    lm = lmforge.load(tiny_dir)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return lm


def test_auto_quant_is_int8_on_cpu_and_none_on_gpu():
    assert resolve_quant("auto", "cpu", "fp32") == ("int8" if _fbgemm_available() else "none")
    assert resolve_quant("auto", "cuda", "fp32") == "none"  # fbgemm's int8 kernels are CPU-only
    assert resolve_quant("auto", "cpu", "bf16") == "none"  # asked-for half weights are what runs
    assert resolve_quant("int4", "cpu", "fp32") == "int4" and resolve_quant(None) == "none"
    with pytest.raises(LmforgeError, match="unknown --quant 'int3'"):
        resolve_quant("int3")


def test_inference_commands_default_to_the_fast_mode_and_training_does_not():
    from lmforge.cli.commands import chat, eval, generate, serve
    from lmforge.config import parse_args

    for mod in (chat, generate):
        cfg = parse_args(mod.Config, [])
        assert cfg.quant == "auto" and cfg.dtype == "fp32" and cfg.draft == "auto"
    assert parse_args(serve.Config, []).quant == "auto"
    assert parse_args(eval.Config, []).quant == "none"  # scores are measured on exact weights


@pytest.mark.skipif(not _fbgemm_available(), reason="this torch build has no fbgemm int8 kernels")
def test_load_auto_quantizes_on_cpu_and_api_default_stays_exact(tiny_dir):
    import lmforge
    from lmforge.cli.common import runtime_summary

    auto = lmforge.load(tiny_dir, quant="auto")
    assert auto.model.quant == "int8" and isinstance(auto.model.lm_head, QuantLinear)
    exact = lmforge.load(tiny_dir)
    assert not any(isinstance(m, QuantLinear) for m in exact.model.modules())
    assert runtime_summary(auto).startswith("int8 weights, fp32, cpu")
    from lmforge.cli.commands import chat
    from lmforge.config import parse_args

    assert runtime_summary(auto, parse_args(chat.Config, [])) == "int8 weights (--quant auto), fp32, cpu, draft auto"


def _count_speculative(monkeypatch) -> list:
    import lmforge.fast.speculative as spec

    calls = []
    real = spec.speculate  # the generation loop's speculative step strategy

    def counting(target, prompt, row, draft, *a, **kw):
        calls.append(draft)
        return real(target, prompt, row, draft, *a, **kw)

    monkeypatch.setattr(spec, "speculate", counting)
    return calls


def test_draft_ngram_equals_no_draft_at_temperature_0(sharp_lm, monkeypatch):
    lm = sharp_lm
    calls = _count_speculative(monkeypatch)
    prompt = "the cat sat on the mat and the cat sat on the mat and the cat"
    plain = lm.generate(prompt, max_new_tokens=40, draft="none")
    assert calls == []
    for draft in ("ngram", "auto", "self:0", "target"):
        assert lm.generate(prompt, max_new_tokens=40, draft=draft) == plain, draft
    assert len(calls) == 4
    msgs = [{"role": "user", "content": "Repeat: one two three one two three"}]
    assert lm.chat(msgs, max_new_tokens=30, draft="ngram") == lm.chat(msgs, max_new_tokens=30)
    streamed = "".join(lm.chat(msgs, max_new_tokens=30, draft="auto", stream=True))
    assert streamed == lm.chat(msgs, max_new_tokens=30)


def test_draft_auto_samples_plainly_and_batches_ignore_it(sharp_lm, monkeypatch):
    lm = sharp_lm
    calls = _count_speculative(monkeypatch)
    a = lm.generate("hello there", max_new_tokens=12, temperature=0.8, seed=3, draft="auto")
    assert a == lm.generate("hello there", max_new_tokens=12, temperature=0.8, seed=3)
    assert lm.generate(["one", "two"], max_new_tokens=5, draft="ngram") == lm.generate(["one", "two"], max_new_tokens=5)
    assert calls == []


def test_draft_model_from_a_path(sharp_lm, tiny_dir):
    # the unscaled tiny model drafts for the sharp one (same vocabulary): same output
    prompt = "a b c a b c a b"
    assert sharp_lm.generate(prompt, max_new_tokens=16, draft=str(tiny_dir)) == sharp_lm.generate(prompt, max_new_tokens=16)


def test_bad_draft_values_are_one_line_errors(sharp_lm, tiny_dir, capsys):
    from lmforge.cli.main import main

    with pytest.raises(LmforgeError, match="unknown draft 'bogus'"):
        sharp_lm.generate("x", draft="bogus")
    with pytest.raises(LmforgeError, match="needs greedy decoding"):
        sharp_lm.generate("x", draft="ngram", temperature=0.7)
    with pytest.raises(LmforgeError, match="does not exist"):
        sharp_lm.generate("x", draft="self:0,7")
    for args, needle in ((["--draft", "bogus"], "unknown draft 'bogus'"), (["--draft", "self:a-b"], "bad draft layers"),
                         (["--draft", "ngram", "--temperature", "0.7"], "needs greedy decoding")):
        capsys.readouterr()
        code = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2", *args])
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def test_auto_drafter_needs_a_three_token_match():
    from lmforge.fast.speculative import auto_drafter

    d = auto_drafter()
    d.start([], 100)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3], 3) == []  # only a 2-token match ([2, 3])
    assert d.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == [4, 5, 9]


def test_an_already_quantized_gguf_is_not_rounded_twice(tmp_path, tiny_dir):
    """--quant auto on a CPU: int8 for full-precision weights, but a GGUF that is already 4- or
    8-bit runs its own blocks (the native kernels; fp16 copies of its own numbers where those
    cannot be built): int8 on top of Q4_1 changed the default model's answers
    (benchmarks/results/default_fidelity.json)."""
    import lmforge
    from lmforge import native
    from lmforge.export.gguf import write_gguf
    from lmforge.loading.gguf_file import gguf_is_quantized
    from lmforge.native.linear import BlockLinear
    from lmforge.quant import resolve_precision

    lm = lmforge.load(tiny_dir)
    for kind, quantized in (("f16", False), ("q8_0", True)):
        path = write_gguf(lm.model, lm.tokenizer, tmp_path / f"m-{kind}.gguf", gguf_type=kind)
        assert gguf_is_quantized(path) is quantized
        auto = lmforge.load(str(path), quant="auto", device="cpu")
        assert isinstance(auto.model.lm_head, BlockLinear) is (quantized and native.library() is not None), kind
        assert (getattr(auto.model, "quant", "none") == "int8") is not quantized, kind
    own = ("fp32", "gguf") if native.library() is not None else ("fp16", "none")
    assert resolve_precision("fp32", "auto", "cpu", quantized_source=True) == own
    assert resolve_precision("fp32", "none", "cpu", quantized_source=True) == ("fp32", "none")  # asked for exact
    assert resolve_precision("bf16", "auto", "cpu", quantized_source=True) == ("bf16", "none")


def test_the_readme_question_gets_the_right_answer_by_default(default_model_path, capsys):
    """`lmforge generate` with every default (the README's example) answers Paris."""
    from conftest import run_cli

    r = run_cli(capsys, "generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "24",
                "--stream", "false")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
