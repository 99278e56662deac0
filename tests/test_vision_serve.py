"""Images in the server: OpenAI `image_url` parts reach a VLM through the continuous-batching
scheduler (prefilled with their pixels), answer as `LM.chat` does, never share cached keys
across pictures, and bad images or URLs are a one-line 400."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from _vlm_tiny import data_url, png_bytes, vlm_folder
from test_vision import _png_claiming

from lmforge.serve import ServeConfig, create_app

MODEL = "tiny-vlm"
QUESTION = "what is in this picture?"


@pytest.fixture(scope="module")
def lm():
    import lmforge

    return lmforge.load(str(vlm_folder()), device="cpu")


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm.model, lm.tokenizer, ServeConfig(slots=3, ctx=512, model_id=MODEL))) as c:
        yield c


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def ask(client, messages, **kw):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **kw})


def reference(lm, png: bytes, text: str = QUESTION) -> str:
    return lm.chat([{"role": "user", "content": [{"type": "image", "data": png}, {"type": "text", "text": text}]}],
                   max_new_tokens=8)


def stream_text(r) -> str:
    assert r.status_code == 200, r.text
    out = []
    for block in r.text.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            ch = json.loads(block[6:])["choices"]
            out += [c["delta"].get("content") or "" for c in ch]
    return "".join(out)


def error_of(r) -> str:
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "\n" not in msg
    return msg


def test_models_say_the_model_takes_images(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["input_modalities"] == ["text", "image"]


def test_greedy_answer_equals_lm_chat_streaming_or_not(client, lm):
    png = png_bytes(60, 40, seed=1)  # 2x2 tiles and the global view
    want = reference(lm, png)
    r = ask(client, image_message(data_url(png)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens"] == len(lm.encode_images(image_message(data_url(png)))[0])
    assert stream_text(ask(client, image_message(data_url(png)), stream=True)) == want


def test_prefix_cache_never_crosses_a_picture(client, lm):
    """Two pictures of one size give the same prompt ids; the second must not reuse the first's
    keys after its first image token, and a text prompt must not either."""
    sched = client.app.state.scheduler
    image_id = lm.model.image_token_id
    for seed in (2, 3, 4):
        png = png_bytes(60, 40, seed=seed)
        before = sched.stats.prefix_tokens
        r = ask(client, image_message(data_url(png)))
        assert r.json()["choices"][0]["message"]["content"] == reference(lm, png)
        ids, _ = lm.encode_images(image_message(data_url(png)))
        assert sched.stats.prefix_tokens - before <= ids.index(image_id)
    before = sched.stats.prefix_tokens
    text = [{"role": "user", "content": QUESTION}]
    r = ask(client, text)
    assert r.json()["choices"][0]["message"]["content"] == lm.chat(text, max_new_tokens=8)
    assert sched.stats.prefix_tokens - before <= ids.index(image_id)


def test_image_and_text_requests_together(client, lm):
    """Requests in flight at once (an image one prefilled alone, text ones batched) each answer
    as they would alone."""
    from concurrent.futures import ThreadPoolExecutor

    pngs = [png_bytes(50, 50, seed=5), png_bytes(30, 20, seed=6)]
    jobs = [image_message(data_url(p)) for p in pngs] + [[{"role": "user", "content": "hello there"}]]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda m: ask(client, m).json()["choices"][0]["message"]["content"], jobs))
    assert got[:2] == [reference(lm, p) for p in pngs]
    assert got[2] == lm.chat(jobs[2], max_new_tokens=8)


def test_a_large_photo_fits_the_body_limit(client):
    png = png_bytes(900, 800, seed=7)  # noise: ~2 MB as PNG, ~2.9 MB as a data: URL
    assert len(png) > 2_000_000
    assert ask(client, image_message(data_url(png))).status_code == 200


def test_bad_images_and_urls_are_one_line_400s(client, tmp_path):
    good = png_bytes(40, 30)
    assert "truncated" in error_of(ask(client, image_message(data_url(good[: len(good) // 2]))))
    assert "too large" in error_of(ask(client, image_message(data_url(_png_claiming(20000, 20000)))))
    assert "not an image" in error_of(ask(client, image_message(data_url(b"hello, not a picture " * 20, "text/plain"))))
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="5" height="5"/></svg>'
    assert "SVG" in error_of(ask(client, image_message(data_url(svg, "image/svg+xml"))))
    assert "base64" in error_of(ask(client, image_message("data:image/png;base64,@@@not base64@@@")))
    assert "never downloads" in error_of(ask(client, image_message("https://example.com/cat.png")))
    path = tmp_path / "pic.png"
    path.write_bytes(good)
    assert "--allow-image-paths" in error_of(ask(client, image_message(str(path))))
    assert "--allow-image-paths" in error_of(ask(client, image_message(path.as_uri())))
    assert "data: URL" in error_of(ask(client, image_message("pic.png")))
    r = ask(client, [{"role": "user", "content": [{"type": "input_audio", "text": "x"}]}])
    assert "input_audio" in error_of(r)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert "tools" in error_of(ask(client, image_message(data_url(good)), tools=tools))
    # the server still answers
    assert ask(client, image_message(data_url(good))).status_code == 200


def test_local_files_with_allow_image_paths(lm, tmp_path):
    png = png_bytes(60, 40, seed=8)
    path = tmp_path / "pic.png"
    path.write_bytes(png)
    cfg = ServeConfig(slots=2, ctx=512, model_id=MODEL, allow_image_paths=True)
    with TestClient(create_app(lm.model, lm.tokenizer, cfg)) as c:
        for url in (str(path), path.as_uri()):
            r = ask(c, image_message(url))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == reference(lm, png)
        assert "no such file" in error_of(ask(c, image_message(str(tmp_path / "missing.png"))))
        assert "never downloads" in error_of(ask(c, image_message("http://127.0.0.1/x.png")))


def test_a_text_model_refuses_images(lm):
    with TestClient(create_app(lm.model.text, lm.tokenizer, ServeConfig(slots=1, ctx=256, model_id=MODEL))) as c:
        assert c.get("/v1/models").json()["data"][0]["input_modalities"] == ["text"]
        msg = error_of(ask(c, image_message(data_url(png_bytes()))))
        assert "text only" in msg and "image_url" in msg
