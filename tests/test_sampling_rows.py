"""`lmforge.sampling.Row`: the one logits chain and the one end-of-row rule that the engine,
speculative decoding and the server's scheduler share."""
from __future__ import annotations

import pytest
import torch

from lmforge.sampling import Row, SamplingParams, apply_repetition_penalty, context_capacity, process_rows

V = 10


def _row(params=None, prompt=(1, 2), capacity=100, stop=(0,), **kw):
    return Row.start(params or SamplingParams(max_new_tokens=5), list(prompt), capacity, set(stop), V, "cpu", **kw)


def test_logits_chain_bias_penalties_and_bans():
    logits = torch.linspace(-2, 2, V)
    p = SamplingParams(repetition_penalty=1.3)
    row = _row(p, prompt=[3, 7], logit_bias={4: 5.0}, presence_penalty=0.5, frequency_penalty=0.25, banned=[9])
    for t in (5, 5, 6):
        row.accept(t)
    got = row.process(logits)
    want = logits.clone()
    want[4] += 5.0
    seen = torch.zeros(V, dtype=torch.bool)
    seen[[3, 7, 5, 6]] = True
    want = apply_repetition_penalty(want, seen, 1.3)
    want[5] -= 0.5 + 0.25 * 2
    want[6] -= 0.5 + 0.25 * 1
    want[9] = float("-inf")
    assert torch.equal(got, want)
    assert torch.equal(logits, torch.linspace(-2, 2, V))  # the caller's logits are not changed
    plain = _row()
    assert not plain.shapes_logits and process_rows([plain], logits[None]) is not None
    batch = torch.stack([logits, logits])
    out = process_rows([plain, row], batch)
    assert torch.equal(out[0], logits) and torch.equal(out[1], want)


def test_a_row_ends_on_stop_id_budget_context_or_should_stop():
    r = _row()
    assert r.accept(4) and r.finish is None
    assert not r.accept(0) and r.finish == "stop" and r.produced == [4]  # a stop id is not output
    r = _row(SamplingParams(max_new_tokens=2))
    assert r.accept(4) and r.finish is None
    assert r.accept(5) and r.finish == "length"
    r = _row(prompt=[1, 2, 3], capacity=4)  # one token fits after the prompt, then the cache is full
    assert r.accept(4) and r.finish is None
    assert r.accept(5) and r.finish == "length"
    seen_by_callback = []
    r = _row(should_stop=lambda ids: seen_by_callback.append(list(ids)) or ids[-1] == 8)
    assert r.accept(7) and r.finish is None
    assert r.accept(8) and r.finish == "stop"
    assert seen_by_callback == [[7], [7, 8]]  # asked with the token already produced


def test_context_capacity():
    assert context_capacity(100, [10, 30], 20) == 50
    assert context_capacity(40, [10, 30], 20) == 40
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="empty prompt"):
        context_capacity(100, [3, 0], 5)
    with pytest.raises(LmforgeError, match="longer than the model's context of 8"):
        context_capacity(8, [9], 5)


@pytest.mark.parametrize("fast", ["0", "1"])
def test_generate_text_says_length_when_the_context_ends_the_reply(fast, monkeypatch):
    """A reply cut by the model's context (not by max_new_tokens) finishes with "length", as
    OpenAI's API says (it said "stop" before); one cut by the budget too."""
    from conftest import tiny_config

    from lmforge.engine import SamplingParams, generate_text
    from lmforge.model import Transformer

    monkeypatch.setenv("LMFORGE_FAST", fast)
    model = Transformer(tiny_config(max_seq_len=24)).init_weights(seed=0).eval()

    class Tok:  # ids as characters: enough for the text stream
        def stop_ids(self):
            return set()

        def decode(self, ids, **kw):
            return "".join(chr(65 + i % 26) for i in ids)

    prompt = list(range(20))
    out = generate_text(model, Tok(), [prompt], SamplingParams(max_new_tokens=50, temperature=0.0, stop_ids=set()))[0]
    assert out["completion_tokens"] < 50 and out["finish_reason"] == "length", out
    out = generate_text(model, Tok(), [prompt[:5]], SamplingParams(max_new_tokens=3, temperature=0.0, stop_ids=set()))[0]
    assert out["completion_tokens"] == 3 and out["finish_reason"] == "length"
