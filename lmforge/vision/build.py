"""A fresh VLM from a text model: a new (small) SigLIP-style tower and connector, untrained,
in front of any lmforge `Transformer`, plus the pieces to make that text model small.

    text = first_layers(lmforge.load(None, quant="none").model, 4)   # SmolLM2's first 4 blocks
    vlm = build_vlm(text, VisionConfig(hidden_size=128, intermediate_size=256, n_layers=3,
                                       n_heads=4, image_size=64, patch_size=8), image_token_id=...)

The model is `lmforge.vision.VLM` as loaded from a hub folder; only the weights are new.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.vision.encoder import VisionConfig
from lmforge.vision.preprocess import ImageConfig
from lmforge.vision.vlm import VLM


def build_vlm(text: Transformer, vision_cfg: VisionConfig, image_token_id: int, scale: int = 2,
              seed: int = 0) -> VLM:
    """An untrained vision tower + connector on `text`. Images are single tiles of
    `vision_cfg.image_size` pixels (no splitting), so each gives `(image_size/patch/scale)^2`
    `<image>` tokens."""
    side = vision_cfg.patches_per_side
    if vision_cfg.image_size % vision_cfg.patch_size or side % scale:
        raise LmforgeError(f"image_size {vision_cfg.image_size} must be a multiple of patch_size {vision_cfg.patch_size} "
                           f"and give a patch grid divisible by scale {scale}")
    if not 0 <= image_token_id < text.cfg.vocab_size:
        raise LmforgeError(f"image_token_id {image_token_id} is outside the text model's vocabulary ({text.cfg.vocab_size})")
    image_cfg = ImageConfig(longest_edge=vision_cfg.image_size, tile=vision_cfg.image_size, do_image_splitting=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vlm = VLM(text, vision_cfg, scale, image_token_id, image_cfg)
        _init_vision(vlm)
    return vlm.to(next(text.parameters()).dtype)


@torch.no_grad()
def _init_vision(vlm: VLM) -> None:
    """SigLIP-like small normal init for the tower; the connector's output starts at the scale of
    the text model's token embeddings, so image tokens neither drown nor vanish among them."""
    for m in vlm.vision_model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    emb_rms = vlm.text.model.embed_tokens.weight.float().pow(2).mean().sqrt()
    w = vlm.connector.proj.weight
    # the input is post-LayerNorm features (unit scale per element): std = rms / sqrt(fan_in)
    nn.init.normal_(w, std=float(emb_rms) / w.shape[1] ** 0.5)


def first_layers(text: Transformer, n_layers: int) -> Transformer:
    """A smaller text model: `text`'s embeddings, first `n_layers` blocks, final norm and output
    head (copies; `text` is left as it was). A cheap way to keep a pretrained model's vocabulary
    and word embeddings at a fraction of its compute."""
    cfg = text.cfg
    if not 1 <= n_layers <= cfg.n_layers:
        raise LmforgeError(f"n_layers must be between 1 and {cfg.n_layers}, got {n_layers}")
    per_layer = {f: getattr(cfg, f)[:n_layers] for f in ("layer_types", "rope_layers") if getattr(cfg, f) is not None}
    small_cfg = dataclasses.replace(cfg, n_layers=n_layers, **per_layer)
    small = Transformer(small_cfg).to(next(text.parameters()).dtype)
    state = {k: v for k, v in text.state_dict().items()
             if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n_layers)}
    missing, unexpected = small.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _derived_keys(small)]
    if missing or unexpected:
        raise LmforgeError(f"cannot cut {type(text).__name__} to {n_layers} layers: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return small


def _derived_keys(model: nn.Module) -> set[str]:
    """Buffers a Transformer rebuilds itself (RoPE tables), and a tied head."""
    keys = {n for n, _ in model.named_buffers()}
    if getattr(model.cfg, "tie_embeddings", False):
        keys.add("lm_head.weight")
    return keys


def pixels(images, image_cfg: ImageConfig) -> torch.Tensor:
    """[N, 1, 3, H, W] pixel_values of RGB images already at the tile size: the rescale and
    normalisation of `preprocess_images` without its resizing (which leaves such an image as
    it is), vectorised for training batches."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])  # [N, H, W, 3] uint8
    if arr.shape[1] != image_cfg.tile or arr.shape[2] != image_cfg.tile:
        raise LmforgeError(f"images must be {image_cfg.tile}x{image_cfg.tile}, got {arr.shape[2]}x{arr.shape[1]}")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    if image_cfg.do_rescale:  # in float64 then rounded to float32, as transformers (and preprocess) round
        x = (x.double() * image_cfg.rescale_factor).float()
    if image_cfg.do_normalize:
        mean = torch.tensor(image_cfg.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(image_cfg.image_std).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x[:, None]
