"""`lmforge chat --image PATH` and `/image PATH`: the picture goes with the next user message and
the reply equals `LM.chat` on the same conversation; a model that cannot see says so in one line."""
from __future__ import annotations

import io
import sys

import pytest

from _vlm_tiny import png_bytes, vlm_folder
from conftest import run_cli

QUESTION = "what is in this picture?"
FLAGS = ["--dtype", "fp32", "--quant", "none", "--max-new-tokens", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def lm():
    import lmforge

    return lmforge.load(str(vlm_folder()), device="cpu")


@pytest.fixture
def pics(tmp_path):
    out = []
    for seed, size in ((1, (60, 40)), (2, (30, 50))):
        path = tmp_path / f"pic{seed}.png"
        path.write_bytes(png_bytes(*size, seed=seed))
        out.append(str(path))
    return out


def chat(capsys, monkeypatch, stdin: str, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return run_cli(capsys, "chat", "--model", str(vlm_folder()), *FLAGS, *args)


def with_image(path: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": text}]}


def test_image_flag_goes_with_the_first_message(capsys, monkeypatch, lm, pics):
    r = chat(capsys, monkeypatch, f"{QUESTION}\nand now?\n", "--image", pics[0])
    assert r.returncode == 0, r.stderr
    first = lm.chat([with_image(pics[0])], max_new_tokens=8)
    second = lm.chat([with_image(pics[0]), {"role": "assistant", "content": first}, {"role": "user", "content": "and now?"}],
                     max_new_tokens=8)
    assert r.stdout == f"{first}\n{second}\n"


def test_image_command_attaches_to_the_next_message(capsys, monkeypatch, lm, pics):
    r = chat(capsys, monkeypatch, f"hello\n/image {pics[1]}\n/image {pics[1]}.missing\n{QUESTION}\n")
    assert r.returncode == 0, r.stderr
    first = lm.chat([{"role": "user", "content": "hello"}], max_new_tokens=8)
    second = lm.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}, with_image(pics[1])],
                     max_new_tokens=8)
    assert r.stdout == f"{first}\n{second}\n"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing: no such file" in errors[0]


def test_bad_image_and_a_model_that_cannot_see_are_one_line_errors(capsys, monkeypatch, lm, pics, tmp_path):
    import lmforge.cli.commands.chat as chat_cmd
    from lmforge.api import LM

    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes()[:100])
    r = chat(capsys, monkeypatch, f"{QUESTION}\n", "--image", str(bad))
    assert r.returncode != 0 and "truncated" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    monkeypatch.setattr(chat_cmd, "load_lm", lambda cfg: LM(lm.model.text, lm.tokenizer))  # its text model alone
    r = chat(capsys, monkeypatch, f"{QUESTION}\n", "--image", pics[0])
    assert r.returncode != 0 and "does not take images" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = chat(capsys, monkeypatch, f"/image {pics[0]}\nhello\n")
    assert r.returncode == 0 and "error:" in r.stderr and "does not take images" in r.stderr
    text_lm = LM(lm.model.text, lm.tokenizer)
    assert r.stdout == text_lm.chat([{"role": "user", "content": "hello"}], max_new_tokens=8) + "\n"
