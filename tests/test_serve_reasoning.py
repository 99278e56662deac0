"""Thinking models through the server: a reply's `<think>...</think>` block comes back as
`reasoning_content` and the answer as `content`, streamed or not (the same texts, whatever the
pieces' boundaries), tool calls parsed from the answer only; a template without a reasoning block
is left alone. The model here is a stand-in that replies a fixed text at the scheduler's seam."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge.serve.reasoning import ReasoningSplitter, split_reasoning

QWEN3 = (Path(__file__).parent / "data" / "chat_templates" / "qwen3.jinja").read_text()
R1_LIKE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: <think>\n"


@pytest.mark.parametrize("text,inside,want", [
    ("<think>\nThe user asks.\n</think>\n\nParis.", False, ("The user asks.", "Paris.")),
    ("Paris.", False, (None, "Paris.")),
    ("It is France's.\n</think>\n\nParis.", True, ("It is France's.", "Paris.")),
    ("<think>\nstill thinking", False, ("still thinking", "")),
    ("<thinking> is a word", False, (None, "<thinking> is a word")),
    ("<think>\n\n</think>\n\nHi", False, ("", "Hi")),
])
def test_streamed_pieces_split_as_the_whole_reply(text, inside, want):
    assert split_reasoning(text, inside) == want
    for step in range(1, 9):
        s, got = ReasoningSplitter(inside), ["", ""]
        for k in range(0, len(text), step):
            for j, part in enumerate(s.feed(text[k:k + step])):
                got[j] += part
        for j, part in enumerate(s.feed("", final=True)):
            got[j] += part
        assert (got[0] if s.reasoned else None, got[1]) == want, step


def _fixed_reply(reply: str):
    from lmforge.serve.scheduler import Event, Handle

    def submit(req, loop=None):
        h = Handle(req, loop or asyncio.get_running_loop())
        pieces = [reply[i:i + 3] for i in range(0, len(reply), 3)]
        for p in pieces:
            h.queue.put_nowait(Event(0, text=p))
        h.queue.put_nowait(Event(0, finish="stop", completion_tokens=len(pieces)))
        return h

    return submit


@pytest.fixture(scope="module")
def model_and_tok(default_lm):
    from conftest import tiny_config
    from lmforge.model import Transformer

    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=default_lm.tokenizer.vocab_size, max_seq_len=512)).init_weights(seed=0).eval(), \
        default_lm.tokenizer


def _client(model_and_tok, template, reply, monkeypatch):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, create_app

    model, tok = model_and_tok
    app = create_app(model, replace(tok, chat_template=template), ServeConfig(slots=2, ctx=512, model_id="m"))
    monkeypatch.setattr(app.state.scheduler, "submit", _fixed_reply(reply))
    return TestClient(app)


def _streamed(r) -> tuple[str, str, list]:
    thought = content = ""
    calls = []
    for block in r.text.split("\n\n"):
        if block.startswith("data: {"):
            delta = json.loads(block[6:])["choices"][0]["delta"] if json.loads(block[6:]).get("choices") else {}
            thought += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            calls += delta.get("tool_calls") or []
    return thought, content, calls


def test_the_server_returns_reasoning_apart_from_the_answer(model_and_tok, monkeypatch):
    reply = "<think>\nThe user wants a number.\n</think>\n\n<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+2\"}}\n</tool_call>"
    calc = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object", "properties": {}}}}
    body = {"model": "m", "messages": [{"role": "user", "content": "2+2?"}], "tools": [calc]}
    with _client(model_and_tok, QWEN3, reply, monkeypatch) as c:
        msg = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert msg["reasoning_content"] == "The user wants a number."
        assert msg["tool_calls"][0]["function"]["name"] == "calculator" and not msg["content"]
        thought, content, calls = _streamed(c.post("/v1/chat/completions", json={**body, "stream": True}))
        assert thought == "The user wants a number." and calls and "<think>" not in content


def test_a_prompt_that_opens_the_block_and_a_template_without_one(model_and_tok, monkeypatch):
    body = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]}
    with _client(model_and_tok, R1_LIKE, "France's capital.\n</think>\n\nParis.", monkeypatch) as c:
        msg = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == ("France's capital.", "Paris.")
        assert _streamed(c.post("/v1/chat/completions", json={**body, "stream": True}))[:2] == ("France's capital.", "Paris.")
    plain = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with _client(model_and_tok, plain, "<think>x</think> y", monkeypatch) as c:
        msg = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert msg["content"] == "<think>x</think> y" and "reasoning_content" not in msg


def test_the_web_page_folds_the_reasoning_above_the_answer(model_and_tok, monkeypatch):
    """In headless Chromium: the reasoning streams into a folded "Thinking…" box above the
    answer, stays after a reload, and is not sent back with the next turn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import live_server
    from lmforge.serve import ServeConfig, create_app
    from test_serve_live import _browser
    from test_vision_page import _ask_and_wait, _open

    model, tok = model_and_tok
    app = create_app(model, replace(tok, chat_template=QWEN3), ServeConfig(slots=2, ctx=512))
    monkeypatch.setattr(app.state.scheduler, "submit", _fixed_reply("<think>\nThe capital of France.\n</think>\n\nParis."))
    with live_server(app) as url:
        d = _browser()
        try:
            _open(d, url)  # (a short max_tokens: the tiny model's context is 512)
            d.execute_script("""window.__bodies = []; const f = window.fetch;
                window.fetch = (u, o) => { if (String(u).includes('chat/completions')) window.__bodies.push(o.body); return f(u, o); };""")
            reply = _ask_and_wait(d, "Capital of France?")
            assert reply.get_attribute("data-raw") == "Paris.", reply.text
            box = reply.find_element(By.CSS_SELECTOR, "details.thinking")
            assert box.get_attribute("open") is None  # folded
            assert d.execute_script("return arguments[0].querySelector('.thought').textContent", box) == "The capital of France."
            _ask_and_wait(d, "And Italy?")
            sent = json.loads(d.execute_script("return window.__bodies[1]"))["messages"]
            assert sent[1] == {"role": "assistant", "content": "Paris."}  # no reasoning goes back
            d.refresh()
            WebDriverWait(d, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant details.thinking")) == 2)
        finally:
            d.quit()
