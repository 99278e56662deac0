"""Fuzzing the API in-process (hypothesis): no request gets a 500, and valid requests get 200."""
from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.serve import ServeConfig, create_app

from conftest import tiny_config

MODEL = "tiny"
FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ALLOWED = {200, 400, 401, 404, 405, 413, 422, 429}


@pytest.fixture(scope="module")
def client(default_lm):
    from lmforge.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=default_lm.tokenizer.vocab_size, max_seq_len=256)).init_weights(seed=0).eval()
    app = create_app(model, default_lm.tokenizer, ServeConfig(slots=4, ctx=256, model_id=MODEL, max_request_bytes=64_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


json_any = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "bogus", "", None])
message = st.fixed_dictionaries(
    {"role": roles},
    optional={"content": json_any | st.text(max_size=200), "name": json_any, "tool_calls": json_any, "tool_call_id": json_any},
)
CHAT_FIELDS = {
    "temperature": json_any, "top_p": json_any, "top_k": json_any, "n": st.integers(-2, 20) | json_any,
    "max_tokens": st.integers(-5, 300) | json_any, "max_completion_tokens": json_any, "stop": json_any | st.lists(st.text(max_size=5), max_size=6),
    "seed": st.integers(-2**64, 2**64) | json_any, "logprobs": json_any, "top_logprobs": st.integers(-3, 30) | json_any,
    "response_format": json_any | st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])}),
    "tools": json_any, "tool_choice": json_any | st.sampled_from(["none", "auto", "required"]),
    "presence_penalty": json_any, "frequency_penalty": json_any, "logit_bias": json_any | st.dictionaries(st.text(max_size=6), json_any, max_size=3),
    "stream": st.booleans() | json_any, "stream_options": json_any, "repetition_penalty": json_any, "ignore_eos": json_any,
}


def check(r):
    assert r.status_code in ALLOWED, (r.status_code, r.text[:500])
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
    return r


def small(body: dict) -> dict:
    """Keep generation short so a hundred requests stay fast on a tiny model."""
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8
    body.setdefault("max_tokens", 4)
    body["max_completion_tokens"] = None
    return body


@FUZZ
@given(body=json_any, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_arbitrary_json_never_500(client, body, path):
    try:
        raw = json.dumps(body)
    except ValueError:
        return
    check(client.post(path, content=raw, headers={"content-type": "application/json"}))


@FUZZ
@given(messages=st.lists(message, min_size=0, max_size=4), fields=st.fixed_dictionaries({}, optional=CHAT_FIELDS))
def test_mutated_chat_requests_never_500(client, messages, fields):
    body = small({"model": MODEL, "messages": messages, **fields})
    check(client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(prompt=json_any | st.text(max_size=100) | st.lists(st.integers(-5, 60000), max_size=8),
       fields=st.fixed_dictionaries({}, optional={k: CHAT_FIELDS[k] for k in ("temperature", "top_p", "n", "max_tokens", "stop", "seed", "stream")}
                                    | {"logprobs": st.integers(-2, 8) | json_any, "echo": json_any, "suffix": json_any, "best_of": json_any}))
def test_mutated_completion_requests_never_500(client, prompt, fields):
    body = small({"model": MODEL, "prompt": prompt, **fields})
    check(client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"}))


valid_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=60)})


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    messages=st.lists(valid_message, min_size=1, max_size=3),
    temperature=st.none() | st.floats(0, 2) | st.sampled_from([1e-300, 5e-324, 1e-5]),
    top_p=st.none() | st.floats(0, 1) | st.sampled_from([5e-324, 1e-300]),
    n=st.integers(1, 4),
    max_tokens=st.integers(1, 6),
    stop=st.none() | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    seed=st.none() | st.integers(-2**63, 2**63 - 1),
    stream=st.booleans(),
    logprobs=st.booleans(),
    json_object=st.booleans(),
    penalty=st.floats(-2, 2),
)
def test_valid_chat_requests_get_200(client, messages, temperature, top_p, n, max_tokens, stop, seed, stream, logprobs, json_object, penalty):
    body = {"model": MODEL, "messages": messages, "n": n, "max_tokens": max_tokens, "stream": stream, "logprobs": logprobs,
            "presence_penalty": penalty, "frequency_penalty": penalty}
    for k, v in (("temperature", temperature), ("top_p", top_p), ("stop", stop), ("seed", seed)):
        if v is not None:
            body[k] = v
    if logprobs:
        body["top_logprobs"] = 2
    if json_object:
        body["response_format"] = {"type": "json_object"}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text[:500]
    if stream:
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
    else:
        assert len(r.json()["choices"]) == n
