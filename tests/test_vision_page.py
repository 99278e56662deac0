"""The web chat page with a model that sees (headless Chromium): the image button appears only
for such a model; a picture attached with it (or pasted, or dropped) is shown as a thumbnail and
sent as an image_url data: URL, and the streamed answer equals `LM.chat` on the same picture."""
from __future__ import annotations

import base64
import json

import pytest

from _vlm_tiny import png_bytes, vlm_folder
from conftest import live_server
from test_serve_live import ARTIFACTS, _browser

from lmforge.serve import ServeConfig, create_app

QUESTION = "what is in this picture?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def lm():
    import lmforge

    return lmforge.load(str(vlm_folder()), device="cpu")


def _open(d, url, temperature="0"):
    from selenium.webdriver.common.by import By

    d.get(url + "/")
    d.find_element(By.ID, "toggle-settings").click()
    for field, value in (("temperature", temperature), ("max_tokens", str(MAX_TOKENS))):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)


def _ask_and_wait(d, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    n = len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    box = d.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    WebDriverWait(d, 120, poll_frequency=0.2).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > n
        and not d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming") and d.execute_script("return !state.controller"))
    return d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


# a picture handed to the page as a browser would: a File in a DataTransfer, pasted or dropped
_HAND_OVER = """
const [b64, how] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], "pic.png", {type: "image/png"}));
if (how === "paste") document.getElementById("input").dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
else document.getElementById("messages").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


def test_page_sends_an_image_and_shows_the_streamed_answer(lm, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pics = [png_bytes(60, 40, seed=11), png_bytes(40, 40, seed=12), png_bytes(20, 30, seed=13)]
    path = tmp_path / "pic.png"
    path.write_bytes(pics[0])
    app = create_app(lm.model, lm.tokenizer, ServeConfig(slots=2, ctx=512))
    with live_server(app) as url:
        d = _browser()
        try:
            _open(d, url)
            WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "attach").is_displayed())
            d.execute_script("""window.__bodies = []; const f = window.fetch;
                window.fetch = (u, o) => { if (String(u).includes('chat/completions')) window.__bodies.push(o.body); return f(u, o); };""")
            d.execute_script("""window.__states = [];
                new MutationObserver(() => { const m = document.querySelector('.msg.assistant:last-child');
                  if (m) window.__states.push(m.dataset.raw); })
                .observe(document.getElementById('messages'), {subtree: true, childList: true, attributes: true});""")
            # 1. the file button
            d.find_element(By.ID, "image-file").send_keys(str(path))
            WebDriverWait(d, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachment img"))
            reply = _ask_and_wait(d, QUESTION)
            want = lm.chat([{"role": "user", "content": [{"type": "image", "data": pics[0]}, {"type": "text", "text": QUESTION}]}],
                           max_new_tokens=MAX_TOKENS)
            assert reply.get_attribute("data-raw") == want
            thumb = d.find_element(By.CSS_SELECTOR, ".msg.user img.thumb")
            assert d.execute_script("return [arguments[0].complete, arguments[0].naturalWidth]", thumb) == [True, 60]
            assert not d.find_elements(By.CSS_SELECTOR, "#attachment img")  # sent: the composer is empty again
            body = json.loads(d.execute_script("return window.__bodies[0]"))
            assert body["stream"] is True
            part = body["messages"][-1]["content"][0]
            assert part["type"] == "image_url" and part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(pics[0]).decode()
            states = [s for s in d.execute_script("return window.__states") if s]
            assert states and all(want.startswith(s) for s in states)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            d.save_screenshot(str(ARTIFACTS / "serve_chat_image.png"))
            # 2. paste and 3. drop: each goes with the next message, as a new conversation's first turn
            for how, png in (("paste", pics[1]), ("drop", pics[2])):
                d.find_element(By.ID, "new-chat").click()
                d.execute_script(_HAND_OVER, base64.b64encode(png).decode(), how)
                WebDriverWait(d, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachment img"))
                reply = _ask_and_wait(d, QUESTION)
                assert reply.get_attribute("data-raw") == lm.chat(
                    [{"role": "user", "content": [{"type": "image", "data": png}, {"type": "text", "text": QUESTION}]}],
                    max_new_tokens=MAX_TOKENS), how
            # kept in the browser with its picture
            d.refresh()
            WebDriverWait(d, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user img.thumb"))
        finally:
            d.quit()


def test_no_image_button_for_a_text_model(lm):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(lm.model.text, lm.tokenizer, ServeConfig(slots=1, ctx=256, model_id="text-only"))
    with live_server(app) as url:
        d = _browser()
        try:
            d.get(url + "/")
            WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "model-name").text == "text-only")
            assert not d.find_element(By.ID, "attach").is_displayed()
            d.execute_script(_HAND_OVER, base64.b64encode(png_bytes()).decode(), "paste")
            assert d.execute_script("return state.image") is None and not d.find_elements(By.CSS_SELECTOR, "#attachment img")
        finally:
            d.quit()
