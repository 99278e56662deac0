"""Speculative decoding at temperature 0: a cheap drafter proposes k tokens, the target checks
them all in one forward pass and keeps the longest prefix it agrees with, plus its own next
token. Every kept token is the target's own greedy choice, so the output equals plain greedy
decoding (up to float rounding differences between a one-row and a k-row matmul).

Drafters:
- `NgramDrafter`: prompt lookup. Find the latest earlier occurrence of the context's last n
  tokens (n = 3, 2, 1) and propose what followed it. Free; strong when the reply copies from
  the prompt (summaries, code edits, quoting).
- `ModelDrafter`: greedy decoding with another `FastDecoder`, keeping its own static cache in
  step with the accepted text: a smaller model with the same vocabulary (`draft_model`), or
  the target itself with layers skipped (`self_draft`, no extra weights).

`generate_speculative` yields tokens like the engine and fills a `SpecStats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from lmforge.errors import LmforgeError
from lmforge.fast.decode import FastDecoder, fast_decoder_for


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance": round(self.acceptance, 4),
                "target_calls": self.target_calls, "tokens": self.tokens,
                "tokens_per_target_call": round(self.tokens / max(self.target_calls, 1), 3)}


class NgramDrafter:
    """Prompt-lookup drafting from an index of the context's n-grams (updated incrementally)."""

    def __init__(self, n_max: int = 3):
        self.n_max = n_max

    def start(self, prompt: list[int], capacity: int) -> None:
        self.index: list[dict] = [dict() for _ in range(self.n_max + 1)]
        self.indexed = 0  # n-grams ending at positions < indexed are in the index

    def propose(self, ctx: list[int], k: int) -> list[int]:
        end = len(ctx) - 1  # index n-grams ending before the last token only
        for i in range(max(self.indexed, 1), end + 1):
            for n in range(1, min(self.n_max, i) + 1):
                self.index[n][tuple(ctx[i - n : i])] = i
        self.indexed = max(self.indexed, end + 1)
        for n in range(min(self.n_max, len(ctx)), 0, -1):
            p = self.index[n].get(tuple(ctx[len(ctx) - n :]))
            if p is not None:
                return ctx[p : p + k]
        return []

    def accept(self, n_ctx: int) -> None:
        pass


class ModelDrafter:
    """Greedy proposals from a draft FastDecoder with its own cache."""

    def __init__(self, decoder: FastDecoder):
        self.dec = decoder

    def start(self, prompt: list[int], capacity: int) -> None:
        self.dec.reset(capacity)

    def propose(self, ctx: list[int], k: int) -> list[int]:
        dec = self.dec
        room = dec.capacity - len(ctx)
        k = min(k, room)
        if k <= 0:
            return []
        logits = dec.forward(torch.tensor(ctx[dec.pos :], device=dec.device))
        out: list[int] = []
        buf = torch.empty(1, dtype=torch.long, device=dec.device)
        for i in range(k):
            t = int(logits[-1].argmax())
            out.append(t)
            if i < k - 1:
                buf[0] = t
                logits = dec.forward(buf)
        return out

    def accept(self, n_ctx: int) -> None:
        """The first n_ctx tokens of the context are final; drop cached proposals beyond them."""
        self.dec.rollback(min(self.dec.pos, n_ctx))


def self_draft(target: FastDecoder, layers: list[int] | None = None) -> ModelDrafter:
    """The target with layers skipped. Default: the first half of the layers plus the last two
    (the last layers map the residual stream onto the vocabulary; dropping them costs most)."""
    n = len(target.layers)
    if layers is None:
        layers = sorted(set(range(n // 2)) | {n - 2, n - 1})
    return ModelDrafter(target.draft(layers))


def make_drafter(target: FastDecoder, draft) -> NgramDrafter | ModelDrafter:
    """`draft`: "ngram", "self", "self:0-14,28,29" (layer list), "target" (the target as its own
    draft, for testing), a loaded model, or a FastDecoder."""
    if isinstance(draft, (NgramDrafter, ModelDrafter)):
        return draft
    if isinstance(draft, FastDecoder):
        return ModelDrafter(draft)
    if draft == "ngram":
        return NgramDrafter()
    if draft == "target":
        return self_draft(target, list(range(len(target.layers))))
    if isinstance(draft, str) and draft.startswith("self"):
        layers = None
        if ":" in draft:
            layers = []
            for part in draft.split(":", 1)[1].split(","):
                a, _, b = part.partition("-")
                layers += list(range(int(a), int(b or a) + 1))
        return self_draft(target, layers)
    if hasattr(draft, "cfg"):
        dec = fast_decoder_for(draft)
        if dec is None:
            raise LmforgeError("the draft model cannot run on the fast decoder")
        if draft.cfg.vocab_size != target.cfg.vocab_size:
            raise LmforgeError(f"draft model vocabulary ({draft.cfg.vocab_size}) differs from the target's ({target.cfg.vocab_size})")
        return ModelDrafter(dec)
    raise LmforgeError(f"unknown draft '{draft}' (choose ngram, self, self:LAYERS, or a model)")


@torch.inference_mode()
def generate_speculative(
    model_or_decoder,
    prompt: list[int],
    params,
    draft="ngram",
    k: int = 4,
    stop_ids: set[int] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    stats: SpecStats | None = None,
) -> Iterator[tuple[int, int]]:
    """Greedy speculative decoding of one prompt; yields (0, token) like the engine."""
    from lmforge.engine import _check_prompts

    target = model_or_decoder if isinstance(model_or_decoder, FastDecoder) else fast_decoder_for(model_or_decoder)
    if target is None:
        raise LmforgeError("speculative decoding needs the fast decoder (dense model, no hooks/adapters, LMFORGE_FAST not 0)")
    if params.temperature > 0 or params.repetition_penalty != 1.0:
        raise LmforgeError("speculative decoding is exact only for greedy decoding (temperature 0, no repetition penalty)")
    stats = stats if stats is not None else SpecStats()
    drafter = make_drafter(target, draft)
    capacity = _check_prompts(_Cfg(target.cfg), [prompt], params.max_new_tokens)
    stop_ids = set(params.stop_ids if params.stop_ids is not None else (stop_ids or set()))
    target.reset(capacity)
    drafter.start(prompt, capacity)
    ctx = list(prompt)
    dev = target.device
    nxt = int(target.forward(torch.tensor(prompt, device=dev))[-1].argmax())
    stats.target_calls += 1
    produced: list[int] = []
    while True:
        # `nxt` is the target's greedy token at the end of ctx: emit it
        if nxt in stop_ids:
            return
        produced.append(nxt)
        ctx.append(nxt)
        stats.tokens += 1
        stop_here = should_stop is not None and should_stop(0, produced)
        yield 0, nxt
        left = params.max_new_tokens - len(produced)
        if stop_here or left <= 0 or len(ctx) > capacity:
            return
        # the target's cache holds ctx[:-1]; propose at most what the budget and cache allow
        room = min(k, left - 1, capacity - len(ctx))
        proposal = drafter.propose(ctx, room) if room > 0 else []
        base = target.pos
        logits = target.forward(torch.tensor([nxt] + proposal, device=dev), all_logits=True)
        stats.target_calls += 1
        pred = logits.argmax(-1).tolist()
        n_ok = 0
        while n_ok < len(proposal) and proposal[n_ok] == pred[n_ok]:
            n_ok += 1
        stats.drafted += len(proposal)
        stats.accepted += n_ok
        target.rollback(base + 1 + n_ok)
        for t in proposal[:n_ok]:
            if t in stop_ids:
                return
            produced.append(t)
            ctx.append(t)
            stats.tokens += 1
            stop_here = should_stop is not None and should_stop(0, produced)
            yield 0, t
            if stop_here or len(produced) >= params.max_new_tokens:
                return
        drafter.accept(len(ctx))
        nxt = pred[n_ok]


class _Cfg:
    def __init__(self, cfg):
        self.cfg = cfg
