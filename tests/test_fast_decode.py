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


def _random_lora(model, r=4, seed=0):
    """A LoRA adapter with non-zero B on every attention and MLP layer (fp32)."""
    from lmforge.finetune.lora import LoraSettings, apply_lora, lora_layers

    apply_lora(model, LoraSettings(r=r, alpha=2 * r, targets=["attention", "mlp"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model.eval()


def test_fast_decoder_adds_lora_updates_beside_the_weights():
    """An unmerged adapter runs in the fast decoder (updates beside the fused layers, in their
    interleaved order) with the model's own logits; switched off, the base model's."""
    from lmforge.finetune.lora import set_adapters_enabled

    m = _random_lora(sharp_tiny(n_kv_heads=2))
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    assert unsupported_reason(m) is None
    for enabled in (True, False):
        set_adapters_enabled(m, enabled)
        with torch.no_grad():
            ref = m(ids[None])[0]
            dec = FastDecoder(m)
            dec.reset(16)
            got = torch.cat([dec.forward(ids[:6], all_logits=True)] + [dec.forward(t[None]) for t in ids[6:]])
        assert (got - ref).abs().max().item() <= 1e-4, enabled
    set_adapters_enabled(m, True)
    with torch.no_grad():
        on = m(ids[None])[0]
    assert (on - ref).abs().max().item() > 1e-2  # the adapter changes the outputs it is tested on


def test_a_prompt_continuing_the_cached_one_computes_only_its_new_part(monkeypatch):
    """Prefix reuse in the fast decoder (the next turn of `lmforge chat`): the same tokens as a
    fresh run, with only the new positions computed, through growth of the cache; a different
    prompt, or an adapter switched off in between, computes everything again."""
    from lmforge.finetune.lora import set_adapters_enabled

    m = _random_lora(sharp_tiny(n_kv_heads=2))
    p = SamplingParams(max_new_tokens=8)
    dec = fast_decoder_for(m)
    first = [5, 17, 99, 3, 42, 8, 8, 1]
    out1 = engine_tokens(m, first, p, monkeypatch)
    turn2 = first + out1 + [7, 7, 2]
    out2 = engine_tokens(m, turn2, SamplingParams(max_new_tokens=40), monkeypatch)  # capacity grows
    assert dec.reused == len(first) + len(out1) - 1  # the reply's last token was never fed
    assert out2 == generate_naive(m, turn2, SamplingParams(max_new_tokens=40))
    other = [9, 9, 9, 4]
    assert engine_tokens(m, other, p, monkeypatch) == generate_naive(m, other, p) and dec.reused == 0
    set_adapters_enabled(m, False)
    assert engine_tokens(m, other, p, monkeypatch) == generate_naive(m, other, p) and dec.reused == 0
