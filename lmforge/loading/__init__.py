"""Loading and saving models: GGUF files, Hugging Face folders, lmforge run folders.

    model, tok = load_model(None)            # the default model
    model, tok = load_model("path/to/model.gguf", dtype="bf16")
    save_hf(model, tok, "out/")              # a folder transformers loads
"""
from lmforge.loading.hf import config_from_hf, config_to_hf, save_hf
from lmforge.loading.load import load_model, load_tokenizer, read_model_files
from lmforge.loading.resolve import DEFAULT_MODEL_ID, default_model_path, resolve_model_path

__all__ = [
    "DEFAULT_MODEL_ID",
    "config_from_hf",
    "config_to_hf",
    "default_model_path",
    "load_model",
    "load_tokenizer",
    "read_model_files",
    "resolve_model_path",
    "save_hf",
]
