"""Continuous batching: requests sharing one KV cache decode exactly as the engine does alone."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from lmforge.engine import SamplingParams, generate_tokens
from lmforge.serve import json_mode
from lmforge.serve.scheduler import GenRequest, QueueFull, Scheduler

from conftest import tiny_config


@pytest.fixture(scope="module")
def tok(default_lm):
    return default_lm.tokenizer


@pytest.fixture(scope="module")
def tiny(tok):
    """A random 2-layer model over the default tokenizer's vocabulary (the content is noise)."""
    from lmforge.model import Transformer

    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=tok.vocab_size, max_seq_len=256)).init_weights(seed=0).eval()


@pytest.fixture
def sched(tiny, tok):
    s = Scheduler(tiny, tok, slots=3, ctx=256, max_queue=8)
    yield s
    s.stop()


def run(sched, reqs, timeout=60.0):
    """Submit all requests at once; per request and choice: (token ids, text, finish reason)."""

    async def one(h):
        out = {i: [[], "", None] for i in range(h.req.n)}
        async for ev in h.events():
            o = out[ev.index]
            if ev.token is not None:
                o[0].append(ev.token)
            o[1] += ev.text
            if ev.finish:
                o[2] = ev.finish
        return [tuple(out[i]) for i in range(h.req.n)]

    async def main():
        handles = [sched.submit(r) for r in reqs]
        return await asyncio.gather(*(one(h) for h in handles))

    return asyncio.run(asyncio.wait_for(main(), timeout))


def engine_tokens(model, tok, prompt, params):
    return [t for _, t in generate_tokens(model, [prompt], params, stop_ids=tok.stop_ids())]


def test_batched_greedy_equals_engine(sched, tiny, tok):
    # five prompts of different lengths through three slots: rows join and leave mid-flight
    texts = ["Hello there", "The capital of France is", "a", "One two three four five six seven eight nine", "Why?"]
    budgets = [6, 11, 3, 9, 7]
    prompts = [tok.encode(t) for t in texts]
    reqs = [GenRequest(p, SamplingParams(max_new_tokens=k, temperature=0.0)) for p, k in zip(prompts, budgets)]
    outs = run(sched, reqs)
    for p, k, out in zip(prompts, budgets, outs):
        ids, text, finish = out[0]
        ref = engine_tokens(tiny, tok, p, SamplingParams(max_new_tokens=k, temperature=0.0))
        assert ids == ref
        assert text == tok.decode(ref)
        assert finish == ("length" if len(ref) == k else "stop")
    assert sched.stats.steps > 0 and sched.stats.rows / sched.stats.steps > 1.5  # rows really were batched
    # and the last row left alone moved to the fast decoder (lmforge.serve.lone), its tokens unchanged
    assert 0 < sched.stats.lone_steps < sched.stats.steps
    assert sorted(sched.free) == [0, 1, 2]


def test_seeded_sampling_and_n_choices(sched, tiny, tok):
    prompt = tok.encode("Once upon a time")
    params = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    (choices,) = run(sched, [GenRequest(prompt, SamplingParams(**params), n=3)])
    for i, (ids, _text, _f) in enumerate(choices):  # choice i is seeded with seed + i
        assert ids == engine_tokens(tiny, tok, prompt, SamplingParams(**{**params, "seed": 1234 + i}))
    assert len({tuple(c[0]) for c in choices}) > 1
    (again,) = run(sched, [GenRequest(prompt, SamplingParams(**params), n=3)])
    assert [c[0] for c in again] == [c[0] for c in choices]  # the seed makes it reproducible


def test_long_prompt_is_prefilled_in_chunks(tiny, tok):
    s = Scheduler(tiny, tok, slots=2, ctx=256, prefill_chunk=16)
    try:
        prompt = tok.encode("word " * 80)[:70]
        (out,) = run(s, [GenRequest(prompt, SamplingParams(max_new_tokens=5, temperature=0.0))])
        assert out[0][0] == engine_tokens(tiny, tok, prompt, SamplingParams(max_new_tokens=5, temperature=0.0))
        assert s.stats.prefill_tokens == 70
    finally:
        s.stop()


def test_stop_string_ends_the_row(sched, tok):
    prompt = tok.encode("Tell me a story")
    (first,) = run(sched, [GenRequest(prompt, SamplingParams(max_new_tokens=12, temperature=0.0))])
    ids, text, _ = first[0]
    stop = tok.decode(ids[5:6]).strip() or tok.decode(ids[5:7])
    cut = text.find(stop)
    assert cut >= 0
    (second,) = run(sched, [GenRequest(prompt, SamplingParams(max_new_tokens=12, temperature=0.0, stop=[stop]))])
    assert second[0][1] == text[:cut]
    assert second[0][2] == "stop"


def test_json_mode_output_is_a_json_prefix(sched):
    prompt = [1, 2, 3, 4]
    (out,) = run(sched, [GenRequest(prompt, SamplingParams(max_new_tokens=40, temperature=1.0, seed=3), json_mode=True, n=2)])
    for ids, text, finish in out:
        assert text.startswith("{") and json_mode.is_json_prefix(text)
        if finish == "stop":
            import json

            assert isinstance(json.loads(text), dict)


def test_cancel_frees_the_slot(sched):
    async def main():
        h = sched.submit(GenRequest([1, 2, 3], SamplingParams(max_new_tokens=200, temperature=0.0), ignore_eos=True))
        got = 0
        async for ev in h.events():
            got += 1
            if got == 3:
                h.cancel()
            if ev.finish:
                return ev.finish, got

    finish, got = asyncio.run(asyncio.wait_for(main(), 30))
    assert finish == "cancelled" and got < 200
    deadline = time.time() + 5
    while sorted(sched.free) != [0, 1, 2] and time.time() < deadline:
        time.sleep(0.01)
    assert sorted(sched.free) == [0, 1, 2]


def test_bounded_queue(tiny, tok):
    s = Scheduler(tiny, tok, slots=1, ctx=64, max_queue=2)
    gate = threading.Event()
    real = s._iteration
    s._iteration = lambda: (gate.wait(10), real())  # hold the thread before it admits anything

    async def main():
        reqs = [GenRequest([1, 2], SamplingParams(max_new_tokens=2, temperature=0.0)) for _ in range(3)]
        h1, h2 = s.submit(reqs[0]), s.submit(reqs[1])
        with pytest.raises(QueueFull):
            s.submit(reqs[2])
        gate.set()
        for h in (h1, h2):
            async for ev in h.events():
                pass
        return ev.finish

    try:
        assert asyncio.run(asyncio.wait_for(main(), 30)) in ("stop", "length")
    finally:
        gate.set()
        s.stop()


def test_a_prompt_that_continues_a_slot_prefills_only_the_rest(tiny, tok):
    """Prefix caching: a conversation's next turn (the last prompt + its reply + a new message)
    and a prompt sharing a system prompt reuse a slot's kept keys/values, with the same tokens
    as a fresh engine run; an unrelated prompt takes another slot and computes everything."""
    s = Scheduler(tiny, tok, slots=2, ctx=256)
    greedy = dict(max_new_tokens=6, temperature=0.0)
    try:
        first = tok.encode("System: be brief. User: tell me about the sea")
        (out,) = run(s, [GenRequest(first, SamplingParams(**greedy))])
        reply = out[0][0]
        turn2 = first + reply + tok.encode(" User: and the moon?")
        other = tok.encode("Completely different words here")
        shared = first[:6] + tok.encode(" something else entirely")
        # the reply's last token was sampled but never fed to the model: the slot holds the rest
        for prompt, reused in ((turn2, len(first) + len(reply) - 1), (other, 0), (shared, 6)):
            before = (s.stats.prefix_tokens, s.stats.prefill_tokens)
            (got,) = run(s, [GenRequest(prompt, SamplingParams(**greedy))])
            assert got[0][0] == engine_tokens(tiny, tok, prompt, SamplingParams(**greedy))
            assert s.stats.prefix_tokens - before[0] == reused
            assert s.stats.prefill_tokens - before[1] == len(prompt) - reused
        # the same prompt again reuses all but its last token (whose logits start the reply)
        before = s.stats.prefix_tokens
        (again,) = run(s, [GenRequest(other, SamplingParams(**greedy))])
        assert again[0][0] == engine_tokens(tiny, tok, other, SamplingParams(**greedy))
        assert s.stats.prefix_tokens - before == len(other) - 1
        # every request ran alone, so on the fast decoder: its keys/values came back to the slot
        assert s.stats.lone_steps == s.stats.steps > 0
    finally:
        s.stop()
