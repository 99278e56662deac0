"""The server runs the default model with lmforge's tool adapter for requests that carry tools,
row by row: in a batch that mixes requests with and without tools each row decodes as it would
alone (adapter on or off), a kept prompt prefix is reused only by a request that runs the same
way, and a request with tools gets a calculator call back through the OpenAI API."""
from __future__ import annotations

import pytest

from lmforge.engine import SamplingParams
from lmforge.serve.scheduler import GenRequest, Scheduler

from test_serve_scheduler import run

QUESTION = [{"role": "user", "content": "What is 48213 * 9127?"}]
CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
                                         "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                        "required": ["expression"]}}}


@pytest.fixture(scope="module")
def lm(default_model_path):
    """The default model as the server loads it (the file's own blocks), a copy of its own: the
    adapter gets attached to it."""
    import lmforge
    from lmforge.tools.shipped import shipped_tool_adapter

    if shipped_tool_adapter() is None:
        pytest.skip("the tool adapter's weights are not in this checkout")
    return lmforge.load(str(default_model_path), device="cpu")


def alone(lm, prompt, adapter: bool, n: int = 12) -> list[int]:
    """Greedy tokens from a scheduler of one slot running only this request."""
    s = Scheduler(lm.model, lm.tokenizer, slots=1, ctx=512)
    try:
        (out,) = run(s, [GenRequest(prompt, SamplingParams(max_new_tokens=n, temperature=0.0), adapter=adapter)])
        return out[0][0]
    finally:
        s.stop()


def test_a_batch_mixing_tool_and_plain_requests_decodes_each_row_as_alone(lm):
    from lmforge.chat import render_prompt
    from lmforge.tools.shipped import attach_tool_adapter

    assert attach_tool_adapter(lm.model)
    tool_prompt = render_prompt(lm.tokenizer, QUESTION, tools=[CALC])
    plain_prompt = render_prompt(lm.tokenizer, [{"role": "user", "content": "Name a color."}])
    want_tool, want_plain = alone(lm, tool_prompt, True), alone(lm, plain_prompt, False)
    assert lm.tokenizer.decode(want_tool).startswith("<tool_call>")  # the adapter at work
    assert alone(lm, tool_prompt, False) != want_tool  # (the file alone answers otherwise)

    s = Scheduler(lm.model, lm.tokenizer, slots=3, ctx=512)
    try:
        params = SamplingParams(max_new_tokens=12, temperature=0.0)
        outs = run(s, [GenRequest(tool_prompt, params, adapter=True), GenRequest(plain_prompt, params),
                       GenRequest(plain_prompt, params, adapter=True)])
        assert outs[0][0][0] == want_tool and outs[1][0][0] == want_plain
        assert s.stats.rows / s.stats.steps > 1.5  # batched together
        # the same tool prompt again without the adapter: the slot holding it was computed with the
        # adapter, so only what it shares with the plain prompt's slot is reused
        before = s.stats.prefix_tokens
        (again,) = run(s, [GenRequest(tool_prompt, params)])
        assert again[0][0] == alone(lm, tool_prompt, False)
        common = next(i for i, (a, b) in enumerate(zip(tool_prompt, plain_prompt)) if a != b)
        assert s.stats.prefix_tokens - before == common < len(tool_prompt) // 2
    finally:
        s.stop()


def test_the_api_returns_the_default_models_calculator_call(lm):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, create_app

    with TestClient(create_app(lm.model, lm.tokenizer, ServeConfig(slots=2, ctx=512, model_id="smollm2"))) as c:
        r = c.post("/v1/chat/completions", json={"model": "x", "messages": QUESTION, "tools": [CALC], "temperature": 0,
                                                 "max_tokens": 48})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "calculator" and "48213" in call["arguments"]
        plain = c.post("/v1/chat/completions", json={"model": "x", "messages": QUESTION, "temperature": 0, "max_tokens": 16})
        assert plain.json()["choices"][0]["finish_reason"] != "tool_calls"
