"""The static-cache fast decoder against the oracle (`generate_naive`) and the general engine."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from lmforge.engine import SamplingParams, generate_naive, generate_tokens
from lmforge.fast.decode import FastDecoder, fast_decoder_for, interleave_order, unsupported_reason
from lmforge.model import Transformer


def sharp_tiny(**kw):
    """A tiny random model with larger weights, so greedy choices are not near ties."""
    torch.manual_seed(0)
    m = Transformer(tiny_config(**kw)).init_weights(seed=0).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


def engine_tokens(model, prompt, params, monkeypatch=None, fast=True, **kw):
    if monkeypatch is not None:
        monkeypatch.setenv("LMFORGE_FAST", "1" if fast else "0")
    return [t for _, t in generate_tokens(model, [prompt], params, **kw)]


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1}, {"attention_bias": True}, {"tie_embeddings": True}])
def test_fast_greedy_equals_naive_tiny(kw, monkeypatch):
    m = sharp_tiny(**kw)
    prompt = [5, 17, 99, 3, 42]
    p = SamplingParams(max_new_tokens=40)
    assert fast_decoder_for(m) is not None
    assert engine_tokens(m, prompt, p, monkeypatch) == generate_naive(m, prompt, p)


def test_fast_logits_equal_full_forward():
    m = sharp_tiny()
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    with torch.no_grad():
        ref = m(ids[None])[0]
        dec = FastDecoder(m)
        dec.reset(32)
        got = [dec.forward(ids[:6], all_logits=True)]  # prefill
        got.append(dec.forward(ids[6:9], all_logits=True))  # a chunk after a prefix
        for t in ids[9:]:
            got.append(dec.forward(t[None]))  # single tokens
    assert (torch.cat(got) - ref).abs().max().item() <= 1e-4
    assert dec.pos == len(ids)


def test_interleave_order_is_a_permutation_per_head():
    o = interleave_order(3, 8)
    assert sorted(o.tolist()) == list(range(24))
    assert o[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_stops_budget_and_callbacks_match_general_engine(monkeypatch):
    m = sharp_tiny()
    prompt = [7, 8, 9]
    general = engine_tokens(m, prompt, SamplingParams(max_new_tokens=30), monkeypatch, fast=False)
    stop_tok = general[5]
    for params, kw in [
        (SamplingParams(max_new_tokens=30, stop_ids={stop_tok}), {}),
        (SamplingParams(max_new_tokens=7), {}),
        (SamplingParams(max_new_tokens=30), {"should_stop": lambda b, ids: len(ids) == 4}),
        (SamplingParams(max_new_tokens=30, repetition_penalty=1.3), {}),
    ]:
        a = engine_tokens(m, prompt, params, monkeypatch, fast=True, **kw)
        b = engine_tokens(m, prompt, params, monkeypatch, fast=False, **kw)
        assert a == b


def test_seeded_sampling_is_deterministic(monkeypatch):
    m = sharp_tiny()
    p = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=123)
    a = engine_tokens(m, [1, 2, 3], p, monkeypatch)
    assert a == engine_tokens(m, [1, 2, 3], p, monkeypatch)
    other = engine_tokens(m, [1, 2, 3], SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7), monkeypatch)
    assert a != other


def test_decoder_rebuilt_after_weight_change(monkeypatch):
    m = sharp_tiny()
    p = SamplingParams(max_new_tokens=20)
    d1 = fast_decoder_for(m)
    assert fast_decoder_for(m) is d1  # cached
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(-3.0)
    assert fast_decoder_for(m) is not d1
    assert engine_tokens(m, [4, 5, 6], p, monkeypatch) == generate_naive(m, [4, 5, 6], p)


def test_falls_back_for_hooks_and_env(monkeypatch):
    m = sharp_tiny()
    h = m.model.layers[1].register_forward_hook(lambda mod, i, o: None)
    assert "hooks" in unsupported_reason(m)
    assert fast_decoder_for(m) is None
    h.remove()
    monkeypatch.setenv("LMFORGE_FAST", "0")
    assert fast_decoder_for(m) is None


def test_default_model_fast_equals_naive(default_lm, monkeypatch):
    lm = default_lm
    prompt = lm.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    p = SamplingParams(max_new_tokens=24)
    stop = lm.tokenizer.stop_ids()
    fast = engine_tokens(lm.model, prompt, p, monkeypatch, stop_ids=stop)
    assert fast == generate_naive(lm.model, prompt, p, stop_ids=stop)
    assert lm.tokenizer.decode(fast).startswith("The capital of France is Paris")
