"""Idefics3 / SmolVLM folders on disk: which folders are one, and writing a `VLM` back as the
folder it was loaded from (`lmforge merge`, `convert --to hf`, a full finetune): its config and
image processor settings as they were, the weights under the checkpoint's names
(`state_maps.vlm_path`), the tokenizer with its own chat template. transformers loads the result
as Idefics3ForConditionalGeneration. Reading them is lmforge/vision/load.py's."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.loading.state_maps import tensors_to_save, vlm_path

VLM_MODEL_TYPES = ("idefics3", "smolvlm")
CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json")
# Idefics3 / SmolVLM templates read each message's content as a list of parts; lmforge's text
# renderer (lmforge.chat) hands them strings. This prelude turns a string into one text part, so
# text-only chat renders as the model expects; lists pass through, so prompts with images render
# exactly as before. It is taken off again when the tokenizer is saved.
PARTS_PRELUDE = (
    "{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
    "{%- set ns.msgs = ns.msgs + [dict(m, content=[{'type': 'text', 'text': m['content']}])] -%}"
    "{%- else -%}{%- set ns.msgs = ns.msgs + [m] -%}{%- endif -%}{%- endfor -%}{%- set messages = ns.msgs -%}"
)


def vlm_folder(path) -> Path | None:
    """`path` when it is a folder holding an Idefics3 / SmolVLM config.json, else None."""
    folder = Path(path)
    cfg = folder / "config.json"
    if not folder.is_dir() or not cfg.is_file():
        return None
    try:
        mtype = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError, OSError):
        return None  # the text loader reports a broken config.json in its own words
    return folder if mtype in VLM_MODEL_TYPES else None


def save_vlm(vlm, tokenizer, out_dir, dtype: torch.dtype | None = None) -> Path:
    from safetensors.torch import save_file

    src = vlm_folder(getattr(vlm, "source_path", "") or "")
    if src is None:
        raise LmforgeError("saving a vision-language model needs the Idefics3 / SmolVLM folder it was loaded from "
                           "(its config and image processor settings)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (src / name).exists() and (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)
    state = tensors_to_save(vlm, dtype, "text.lm_head.weight" if vlm.cfg.tie_embeddings else None)
    save_file({vlm_path(k): v for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        template = tokenizer.chat_template
        if template and template.startswith(PARTS_PRELUDE):
            tokenizer = replace(tokenizer, chat_template=template[len(PARTS_PRELUDE):])
        tokenizer.save(out)
    return out
