"""Speculative decoding: identical to plain greedy decoding, and the self-draft accepts all."""
from __future__ import annotations

import pytest
import torch

from lmforge.engine import SamplingParams, generate_naive, generate_tokens
from lmforge.errors import LmforgeError
from lmforge.fast.speculative import NgramDrafter, SpecStats, generate_speculative
from test_fast_decode import sharp_tiny


@pytest.mark.parametrize("draft", ["ngram", "self", "self:0", "target"])
def test_speculative_equals_greedy_tiny(draft):
    m = sharp_tiny(n_layers=4)
    prompt = [5, 17, 99, 3, 42, 5, 17, 99, 3]
    p = SamplingParams(max_new_tokens=50)
    st = SpecStats()
    out = [t for _, t in generate_speculative(m, prompt, p, draft=draft, k=4, stats=st)]
    assert out == generate_naive(m, prompt, p)
    assert st.tokens == 50
    if draft == "target":
        assert st.acceptance == 1.0 and st.target_calls < 20


def test_speculative_respects_stops_and_budget():
    m = sharp_tiny()
    prompt = [1, 2, 3, 1, 2]
    plain = generate_naive(m, prompt, SamplingParams(max_new_tokens=30))
    stop = plain[9]
    for p in (SamplingParams(max_new_tokens=7), SamplingParams(max_new_tokens=30, stop_ids={stop})):
        got = [t for _, t in generate_speculative(m, prompt, p, draft="target", k=5)]
        assert got == generate_naive(m, prompt, p)


def test_ngram_drafter_proposes_continuation():
    d = NgramDrafter(n_max=3)
    d.start([], 100)
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert d.propose(ctx, 3) == [4, 5, 9]
    assert d.propose(ctx + [7], 3) == []


def test_speculative_refuses_sampling():
    m = sharp_tiny()
    with pytest.raises(LmforgeError):
        list(generate_speculative(m, [1, 2], SamplingParams(temperature=0.7), draft="ngram"))


def test_default_model_speculative(default_lm):
    lm = default_lm
    text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    prompt = lm.encode_chat([{"role": "user", "content": f"Repeat this code exactly:\n{text}"}])
    p = SamplingParams(max_new_tokens=24)
    stop = lm.tokenizer.stop_ids()
    # plain greedy decoding (the fast path, itself tested against generate_naive)
    plain = [t for _, t in generate_tokens(lm.model, [prompt], p, stop_ids=stop)]
    for draft in ("ngram", "target"):
        st = SpecStats()
        with torch.inference_mode():
            got = [t for _, t in generate_speculative(lm.model, prompt, p, draft=draft, k=4, stop_ids=stop, stats=st)]
        assert got == plain
        if draft == "target":
            assert st.acceptance >= 0.95
        else:
            assert st.accepted > 0  # the reply copies from the prompt
