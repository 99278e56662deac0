"""Generation with images: one prefill on the merged embeddings (text + image features), then
the text model's ordinary cached decoding, one token per step.

It is the engine's loop: the general backend's prefill passes the pixels with the prompt, and
every rule (stop ids, budgets, penalties, stop strings) is `lmforge.sampling`'s, as for text.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from lmforge.sampling import SamplingParams


def generate_with_images(vlm, ids: list[int], pixel_values: torch.Tensor | None = None,
                         pixel_attention_mask: torch.Tensor | None = None, params: SamplingParams | None = None,
                         stop_ids: set[int] | None = None,
                         should_stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
    """Yield token ids for one prompt `ids` whose `<image>` tokens take `pixel_values`' features
    (`VisionPrompt.pixel_values`, [1, N, 3, H, W]), through the one generation loop
    (`lmforge.engine.generate_tokens`). Greedy unless `params` says otherwise."""
    from lmforge.engine import generate_tokens

    images = None if pixel_values is None else (pixel_values, pixel_attention_mask)
    stop = None if should_stop is None else (lambda _b, out: should_stop(out))
    for _row, tok in generate_tokens(vlm, [ids], params or SamplingParams(), stop_ids, stop, images=images):
        yield tok


def chat_with_images(vlm, tokenizer, messages: list[dict], params: SamplingParams | None = None) -> str:
    """The assistant's reply to `messages` (content parts may be images), as text."""
    prompt = vlm.render_chat(tokenizer, messages)
    out = list(generate_with_images(vlm, prompt.ids, prompt.pixel_values, prompt.pixel_attention_mask, params,
                                    stop_ids=reply_stop_ids(tokenizer)))
    return tokenizer.decode(out, skip_special=True)


def reply_stop_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.stop_ids())
    end = tokenizer.token_to_id("<end_of_utterance>")  # Idefics3 / SmolVLM end their turns with it
    return ids | ({end} if end is not None else set())
