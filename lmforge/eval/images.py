"""Evaluation items about pictures, for a vision-language model.

An item of a user JSONL task may carry `"image"` (a path, relative to the task file, or a data:
URL). Such an item is asked as the model is used: one user turn holding the picture and the
item's `input`, rendered by the model's chat template with its image tokens
(`VLM.render_chat`). Multiple choice scores each choice's log-likelihood as the assistant's
reply (`Score`, as text tasks are scored); generation is greedy up to the end of the turn, the
answer then extracted and matched as for text. Image items are zero-shot (a few-shot prompt
would need its examples' pictures too)."""
from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.eval.scoring import Score


def _vlm(backend, task):
    model = getattr(backend, "model", None)
    if model is None or not hasattr(model, "render_chat"):
        raise LmforgeError(f"task {task.name} asks about images; this model reads text only (use a vision-language model)")
    return model


def _prompt(model, tokenizer, task, i: int, s):
    if s.fewshot:
        raise LmforgeError(f"task {task.name}: items with images are zero-shot (--fewshot 0)")
    it = task.items[i]
    parts = [{"type": "text", "text": it.prompt}]
    img = it.meta.get("image")
    if img is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": img}} if img.startswith("data:") else {"type": "image", "path": img})
    return model.render_chat(tokenizer, [{"role": "user", "content": parts}])


@torch.no_grad()
def image_loglikelihoods(backend, task, idx: list[int], s, progress=None) -> tuple[list[str], list[list[Score]]]:
    """(the rendered prompts, each item's choices scored after its prompt)."""
    model, tok = _vlm(backend, task), backend.tokenizer
    dev = next(model.parameters()).device
    contexts, scores = [], []
    for i in idx:
        p = _prompt(model, tok, task, i, s)
        pv = [] if p.pixel_values is None else [p.pixel_values.to(dev), p.pixel_attention_mask.to(dev)]
        prompt = torch.tensor([p.ids], device=dev)
        head = model.embed(prompt, *pv)  # the pictures are encoded once for all the choices
        item_scores = []
        for choice in task.items[i].choices:
            cont = tok.encode(choice, add_bos=False)
            c = torch.tensor([cont], device=dev)
            logits = model.text(torch.cat([prompt, c], 1), inputs_embeds=torch.cat([head, model.embed(c)], 1))
            lp = torch.log_softmax(logits[0, len(p.ids) - 1:-1].float(), -1)
            picked = lp[torch.arange(len(cont)), torch.tensor(cont, device=dev)]
            greedy = bool((lp.argmax(-1) == torch.tensor(cont, device=dev)).all())
            item_scores.append(Score(float(picked.sum()), greedy, len(cont)))
        contexts.append(tok.decode(p.ids))
        scores.append(item_scores)
        if progress is not None:
            progress(1)
    return contexts, scores


def image_generate(backend, task, idx: list[int], s, progress=None) -> tuple[list[str], list[str]]:
    """(the rendered prompts, each item's greedy reply)."""
    from lmforge.sampling import SamplingParams
    from lmforge.vision.generate import generate_with_images, reply_stop_ids

    model, tok = _vlm(backend, task), backend.tokenizer
    dev = next(model.parameters()).device
    params = SamplingParams(max_new_tokens=s.max_new_tokens or task.max_new_tokens, temperature=0.0)
    prompts, outs = [], []
    for i in idx:
        p = _prompt(model, tok, task, i, s)
        pv = [None if t is None else t.to(dev) for t in (p.pixel_values, p.pixel_attention_mask)]
        out = list(generate_with_images(model, p.ids, *pv, params, stop_ids=reply_stop_ids(tok)))
        prompts.append(tok.decode(p.ids))
        outs.append(tok.decode(out, skip_special=True).strip())
        if progress is not None:
            progress(1)
    return prompts, outs
