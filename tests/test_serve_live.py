"""A real server (uvicorn on 127.0.0.1, the default model in fp32) driven by the official `openai`
client and by headless Chromium; at temperature 0 its answers equal the Python API's."""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import live_server
from lmforge.loading.resolve import DEFAULT_MODEL_ID
from lmforge.serve import ServeConfig, create_app

openai = pytest.importorskip("openai")

KEY = "test-key-123"
QUESTION = "What is the capital of France?"
MAX_TOKENS = 24
ARTIFACTS = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(default_lm):
    app = create_app(default_lm.model, default_lm.tokenizer, ServeConfig(slots=4, ctx=1024, api_key=KEY))
    with live_server(app) as url:
        yield SimpleNamespace(url=url, app=app)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(default_lm):
    """The Python API's greedy answers (the engine `lmforge generate` runs)."""
    cache = {}

    def answer(question: str, max_tokens: int = MAX_TOKENS) -> str:
        if (question, max_tokens) not in cache:
            cache[question, max_tokens] = default_lm.chat([{"role": "user", "content": question}], max_new_tokens=max_tokens,
                                                          temperature=0.0)
        return cache[question, max_tokens]

    return answer


def ask(client, question, max_tokens=MAX_TOKENS, **kw):
    return client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=max_tokens, **kw)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_ID]


def test_chat_equals_python_api(client, reference):
    r = ask(client, QUESTION)
    assert r.choices[0].message.content == reference(QUESTION)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0


def test_chat_equals_lmforge_generate(client, capsys):
    from lmforge.cli.main import run_command

    assert run_command(["generate", "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS),
                        "--dtype", "fp32", "--quant", "none", "--draft", "none", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
    assert ask(client, QUESTION).choices[0].message.content == generated


def test_stream_equals_python_api(client, reference):
    chunks = [c.choices[0].delta.content for c in ask(client, QUESTION, stream=True) if c.choices and c.choices[0].delta.content]
    assert len(chunks) >= 3  # the text arrives in steps
    assert "".join(chunks) == reference(QUESTION)


def test_concurrent_requests_each_equal_their_single_answer(client, reference):
    questions = ["Name a primary color.", "What is 2 + 2?", "Say hello."]
    with ThreadPoolExecutor(len(questions)) as pool:  # three rows decoded together, joining and leaving
        got = list(pool.map(lambda q: ask(client, q, max_tokens=12).choices[0].message.content, questions))
    assert got == [reference(q, 12) for q in questions]


def test_tool_call(client):
    r = ask(client, "What is the weather in Paris?", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert set(args) <= {"city"} and all(isinstance(v, str) for v in args.values())
    # the call and its result go back into the conversation and the model answers in text
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    r2 = client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=messages, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=8)
    assert r2.choices[0].message.content and r2.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call(client):
    stream = ask(client, "What is the weather in Paris?", tools=TOOLS, tool_choice="required", stream=True)
    calls, finish = [], None
    for c in stream:
        if c.choices and c.choices[0].delta.tool_calls:
            calls += c.choices[0].delta.tool_calls
        if c.choices and c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
    assert finish == "tool_calls" and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)


def test_json_mode(client):
    r = ask(client, "Describe a cat as JSON with the keys name and age.", response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_errors(client, server):
    other = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert other.model == DEFAULT_MODEL_ID  # any name reaches the loaded model, which says its real id
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": "hello " * 1200}])
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": "hi"}], temperature=5)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_completions_endpoint(client, default_lm):
    r = client.completions.create(model=DEFAULT_MODEL_ID, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.choices[0].text == default_lm.generate("The capital of France is", max_new_tokens=6, temperature=0.0)


# ---------------------------------------------------------------- the web page -------------

def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("headless browser test needs the selenium package")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,860",
              "--disable-background-networking", "--no-first-run"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_chat_page_in_headless_chromium(server, client, reference):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = _browser()
    try:
        d.get(server.url + "/")
        d.find_element(By.ID, "toggle-settings").click()
        for field, value in (("api_key", KEY), ("temperature", "0"), ("max_tokens", str(MAX_TOKENS))):
            el = d.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "model-name").text == DEFAULT_MODEL_ID)
        # record every state of the reply's text as the page updates it
        d.execute_script("""
            window.__states = [];
            new MutationObserver(() => {
              const m = document.querySelector('.msg.assistant:last-child');
              if (m) window.__states.push(m.dataset.raw);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, attributes: true});
        """)
        box = d.find_element(By.ID, "input")
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        WebDriverWait(d, 240, poll_frequency=0.2).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant") and not d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming"))
        reply = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        final = reply.get_attribute("data-raw")
        assert final == reference(QUESTION)
        assert reply.find_element(By.CLASS_NAME, "content").text.strip() == final.strip()
        states = [s for s in d.execute_script("return window.__states") if s]
        assert len(set(states)) >= 3, states  # the text grew in steps
        assert all(final.startswith(s) for s in states)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(ARTIFACTS / "serve_chat_page.png"))

        # the conversation is kept in the browser: it is there after a reload
        d.refresh()
        WebDriverWait(d, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 2)
        saved = json.loads(d.execute_script("return localStorage.getItem('lmforge.conversations')"))
        assert saved[0]["messages"][-1]["content"] == final

        # Markdown and code render, and model text cannot inject markup
        html = d.execute_script("return renderMarkdown(arguments[0])", "# Title\n\n**bold** and `x`\n\n```python\ndef f():\n    return 1\n```\n<script>alert(1)</script>")
        assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and 'class="codeblock"' in html
        assert "tok-kw" in html and "<script>" not in html

        # the stop button ends a reply and frees the server's slot
        box = d.find_element(By.ID, "input")
        box.send_keys("Write a long story about a dragon.")
        box.send_keys(Keys.ENTER)
        WebDriverWait(d, 120, poll_frequency=0.1).until(
            lambda d: (d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming") or [None])[-1] is not None
            and len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-raw") or "") > 0)
        d.find_element(By.ID, "stop").click()
        WebDriverWait(d, 20).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming"))
        assert "(stopped)" in d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
        d.save_screenshot(str(ARTIFACTS / "serve_chat_page_stopped.png"))
        deadline = time.time() + 20
        while server.app.state.scheduler.load()["active"] and time.time() < deadline:
            time.sleep(0.1)
        assert server.app.state.scheduler.load()["active"] == 0

        # a stored conversation with Markdown comes back rendered (screenshot for a person to check)
        demo = {"id": "demo", "title": "Markdown demo", "created": 0, "messages": [
            {"role": "user", "content": "Show me a Python function, a list and a table."},
            {"role": "assistant", "content": "Here is **a function** that uses `a + b`:\n\n```python\ndef add(a, b):\n"
                                             "    # sum two numbers\n    return a + b  # 42\n```\n\n1. first item\n2. second *item*\n\n"
                                             "> a quote\n\n| x | y |\n|---|---|\n| 1 | 2 |"}]}
        d.execute_script("""const c = JSON.parse(localStorage.getItem('lmforge.conversations'));
            c.unshift(arguments[0]); localStorage.setItem('lmforge.conversations', JSON.stringify(c));
            localStorage.setItem('lmforge.current', 'demo');""", demo)
        d.refresh()
        WebDriverWait(d, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".codeblock"))
        assert d.find_elements(By.CSS_SELECTOR, ".content table td") and d.find_elements(By.CSS_SELECTOR, ".content ol li")
        d.save_screenshot(str(ARTIFACTS / "serve_chat_markdown.png"))
    finally:
        d.quit()
