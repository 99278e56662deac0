"""`lmforge pull OWNER/NAME` brings a vision-language checkpoint whole: weights, tokenizer and the
image preprocessing config, so the pulled folder loads as a VLM with the Hub's tile sizes. The
"Hub" is a local folder laid out as SmolVLM's repository is (no network)."""
from __future__ import annotations

import fnmatch
import json
import shutil
import sys
import types
import urllib.error
from pathlib import Path

import pytest

from _vlm_tiny import vlm_folder

MODEL_ID = "org/tiny-vlm"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub repository folder: the tiny VLM with SmolVLM's preprocessor_config.json (sizes
    unlike the defaults, so a pull that dropped it would show), plus files a pull must skip."""
    repo = tmp_path / "hub" / MODEL_ID
    shutil.copytree(vlm_folder(), repo)
    proc = json.loads((repo / "processor_config.json").read_text())
    (repo / "processor_config.json").unlink()
    pre = {**proc["image_processor"], "size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32}}
    (repo / "preprocessor_config.json").write_text(json.dumps(pre))
    (repo / "README.md").write_text("model card")
    (repo / "onnx").mkdir()
    (repo / "onnx" / "model.onnx").write_bytes(b"not wanted")
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    return repo


def _check_pulled(path: Path):
    import lmforge
    from lmforge.vision import VLM

    assert (path / "preprocessor_config.json").exists() and not (path / "onnx").exists()
    lm = lmforge.load(str(path), device="cpu")
    assert isinstance(lm.model, VLM)
    assert (lm.model.image_config.longest_edge, lm.model.image_config.tile) == (96, 32)


def test_pull_with_huggingface_hub(hub, monkeypatch):
    from lmforge.pull import pull

    def snapshot_download(model_id, revision, local_dir, allow_patterns, token=None):
        src = hub.parent.parent / model_id
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, Path(local_dir) / rel)
        return local_dir

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    _check_pulled(pull(MODEL_ID))


def test_pull_without_huggingface_hub(hub, monkeypatch):
    import lmforge.hub as hub_mod
    import lmforge.pull as pull_mod

    def download(url: str, dest: Path, auth=None, progress=True):
        rel = url.split(f"/{MODEL_ID}/resolve/main/", 1)[1]
        src = hub / rel
        if not src.is_file():
            raise urllib.error.HTTPError(url, 404, "not found", None, None)
        shutil.copy(src, dest)

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: the plain-HTTP path
    monkeypatch.setattr(hub_mod, "download", download)
    _check_pulled(pull_mod.pull(MODEL_ID))
