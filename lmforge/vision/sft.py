"""`lmforge sft` on conversations with images, for a vision-language model (`VLM`).

The stage is text SFT's (`lmforge.finetune.sft`: the one trainer loop, its batches, its loss, the
same data checks, the assistant-turn loss), with three differences:
- rows are rendered by `lmforge.vision.prompt.render_training` (image tokens expanded by each
  image's tiles) and keep their images, which each batch preprocesses (pictures are not held
  in memory as pixels);
- a batch carries those pixels, and the loss's forward puts image features at the image tokens;
- what trains: the vision encoder is frozen; LoRA goes on the text model, and on the connector
  with `--lora.connector`; `--method full` trains the text model and the connector.
"""
from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.datasets import RecordError, tokenize_examples
from lmforge.finetune.targets import collate
from lmforge.vision.preprocess import preprocess_images
from lmforge.vision.prompt import render_training


def tokenize_vision_examples(vlm, tokenizer, examples: list, max_len: int, on_error: str, report) -> tuple[list[tuple], object]:
    """((ids, loss mask, images) per example, report) as text SFT's `tokenize_examples` makes
    its rows; one whose images do not fit in `max_len` tokens, or whose images cannot be read,
    is skipped or fails like any bad record."""
    def render(ex):
        ids, mask, images = render_training(tokenizer, ex.messages, vlm.image_config, vlm.image_seq_len)
        if vlm.image_token_id in ids[max_len:]:
            raise RecordError(f"its images take more than the {max_len} tokens of a row")
        return ids, mask, images

    return tokenize_examples(tokenizer, examples, max_len, on_error, report, render=render)


def collate_with_pictures(rows: list[tuple], pad_id: int, image_config) -> dict:
    """Text SFT's batch of the rows' tokens, plus the rows' pictures preprocessed (no pixels when
    no row has a picture)."""
    batch = collate([(ids, mask) for ids, mask, _ in rows], pad_id)
    if any(images for _, _, images in rows):
        pics = preprocess_images([images for _, _, images in rows], image_config)
        batch.update(pixel_values=pics.pixel_values, pixel_attention_mask=pics.pixel_attention_mask)
    return batch


def prepare_vlm(vlm, method: str, settings, connector: bool = False) -> list[torch.nn.Parameter]:
    """Freeze the vision encoder; LoRA on the text model (and the connector), or, for `full`,
    the text model and the connector trainable. Returns the parameters to optimize."""
    from lmforge.finetune.lora import LoraSettings, apply_lora

    for p in vlm.parameters():
        p.requires_grad_(False)
    if method == "full":
        params = [p for m in (vlm.text, vlm.connector) for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params
    if method != "lora":
        raise LmforgeError(f"--method {method} is not supported for vision-language models (lora or full)")
    params = apply_lora(vlm.text, settings)
    if connector:
        params += apply_lora(vlm.connector, LoraSettings(r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                                                         targets=["proj"], rslora=settings.rslora))
    return params
