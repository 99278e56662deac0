"""The HTTP API on a tiny random model (content is noise; shapes, codes and limits are not)."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from lmforge.serve import ServeConfig, create_app
from lmforge.serve import json_mode

from conftest import tiny_config

MODEL = "tiny"
USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def tiny_lm(default_lm):
    from lmforge.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=default_lm.tokenizer.vocab_size, max_seq_len=512)).init_weights(seed=0).eval()
    return model, default_lm.tokenizer


def make_app(tiny_lm, **kw):
    cfg = ServeConfig(**{"slots": 4, "ctx": 256, "model_id": MODEL, **kw})
    return create_app(*tiny_lm, cfg)


@pytest.fixture(scope="module")
def client(tiny_lm):
    with TestClient(make_app(tiny_lm)) as c:
        yield c


def chat(client, **kw):
    body = {"model": MODEL, "messages": USER, "max_tokens": 6, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    out = []
    for block in text.split("\n\n"):
        if block and block != "data: [DONE]":
            assert block.startswith("data: ")
            out.append(json.loads(block[6:]))
    return out


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


def test_models_and_health(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["slots"] == 4


def test_chat_shape_and_usage(client):
    r = chat(client, n=2, seed=5, temperature=0.8)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 0 < u["completion_tokens"] <= 12
    again = chat(client, n=2, seed=5, temperature=0.8).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in body["choices"]]


def test_stream_equals_non_stream(client):
    full = chat(client, max_tokens=10).json()["choices"][0]
    r = chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == full["message"]["content"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == full["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0


def test_logprobs_shape(client):
    body = chat(client, logprobs=True, top_logprobs=3).json()
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"]
    for e in entries:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy picks the top token
        assert abs(e["top_logprobs"][0]["logprob"] - e["logprob"]) < 1e-6
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
    assert "".join(e["token"] for e in entries) == body["choices"][0]["message"]["content"]
    assert_error(chat(client, top_logprobs=2), 400, param="top_logprobs")


def test_stop_sequences(client):
    text = chat(client, max_tokens=12).json()["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    got = chat(client, max_tokens=12, stop=[stop, "never-appears"]).json()["choices"][0]
    assert got["message"]["content"] == text[: text.find(stop)] and got["finish_reason"] == "stop"


def test_json_mode(client):
    r = chat(client, max_tokens=30, temperature=1.0, seed=1, response_format={"type": "json_object"})
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith("{") and json_mode.is_json_prefix(content)
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    assert_error(chat(client, response_format={"type": "json_schema", "json_schema": {}}), 400, param="response_format")


def test_completions_endpoint(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["Hello", "Bye"], "max_tokens": 4, "temperature": 0,
                                             "logprobs": 2, "n": 2})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: both choices agree
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    echo = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "echo": True}).json()
    assert echo["choices"][0]["text"].startswith("Hello")
    ids = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}).json()
    assert ids["usage"]["prompt_tokens"] == 3
    s = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True})
    streamed = "".join(e["choices"][0]["text"] for e in sse_events(s.text))
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0}).json()
    assert streamed == plain["choices"][0]["text"]


def test_errors_have_openai_shape(client):
    r = chat(client, model="gpt-4")  # any name reaches the loaded model; the reply names the real one
    assert r.status_code == 200 and r.json()["model"] == client.get("/v1/models").json()["data"][0]["id"]
    assert_error(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(chat(client, messages=[]), 400, param="messages")
    assert_error(chat(client, temperature=3), 400, param="temperature")
    assert_error(chat(client, messages=[{"role": "wizard", "content": "x"}]), 400)
    assert_error(chat(client, n=5), 400, param="n")  # more choices than slots
    assert_error(chat(client, logit_bias={"999999": 1}), 400, param="logit_bias")
    assert_error(client.get("/v1/chat/completions"), 405)
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400, param="prompt")


def test_prompt_longer_than_context_is_a_clear_400(client):
    long = [{"role": "user", "content": "word " * 400}]
    r = chat(client, messages=long)
    assert_error(r, 400, code="context_length_exceeded", param="messages")
    assert "maximum context length is 256 tokens" in r.json()["error"]["message"]
    assert_error(chat(client, max_tokens=250), 400, code="context_length_exceeded", param="max_tokens")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 400})
    assert_error(r, 400, code="context_length_exceeded", param="prompt")


def test_request_size_limit(tiny_lm):
    with TestClient(make_app(tiny_lm, max_request_bytes=2000)) as c:
        big = [{"role": "user", "content": "x" * 5000}]
        assert_error(c.post("/v1/chat/completions", json={"model": MODEL, "messages": big}), 413, code="request_too_large")
        assert chat(c, max_tokens=2).status_code == 200


def test_api_key(tiny_lm):
    with TestClient(make_app(tiny_lm, api_key="s3cret")) as c:
        assert_error(c.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                   json={"model": MODEL, "messages": USER, "max_tokens": 2})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # the page asks for the key
        assert_error(c.post("/v1/chat/completions", json={"bogus": 1}), 401)  # the key is checked before the body


def test_queue_full_answers_429(tiny_lm):
    app = make_app(tiny_lm, slots=1, max_queue=2)
    sched = app.state.scheduler
    gate = threading.Event()
    real = sched._iteration
    sched._iteration = lambda: (gate.wait(10), real())  # the model thread makes no progress until the gate opens

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"model": MODEL, "messages": USER, "max_tokens": 2}
            first = [asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(2)]
            while sched.load()["queued"] < 2:
                await asyncio.sleep(0.01)
            third = await c.post("/v1/chat/completions", json=body)
            gate.set()
            return third, await asyncio.gather(*first)

    try:
        third, first = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        gate.set()
        sched.stop()
    assert_error(third, 429, code="queue_full")
    assert [r.status_code for r in first] == [200, 200]


def test_chat_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for ref in re.findall(r'(?:src|href)="([^"]+)"', r.text):
        assert ref.startswith("/static/") or ref.startswith("data:"), ref
        if ref.startswith("/static/"):
            assert client.get(ref).status_code == 200
    for asset in ("/static/app.js", "/static/style.css"):
        text = client.get(asset).text
        assert not re.search(r"""(fetch|import|url)\(\s*["']?(https?:)?//""", text)  # nothing loads from elsewhere
        assert "@import" not in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_disconnect_frees_the_slot(tiny_lm):
    """A streaming client that goes away stops its generation (a real server, loopback only)."""
    import uvicorn

    app = make_app(tiny_lm, slots=2)
    sched = app.state.scheduler
    real = sched._iteration
    sched._iteration = lambda: (time.sleep(0.02), real())  # slow the tiny model down to a visible pace
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        body = {"model": MODEL, "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=20) as c:
            with c.stream("POST", base + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                for i, _line in enumerate(r.iter_lines()):
                    if i >= 6:
                        break
            # the connection is closed here, long before 200 tokens at 20 ms each
            deadline = time.time() + 10
            while c.get(base + "/health").json()["active"] and time.time() < deadline:
                time.sleep(0.05)
            assert c.get(base + "/health").json()["active"] == 0
            tokens = sched.stats.tokens
            assert tokens < 150
            # a non-streaming client that gives up is noticed too
            with pytest.raises(httpx.ReadTimeout):
                c.post(base + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
            deadline = time.time() + 10
            while c.get(base + "/health").json()["active"] and time.time() < deadline:
                time.sleep(0.05)
            assert c.get(base + "/health").json()["active"] == 0
            assert sched.stats.tokens - tokens < 150
    finally:
        server.should_exit = True
        th.join(10)


def test_cli_serve_flags(capsys):
    from lmforge.cli.main import run_command

    assert run_command(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--slots", "--ctx", "--max-queue", "--max-request-bytes", "--model"):
        assert flag in out
    assert "127.0.0.1" in out  # loopback unless asked otherwise


def test_openapi_lists_the_real_error_responses(client):
    """The document says what the server answers: OpenAI-shaped 400/401/413/429/500 on the
    generation routes, 401 on the model routes, and never FastAPI's default 422."""
    doc = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        res = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "413", "429", "500"} <= set(res) and "422" not in res, path
        ref = res["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert set(doc["paths"]["/v1/models"]["get"]["responses"]) == {"200", "401"}
    err = doc["components"]["schemas"]["ErrorDetail"]["properties"]
    assert {"message", "type", "param", "code"} <= set(err)
    # and the server does answer a bad body with that shape and status
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": "not a list"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
