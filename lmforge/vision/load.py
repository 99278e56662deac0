"""Idefics3 / SmolVLM folders (config.json model_type `idefics3` or `smolvlm`) -> a `VLM`.

The text half is an ordinary lmforge text model: its config goes through the HF config mapping
(`lmforge.loading.hf.config_from_hf`) and its weights through the text loader's `build_model`.
The vision half's names already match ours but for a prefix:

    model.vision_model.*                            -> vision_model.*
    model.connector.modality_projection.proj.weight -> connector.proj.weight
    model.text_model.*                              -> text.model.*
    lm_head.weight                                  -> text.lm_head.weight (absent when tied)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.loading.hf import _float, _int, config_from_hf, iter_hf_tensors, read_generation_config
from lmforge.loading.state_maps import vlm_path
from lmforge.loading.vlm_files import PARTS_PRELUDE
from lmforge.vision.encoder import VisionConfig
from lmforge.vision.preprocess import ImageConfig
from lmforge.vision.vlm import VLM

_VISION_ACTS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


def vision_config_from_hf(hf: dict, where: str) -> VisionConfig:
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _VISION_ACTS:
        raise LmforgeError(f"unsupported vision hidden_act '{act}' in {where} (SigLIP's is gelu_pytorch_tanh)")
    for key in ("image_size", "patch_size"):
        if isinstance(hf.get(key), (list, tuple)):
            raise LmforgeError(f"unsupported in {where}: a non-square vision {key}")
    return VisionConfig(
        hidden_size=_int(hf, "hidden_size", where, 1152, high=1 << 16),
        intermediate_size=_int(hf, "intermediate_size", where, 3072, high=1 << 18),
        n_layers=_int(hf, "num_hidden_layers", where, 12, high=1 << 10),
        n_heads=_int(hf, "num_attention_heads", where, 16, high=1 << 10),
        num_channels=_int(hf, "num_channels", where, 3, high=4),
        image_size=_int(hf, "image_size", where, 224, high=1 << 14),
        patch_size=_int(hf, "patch_size", where, 32, high=1 << 10),
        norm_eps=_float(hf, "layer_norm_eps", where, 1e-6),
    )


def read_vlm_config(folder: Path):
    """(text Config, VisionConfig, scale_factor, image_token_id) from config.json."""
    path = Path(folder) / "config.json"
    where = str(path)
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    # Idefics3's text model defaults to rms_norm_eps 1e-5 (transformers' own default for it)
    text_hf = {"model_type": "llama", "rms_norm_eps": 1e-5, **(hf.get("text_config") or {})}
    text = config_from_hf(text_hf, f"{where} (text_config)")
    text.extra["vlm_model_type"] = hf["model_type"]  # extra["model_type"] stays the text family (llama)
    sampling = read_generation_config(Path(folder))
    if sampling:
        text.extra["sampling"] = sampling
    vision = vision_config_from_hf(hf.get("vision_config") or {}, f"{where} (vision_config)")
    scale = _int(hf, "scale_factor", where, 2, high=64)
    if vision.image_size % vision.patch_size or vision.patches_per_side % scale:
        raise LmforgeError(f"{where}: image_size / patch_size ({vision.image_size} / {vision.patch_size}) must be "
                           f"a whole number of patches divisible by scale_factor {scale}")
    return text, vision, scale, _int(hf, "image_token_id", where, 128257, low=0, high=text.vocab_size - 1)


def split_state(state: dict, where: str) -> tuple[dict, dict]:
    """(text model state in lmforge's names, vision + connector state in the VLM's names)."""
    text, vision = {}, {}
    for key, t in state.items():
        ours = vlm_path(key, to_checkpoint=False)
        if ours.startswith("text."):
            text[ours[len("text."):]] = t
        elif ours.startswith(("vision_model.", "connector.proj.")):
            vision[ours] = t
        else:
            raise LmforgeError(f"{where}: unexpected tensor '{key}' for an Idefics3 model")
    return text, vision


def with_parts_template(tok):
    """`tok` whose chat template also takes string contents (when it reads content parts)."""
    from dataclasses import replace

    template = getattr(tok, "chat_template", None)
    if not template or ("'type'" not in template and '"type"' not in template) or template.startswith(PARTS_PRELUDE):
        return tok
    return replace(tok, chat_template=PARTS_PRELUDE + template)


def load_vlm(folder, dtype=torch.float32, device="cpu"):
    """(VLM, Tokenizer or None) from an Idefics3 / SmolVLM folder, weights in `dtype` on `device`."""
    from lmforge.loading.load import _no_init, build_model, parse_dtype
    from lmforge.tokenizer import Tokenizer

    folder = Path(folder)
    dtype = parse_dtype(dtype)
    text_cfg, vision_cfg, scale, image_token_id = read_vlm_config(folder)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in iter_hf_tensors(folder)}
    text_state, vision_state = split_state(state, str(folder))
    text_cfg.tie_embeddings = "lm_head.weight" not in text_state  # a checkpoint without a head ties it
    text = build_model(text_cfg, text_state, "cpu")
    image_config = ImageConfig.from_folder(folder) or ImageConfig.from_dict({"max_image_size": {"longest_edge": vision_cfg.image_size}})
    with _no_init():
        vlm = VLM(text, vision_cfg, scale, image_token_id, image_config).to(dtype)
    wanted = {k for k in vlm.state_dict() if not k.startswith("text.")}
    missing, unexpected = wanted - set(vision_state), set(vision_state) - wanted
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise LmforgeError(f"{folder}: vision weights do not match the config: {what}")
    vlm.load_state_dict(vision_state, strict=False, assign=True)
    tok = with_parts_template(Tokenizer.from_dir(folder)) if (folder / "tokenizer.json").exists() else None
    return vlm.to(device).eval(), tok
