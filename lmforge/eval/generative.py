"""Generative scoring: greedy completions with stop sequences, answer extraction, exact match.

Extraction follows BIG-bench's `postprocess_output`: cut at the task's stop string (keeping it),
then keep the first match of the task's `output_regex` (empty when nothing matches). Exact match
compares the extracted answer with each target after stripping surrounding whitespace (BIG-bench
compares unstripped strings; its prompts end in a space the model rarely repeats).
"""
from __future__ import annotations

import re
from typing import Callable

from lmforge.engine import SamplingParams, generate_text


def extract_answer(text: str, output_regex: str | None = None, stop_string: str | None = None) -> str:
    if stop_string:
        at = text.find(stop_string)
        if at > 0:
            text = text[: at + len(stop_string)]
    if output_regex:
        m = re.search(output_regex, text)
        return m.group(0) if m else ""
    return text


def exact_match(answer: str, targets: list[str]) -> bool:
    a = answer.strip()
    return any(a == t.strip() for t in targets)


def generate_batched(model, tokenizer, prompts: list[list[int]], params: SamplingParams, batch_size: int = 8,
                     progress: Callable[[int], None] | None = None) -> list[str]:
    """Completions for token-id prompts, `batch_size` at a time (similar lengths together)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        res = generate_text(model, tokenizer, [prompts[i] for i in chunk], params)
        for i, r in zip(chunk, res):
            out[i] = r["text"]
        if progress is not None:
            progress(len(chunk))
    return out
