"""Generation with images: one prefill on the merged embeddings (text + image features), then
the text model's ordinary cached decoding, one token per step.

The sampling rules (stop ids, budgets, penalties, stop strings) are `lmforge.sampling`'s rows,
the same as the engine's; only the prefill differs, which is why this loop exists beside the
engine's (whose backends take token ids only). Prompts without images go to the engine.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from lmforge.sampling import SamplingParams, process_rows, sample_next, start_rows


@torch.inference_mode()
def generate_with_images(vlm, ids: list[int], pixel_values: torch.Tensor | None = None,
                         pixel_attention_mask: torch.Tensor | None = None, params: SamplingParams | None = None,
                         stop_ids: set[int] | None = None,
                         should_stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
    """Yield token ids for one prompt `ids` whose `<image>` tokens take `pixel_values`' features
    (`VisionPrompt.pixel_values`, [1, N, 3, H, W]). Greedy unless `params` says otherwise."""
    params = params or SamplingParams()
    dev = vlm.lm_head.weight.device
    row = start_rows(params, [ids], vlm.cfg, dev, stop_ids, None if should_stop is None else lambda _b, out: should_stop(out))[0]
    cache = vlm.new_cache(1, row.capacity)
    idx = torch.tensor([ids], device=dev)
    if pixel_values is not None:
        pixel_values = pixel_values.to(dev)
        pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask.to(dev)
    logits = vlm(idx, pixel_values, pixel_attention_mask, cache=cache)[:, -1].float()
    gen = torch.Generator(device=dev).manual_seed(params.seed) if params.seed is not None else None
    while True:
        tok = int(sample_next(process_rows([row], logits), params, gen)[0])
        if row.accept(tok):
            yield tok
        if row.finish is not None:
            return
        logits = vlm(torch.tensor([[tok]], device=dev), cache=cache)[:, -1].float()


def chat_with_images(vlm, tokenizer, messages: list[dict], params: SamplingParams | None = None) -> str:
    """The assistant's reply to `messages` (content parts may be images), as text."""
    prompt = vlm.render_chat(tokenizer, messages)
    out = list(generate_with_images(vlm, prompt.ids, prompt.pixel_values, prompt.pixel_attention_mask, params,
                                    stop_ids=_stop_ids(tokenizer)))
    return tokenizer.decode(out, skip_special=True)


def _stop_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.stop_ids())
    end = tokenizer.token_to_id("<end_of_utterance>")  # Idefics3 / SmolVLM end their turns with it
    return ids | ({end} if end is not None else set())
