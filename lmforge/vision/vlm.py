"""The vision-language model: SigLIP encoder + Idefics3 connector + lmforge's one text model.

Images are encoded tile by tile, pixel-shuffled and projected to the text model's width; the
result replaces the token embeddings at the prompt's `<image>` positions, in order, and the
text model (`lmforge.model.Transformer`, unchanged) runs on those embeddings. So the KV cache,
the sampling and everything else of the text path apply as they are; only the prefill of a
prompt with images differs. Without pixels a VLM is its text model (chat, generate, serve).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.vision.connector import Connector
from lmforge.vision.encoder import VisionConfig, VisionEncoder, patch_mask_from_pixels
from lmforge.vision.preprocess import ImageConfig


class VLM(nn.Module):
    def __init__(self, text: Transformer, vision_cfg: VisionConfig, scale: int, image_token_id: int,
                 image_config: ImageConfig | None = None):
        super().__init__()
        self.vision_model = VisionEncoder(vision_cfg)
        self.connector = Connector(vision_cfg.hidden_size, text.cfg.d_model, scale)
        self.text = text
        self.image_token_id = image_token_id
        self.image_config = image_config or ImageConfig(tile=vision_cfg.image_size)
        # <image> tokens per tile: the tile's patches after the pixel shuffle
        self.image_seq_len = vision_cfg.patches_per_side ** 2 // (scale * scale)

    # The text model's face, so the engine, the API and the server use a VLM as they use it.
    @property
    def cfg(self):
        return self.text.cfg

    @property
    def lm_head(self):
        return self.text.lm_head

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.text.head(h)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None):
        return self.text.new_cache(batch_size, max_len, dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # -- images -------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[image tokens, d_model] for pixel_values [B, N, 3, H, W]: one row per `<image>` token,
        in prompt order. All-zero slots are padding (prompts with fewer tiles) and are skipped,
        as transformers skips them."""
        p = self.vision_model.cfg.patch_size
        pixels = pixel_values.flatten(0, 1).to(next(self.vision_model.parameters()).dtype)
        real = (pixels != 0).flatten(1).any(1)
        pixels = pixels[real]
        if pixel_attention_mask is None:
            mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool, device=pixels.device)
        else:
            mask = pixel_attention_mask.flatten(0, 1)[real].bool()
        feats = self.connector(self.vision_model(pixels, patch_mask_from_pixels(mask, p)))
        return feats.reshape(-1, feats.shape[-1])

    def embed(self, idx: torch.Tensor, pixel_values: torch.Tensor | None = None,
              pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, C] of `idx` with image features at its `<image>` tokens."""
        x = self.text.model.embed_tokens(idx)
        if pixel_values is None:
            return x
        feats = self.image_features(pixel_values, pixel_attention_mask).to(x.dtype)
        at = idx == self.image_token_id
        if int(at.sum()) != feats.shape[0]:
            raise LmforgeError(f"the prompt has {int(at.sum())} image tokens but the images give {feats.shape[0]} features "
                               f"({self.image_seq_len} per tile)")
        return x.masked_scatter(at[..., None], feats)

    def forward(self, idx: torch.Tensor, pixel_values: torch.Tensor | None = None,
                pixel_attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """The text model's forward (`Transformer.forward`'s options: cache, rows, ...) on `idx`,
        with image features in place of its `<image>` tokens when pixels are given."""
        if pixel_values is None:
            return self.text(idx, **kw)
        return self.text(idx, inputs_embeds=self.embed(idx, pixel_values, pixel_attention_mask), **kw)

    def render_chat(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True):
        """`lmforge.vision.prompt.render_chat` with this model's image settings."""
        from lmforge.vision.prompt import render_chat

        return render_chat(tokenizer, messages, self.image_config, self.image_seq_len, add_generation_prompt)
