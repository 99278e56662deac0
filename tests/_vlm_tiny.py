"""A tiny random Idefics3 checkpoint folder (built once per test session with transformers, as
tests/test_vision.py builds it) and small images, for the tests of images in chat, the server,
the web page and SFT."""
from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest

_FOLDER: Path | None = None


def vlm_folder() -> Path:
    """The tiny VLM's folder (transformers is a test reference only: skipped without it)."""
    global _FOLDER
    pytest.importorskip("transformers")
    if _FOLDER is None:
        from test_vision import make_folder

        _FOLDER = make_folder(Path(tempfile.mkdtemp(prefix="lmforge-tiny-vlm-")))
    return _FOLDER


def png_bytes(w: int = 50, h: int = 40, seed: int = 0) -> bytes:
    """A random RGB picture as PNG bytes."""
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
