"""Pictures out: the python tool's figures leave the sandbox as checked PNGs (and nothing else
does), `lmforge chat` saves them as files, the server returns them with the tool result, and the
web page shows them inline."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest

from lmforge.tools import sandbox
from lmforge.tools.protocol import execute_tool_call, get_tools
from lmforge.tools.sandbox import MAX_FIGURE_BYTES, MAX_FIGURES, MAX_FIGURE_SIDE, _checked_png, python_tool, run_python

Image = pytest.importorskip("PIL.Image")

PLOT = """
import numpy as np
import matplotlib.pyplot as plt
x = np.linspace(0, 2 * np.pi, 100)
plt.plot(x, np.sin(x))
plt.title("sin(x)")
print("plotted")
"""


@pytest.fixture(scope="module", autouse=True)
def needs_sandbox():
    ok, why = sandbox.sandbox_available()
    if not ok:
        pytest.skip(why)


def png_info(data: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.format, im.size


def raw_png(width: int, height: int, rows: bytes | None = None, extra_chunks=(), trailer: bytes = b"") -> bytes:
    """A grayscale PNG written by hand (no library between the test and the bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if rows is None:
        rows = b"".join(b"\0" + bytes(range(width)) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = [chunk(b"IHDR", ihdr), *[chunk(k, d) for k, d in extra_chunks], chunk(b"IDAT", zlib.compress(rows)), chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(body) + trailer


# ---------------------------------------------------------------- the sandbox ------------

def test_a_matplotlib_program_gives_a_png_and_a_line_for_the_model():
    r = run_python(PLOT, timeout_s=30, figures=True)
    assert r.ok and r.stdout == "plotted\n", r.stderr
    (fig,) = r.figures
    assert png_info(fig.png) == ("PNG", (640, 480)) and (fig.width, fig.height) == (640, 480)
    assert fig.data_url().startswith("data:image/png;base64,") and base64.b64decode(fig.data_url().split(",")[1]) == fig.png

    out = python_tool(PLOT, timeout_s=30)
    assert out.text == "plotted\n[figure 1: 640x480 PNG]"  # the model reads a line, never the bytes
    (f,) = out.figures
    assert set(f) == {"mime_type", "width", "height", "url"} and f["mime_type"] == "image/png"
    assert png_info(base64.b64decode(f["url"].split(",", 1)[1]))[1] == (640, 480)


def test_without_figures_nothing_comes_out_and_no_plotting_stack():
    r = run_python("open('/tmp/a.png', 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n')\nimport matplotlib", timeout_s=10)
    assert r.figures == [] and r.figure_notes == [] and "ModuleNotFoundError" in r.stderr


def test_figures_survive_an_error_and_explicit_pngs_replace_open_figures():
    r = run_python(PLOT + "raise ValueError('late')", timeout_s=30, figures=True)
    assert r.exit_code == 1 and "ValueError: late" in r.stderr and len(r.figures) == 1
    # a program that saves its own PNG (and leaves the figure open) gets that file, once
    r = run_python(PLOT + "plt.savefig('mine.png', dpi=50)\nplt.figure(); plt.plot([1, 2])", timeout_s=30, figures=True)
    assert [(f.width, f.height) for f in r.figures] == [(320, 240)], r.figure_notes


def test_count_size_and_dimensions_are_capped():
    many = "import matplotlib.pyplot as plt\nfor k in range(7):\n    plt.figure(figsize=(2, 2)); plt.plot([0, k])\n"
    r = run_python(many, timeout_s=30, figures=True)
    assert len(r.figures) == MAX_FIGURES == 4  # the bootstrap saves at most that many
    r = run_python(many.replace("plt.plot([0, k])", "plt.plot([0, k]); plt.savefig(f'f{k}.png')"), timeout_s=30, figures=True)
    assert len(r.figures) == MAX_FIGURES and r.figure_notes == ["[3 more figure(s) not shown: at most 4 per run]"]

    # a huge figure size is drawn at a bounded DPI: at most 2000 pixels a side, never a memory bomb
    r = run_python("import matplotlib.pyplot as plt\nplt.figure(figsize=(400, 300)); plt.plot([1, 2])", timeout_s=30, figures=True)
    assert r.ok, r.stderr
    assert [(f.width, f.height) for f in r.figures] == [(2000, 1500)]

    # noise does not compress: a full-size figure of it is over the byte limit and stays inside
    noise = ("import numpy as np, matplotlib.pyplot as plt\n"
             "plt.figure(figsize=(8, 8)).figimage(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8))")
    r = run_python(noise, timeout_s=60, figures=True)
    assert r.figures == [] and r.figure_notes == [f"[a figure was not shown: larger than {MAX_FIGURE_BYTES // 2**20} MB]"]


def test_only_checked_pixels_leave():
    """Other files, fake PNGs, links, FIFOs and data smuggled inside a real PNG stay in."""
    real = raw_png(8, 4, extra_chunks=[(b"tEXt", b"Comment\0SMUGGLED-IN-CHUNK")], trailer=b"SMUGGLED-AFTER-IEND")
    code = f"""
import os
open('secret.txt', 'w').write('SECRET-FILE-CONTENT')
open('data.csv', 'w').write('a,b\\n1,2')
open('a_fake.png', 'wb').write(b'SECRET-FILE-CONTENT, named .png')
os.symlink('/tmp/secret.txt', 'b_link.png')
os.mkfifo('c_fifo.png')
open('d_real.png', 'wb').write({real!r})
for name in ['a_fake.png', 'b_link.png', 'c_fifo.png', 'd_real.png']:  # oldest first
    os.utime(name, ns=(0, 10**9 * (1 + 'abcd'.index(name[0]))), follow_symlinks=False)
"""
    r = run_python(code, timeout_s=10, figures=True)
    assert r.ok, r.stderr
    assert r.figure_notes == ["[a figure was not shown: not a PNG file]", "[a figure was not shown: not a readable regular file]",
                              "[a figure was not shown: not a regular file]"]
    (fig,) = r.figures
    assert png_info(fig.png) == ("PNG", (8, 4)) and fig.png != real  # encoded again here
    blob = repr(r).encode() + fig.png
    for secret in (b"SECRET-FILE-CONTENT", b"SMUGGLED-IN-CHUNK", b"SMUGGLED-AFTER-IEND", b"a,b"):
        assert secret not in blob
    with Image.open(io.BytesIO(fig.png)) as im:
        assert im.info.get("Comment") is None and im.tobytes()[:8] == bytes(range(8))

    # the figures folder made a link: not followed
    link = f"import os\nos.mkdir('/tmp/d')\nopen('/tmp/d/x.png', 'wb').write({raw_png(4, 4)!r})\nos.symlink('/tmp/d', {sandbox.FIGURE_DIR!r})"
    r = run_python(link, timeout_s=10, figures=True)
    assert r.ok and r.figures == [] and r.figure_notes == [], r


def test_hostile_pngs_are_refused_on_the_host():
    assert _checked_png(b"GIF89a" + b"\0" * 100) == (None, "not a PNG file")
    # a decompression bomb: a small file that says 60000 x 60000 pixels (3.6 GB) is refused unread
    bomb = raw_png(60000, 60000, rows=b"\0" * 1000)
    assert len(bomb) < 2000
    fig, why = _checked_png(bomb)
    assert fig is None and why == f"60000x60000 pixels, more than {MAX_FIGURE_SIDE} a side"
    fig, why = _checked_png(raw_png(16, 16)[:60])  # cut inside the image data
    assert fig is None and why.startswith("not a valid PNG")
    fig, why = _checked_png(raw_png(16, 16, rows=b"\0" * 10))  # too few pixels for its header
    assert fig is None and why.startswith("not a valid PNG")
    assert _checked_png(raw_png(16, 16))[0].width == 16

    # the same bomb written by a program inside the sandbox
    r = run_python(f"open('bomb.png', 'wb').write({bomb!r})", timeout_s=10, figures=True)
    assert r.figures == [] and r.figure_notes == [f"[a figure was not shown: 60000x60000 pixels, more than {MAX_FIGURE_SIDE} a side]"]


def test_tool_message_carries_the_figures_and_the_model_never_sees_them():
    from lmforge.chat import normalize_messages

    (py,) = get_tools("python", python_timeout_s=30)
    m = execute_tool_call({"id": "p", "function": {"name": "python", "arguments": {"code": PLOT}}}, [py])
    assert m["content"] == "plotted\n[figure 1: 640x480 PNG]" and m["figures"][0]["url"].startswith("data:image/png;base64,")
    json.dumps(m)  # a conversation with figures stays JSON
    (rendered,) = normalize_messages([m])
    assert "base64" not in json.dumps(rendered)
    plain = execute_tool_call({"id": "q", "function": {"name": "python", "arguments": {"code": "print(1)"}}}, [py])
    assert "figures" not in plain


# ---------------------------------------------------------------- lmforge chat -------------

def test_chat_saves_figures_and_prints_their_paths(default_lm, tmp_path, monkeypatch, capsys):
    """`lmforge chat --tools python`, the model scripted at the generation seam (a pure function
    of the prompt text): it plots, then answers; the figure lands in ./lmforge-figures/."""
    import lmforge.api
    from conftest import run_cli

    call = "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": PLOT}})  # cut at the stop string

    def fake_stream(model, tokenizer, prompts, params):
        last_user = tokenizer.decode(prompts[0]).rsplit("<|im_start|>user", 1)[-1]
        yield 0, ("Here is the plot." if "<tool_response>" in last_user else call)

    monkeypatch.setattr(lmforge.api, "stream_text", fake_stream)
    monkeypatch.setattr("lmforge.cli.commands.chat.load_lm", lambda cfg: default_lm)
    monkeypatch.setenv("LMFORGE_TOOL_ADAPTER", "0")  # the session's model stays as loaded
    monkeypatch.setattr("sys.stdin", io.StringIO("Plot sin(x).\n"))
    monkeypatch.chdir(tmp_path)
    r = run_cli(capsys, "chat", "--tools", "python", "--max-new-tokens", "64")
    assert r.returncode == 0, r.stderr
    assert "Here is the plot." in r.stdout
    lines = r.stderr.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("[tool result]"))
    assert lines[at + 1] == "[figure 1: 640x480 PNG]"
    assert lines[at + 2].startswith("[figure saved] lmforge-figures/figure-") and lines[at + 2].endswith("-1.png")
    (saved,) = (tmp_path / "lmforge-figures").iterdir()
    assert saved.name == lines[at + 2].rsplit("/", 1)[1] and png_info(saved.read_bytes()) == ("PNG", (640, 480))
    assert "base64" not in r.stdout + r.stderr


def test_chat_figure_names_never_overwrite(tmp_path):
    from lmforge.cli.commands.chat import save_figures

    f = {"mime_type": "image/png", "url": "data:image/png;base64," + base64.b64encode(raw_png(4, 4)).decode()}
    first = save_figures([f, f], tmp_path / "figs")
    again = save_figures([f, {"url": "data:text/html;base64,PHNjcmlwdD4="}], tmp_path / "figs")
    assert len(set(first + again)) == 3 and len(list((tmp_path / "figs").iterdir())) == 3


# ---------------------------------------------------------------- the server --------------

@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from lmforge.loading import load_tokenizer

    return load_tokenizer(default_model_path)


def tiny_model(tokenizer):
    import torch

    from conftest import tiny_config
    from lmforge.model import Transformer

    torch.manual_seed(0)
    return Transformer(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=2048)).init_weights(seed=0).eval()


def test_server_runs_the_python_tool_and_returns_figures(tokenizer):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, create_app

    app = create_app(tiny_model(tokenizer), tokenizer, ServeConfig(slots=2, ctx=512, tools=["python"], api_key="k"))
    auth = {"Authorization": "Bearer k"}
    call = {"id": "call_1", "type": "function", "function": {"name": "python", "arguments": json.dumps({"code": PLOT})}}
    with TestClient(app) as c:
        assert c.post("/v1/tools/run", json=call).status_code == 401
        assert [t["function"]["name"] for t in c.get("/v1/tools", headers=auth).json()["data"]] == ["python"]
        r = c.post("/v1/tools/run", json=call, headers=auth)
        assert r.status_code == 200, r.text
        m = r.json()
        assert m["role"] == "tool" and m["tool_call_id"] == "call_1" and m["content"] == "plotted\n[figure 1: 640x480 PNG]"
        (fig,) = m["figures"]
        assert fig["mime_type"] == "image/png" and (fig["width"], fig["height"]) == (640, 480)
        assert png_info(base64.b64decode(fig["url"].removeprefix("data:image/png;base64,"))) == ("PNG", (640, 480))
        # the tool message goes back into the conversation as OpenAI's shape (the extra field is ignored)
        msgs = [{"role": "user", "content": "plot"},
                {"role": "assistant", "content": None, "tool_calls": [call]}, m]
        r = c.post("/v1/chat/completions", headers=auth, json={"model": "x", "messages": msgs, "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = c.post("/v1/tools/run", json={**call, "function": {"name": "calculator", "arguments": "{}"}}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "tool_not_enabled"
        assert "/v1/tools/run" not in c.get("/openapi.json").json()["paths"]  # the page's route, not OpenAI's
    with TestClient(create_app(tiny_model(tokenizer), tokenizer, ServeConfig(slots=2, ctx=512))) as c:
        assert c.get("/v1/tools").json()["data"] == []  # no tools unless the server is started with them
        assert c.post("/v1/tools/run", json=call).status_code == 400


# ---------------------------------------------------------------- the web page ------------

@pytest.fixture(scope="module")
def plot_model(default_model_path):
    """The default model as `lmforge serve` loads it: with tools it runs lmforge's shipped tool
    adapter, which writes the plotting program itself."""
    import lmforge
    from lmforge.tools.shipped import shipped_tool_adapter

    if shipped_tool_adapter() is None:
        pytest.skip("the tool adapter's weights are not in this checkout")
    return lmforge.load(str(default_model_path), device="cpu")


def test_chat_page_shows_the_figure_inline(plot_model):
    """In headless Chromium: asked for a plot, the default model calls the python tool, the
    sandbox draws it, and the page shows the PNG inline in the conversation (kept on reload)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import live_server
    from lmforge.serve import ServeConfig, create_app
    from test_serve_live import ARTIFACTS, _browser

    app = create_app(plot_model.model, plot_model.tokenizer, ServeConfig(slots=2, ctx=2048, tools=["python"]))
    with live_server(app) as url:
        d = _browser()
        try:
            d.get(url + "/")
            WebDriverWait(d, 30).until(lambda d: d.execute_script("return state.tools.length") == 1)
            d.execute_script("state.settings.seed = 7")  # the page's sampling, made repeatable
            box = d.find_element(By.ID, "input")
            box.send_keys("Plot sin(x) from 0 to 2 pi.")
            box.send_keys(Keys.ENTER)
            WebDriverWait(d, 120, poll_frequency=0.2).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) >= 2
                and not d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming") and d.execute_script("return !state.controller"))
            img = d.find_element(By.CSS_SELECTOR, "#messages .msg.tool img.figure")
            assert img.get_attribute("src").startswith("data:image/png;base64,")
            assert d.execute_script("return [arguments[0].complete, arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [True, 640, 480]
            tool = d.find_element(By.CSS_SELECTOR, ".msg.tool .content").text
            assert "[figure 1: 640x480 PNG]" in tool
            code = d.find_element(By.CSS_SELECTOR, ".msg.assistant .calls code").text
            assert "matplotlib" in code and "sin" in code
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            d.save_screenshot(str(ARTIFACTS / "serve_chat_figure.png"))
            # kept in the browser: the figure is there after a reload
            d.refresh()
            WebDriverWait(d, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.tool img.figure"))
            saved = json.loads(d.execute_script("return localStorage.getItem('lmforge.conversations')"))
            roles = [m["role"] for m in saved[0]["messages"]]
            assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"
        finally:
            d.quit()
