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

`speculate` is a step strategy of the one generation loop (`lmforge.engine.generate_tokens`),
taking tokens through the loop's `lmforge.sampling.Row`; `generate_speculative` runs it alone
(benchmarks, tests) and fills a `SpecStats`.

Users reach it through `SamplingParams.draft` (`--draft` on chat/generate): the engine calls
`resolve_draft` for one sequence on the fast decoder. "auto" drafts by prompt lookup (3-token matches, see
`auto_drafter`) when decoding is greedy and decodes plainly when sampling.

Same output: exact up to float rounding with full-precision weights. With int8/int4 weights
the verification pass runs the several-token kernel (per-token symmetric int8 activations)
where plain decoding runs fbgemm's one-token kernel (asymmetric uint8 activations), so at a
near tie the two can pick different tokens and the texts part from there. Measured on the int8
default model, 64 tokens: "auto" gave plain decoding's text on two chat prompts and parted
after 9 tokens of a 512-token summary; "ngram" parted after 43 and 15 tokens on the chat
prompts. Both are greedy decodings of the same quantized model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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
    """Prompt-lookup drafting from an index of the context's n-grams (updated incrementally).
    `n_min`: the shortest match that may propose (1-token matches are frequent and mostly
    wrong in free text; see `auto_drafter`)."""

    def __init__(self, n_max: int = 3, n_min: int = 1):
        self.n_max, self.n_min = n_max, n_min

    def start(self, prompt: list[int], capacity: int) -> None:
        self.index: list[dict] = [dict() for _ in range(self.n_max + 1)]
        self.indexed = 0  # n-grams ending at positions < indexed are in the index

    def propose(self, ctx: list[int], k: int) -> list[int]:
        end = len(ctx) - 1  # index n-grams ending before the last token only
        for i in range(max(self.indexed, 1), end + 1):
            for n in range(1, min(self.n_max, i) + 1):
                self.index[n][tuple(ctx[i - n : i])] = i
        self.indexed = max(self.indexed, end + 1)
        for n in range(min(self.n_max, len(ctx)), self.n_min - 1, -1):
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
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise LmforgeError(f"draft layer {bad[0]} does not exist (the model has layers 0-{n - 1})")
    return ModelDrafter(target.draft(layers))


DRAFT_CHOICES = "none, auto, ngram, self, self:LAYERS (e.g. self:0-14,28,29) or a draft model's path"


def parse_layers(spec: str) -> list[int]:
    """"0-14,28,29" -> [0, ..., 14, 28, 29]."""
    layers: list[int] = []
    try:
        for part in spec.split(","):
            a, _, b = part.strip().partition("-")
            layers += list(range(int(a), int(b or a) + 1))
    except ValueError:
        raise LmforgeError(f"bad draft layers '{spec}' (write them like self:0-14,28,29)") from None
    if not layers:
        raise LmforgeError(f"bad draft layers '{spec}' (write them like self:0-14,28,29)")
    return layers


def is_greedy(params) -> bool:
    return params.temperature <= 0 and params.repetition_penalty == 1.0


def check_draft(draft, params=None):
    """Raise a one-line LmforgeError for a draft setting that cannot work (before any model is
    loaded); returns `draft`. With `params`, an explicit draft also needs greedy decoding."""
    if isinstance(draft, str):
        if draft.startswith("self:"):
            parse_layers(draft.split(":", 1)[1])
        elif draft not in ("none", "auto", "ngram", "self", "target") and not Path(draft).expanduser().exists():
            raise LmforgeError(f"unknown draft '{draft}' (choose {DRAFT_CHOICES}; no file or folder has that name)")
    elif draft is not None and not isinstance(draft, (NgramDrafter, ModelDrafter, FastDecoder)) \
            and not hasattr(draft, "cfg") and not hasattr(getattr(draft, "model", None), "cfg"):
        raise LmforgeError(f"unknown draft {type(draft).__name__} (choose {DRAFT_CHOICES}, or pass a loaded model)")
    if params is not None and draft not in (None, "none", "auto") and not is_greedy(params):
        raise LmforgeError(f"draft '{draft}' needs greedy decoding (temperature 0, no repetition penalty); "
                           "use draft auto or none when sampling")
    return draft


_DRAFT_MODELS: dict = {}  # (path, dtype, device, quant) -> model: a draft is loaded once per process


def _draft_model(path: str, target: FastDecoder):
    """The draft model at `path`, loaded like the target (same dtype, device, quantization)."""
    from lmforge.loading import load_model

    quant = getattr(target, "quant", "none")
    key = (str(Path(path).expanduser().resolve()), target.dtype, str(target.device), quant)
    if key not in _DRAFT_MODELS:
        _DRAFT_MODELS[key] = load_model(key[0], dtype=target.dtype, device=target.device, quant=quant)[0]
    return _DRAFT_MODELS[key]


def auto_drafter() -> NgramDrafter:
    """The drafter behind draft "auto": prompt lookup that proposes only after a 3-token match.

    Why 3: on the int8 default model a verification pass of 2-5 tokens costs about two one-token
    steps (CPU time 22 ms for one token, 42-46 ms for 2-5), so a proposal must be right more
    often than not. Replaying greedy replies of the default model (96 tokens each) through each
    policy with those costs: plain ngram (1-token matches allowed) 0.79x the speed of plain
    decoding on "Write a short story about a robot." and "Explain how photosynthesis works.",
    2-token matches 0.94-0.97x, 3-token matches 0.99-1.00x there, 1.30x on a pancake recipe
    and 2.03x on summarizing a 512-token text (plain ngram: 1.99x). Matches that long rarely
    happen in free text, so it costs nothing there and keeps the gain where the reply copies."""
    return NgramDrafter(n_max=3, n_min=3)


def resolve_draft(draft, params, target: FastDecoder | None = None):
    """What `make_drafter` should build for `draft` under `params`, or None to decode plainly.

    "auto": `auto_drafter()` when decoding is greedy (no proposal = a plain one-token step),
    else None; None on CUDA, where CUDA-graph steps beat verification passes. A path loads that model as the draft (needs `target`). An `lmforge.api.LM`
    stands for its model."""
    if draft is None or draft == "none":
        return None
    if draft == "auto":
        if target is not None and target.device.type == "cuda":
            # on a GPU a CUDA-graph step costs ~1.6 ms (benchmarks/results/decode_gpu.json), far
            # less than an eager verification pass: plain graph decoding is the fast path there
            return None
        return auto_drafter() if is_greedy(params) else None
    check_draft(draft, params)
    if isinstance(draft, str) and draft not in ("ngram", "self", "target") and not draft.startswith("self:"):
        if target is None:
            raise LmforgeError("a draft model path needs the target's fast decoder")
        return _draft_model(draft, target)
    if not hasattr(draft, "cfg") and hasattr(getattr(draft, "model", None), "cfg"):
        return draft.model
    return draft


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
    if isinstance(draft, str) and (draft == "self" or draft.startswith("self:")):
        return self_draft(target, parse_layers(draft.split(":", 1)[1]) if ":" in draft else None)
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
    """Greedy speculative decoding of one prompt, outside the engine (benchmarks, tests); yields
    (0, token) like the engine, which reaches `speculate` itself through `params.draft`."""
    from lmforge.sampling import start_rows

    target = model_or_decoder if isinstance(model_or_decoder, FastDecoder) else fast_decoder_for(model_or_decoder)
    if target is None:
        raise LmforgeError("speculative decoding needs the fast decoder (dense model, no hooks/adapters, LMFORGE_FAST not 0)")
    (row,) = start_rows(params, [prompt], target.cfg, target.device, stop_ids, should_stop)
    for tok in speculate(target, prompt, row, draft, k, stats):
        yield 0, tok


def speculate(target: FastDecoder, prompt: list[int], row, draft, k: int = 4,
              stats: SpecStats | None = None) -> Iterator[int]:
    """The speculative step strategy of the generation loop: yields `row`'s tokens (each taken
    with `row.accept`, which decides when the row ends) until `row.finish` is set."""
    params = row.params
    if params.temperature > 0 or params.repetition_penalty != 1.0:
        raise LmforgeError("speculative decoding is exact only for greedy decoding (temperature 0, no repetition penalty)")
    stats = stats if stats is not None else SpecStats()
    drafter = make_drafter(target, draft)
    drafter.start(prompt, row.capacity)
    ctx = list(prompt)
    dev = target.device
    nxt = int(target.resume(prompt, row.capacity)[-1].argmax())
    stats.target_calls += 1
    while True:
        # `nxt` is the target's greedy token at the end of ctx: emit it
        if not row.accept(nxt):
            return
        ctx.append(nxt)
        stats.tokens += 1
        yield nxt
        if row.finish is not None:
            return
        # the target's cache holds ctx[:-1]; propose at most what the budget and cache allow
        room = min(k, params.max_new_tokens - len(row.produced) - 1, row.capacity - len(ctx))
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
            if not row.accept(t):
                return
            ctx.append(t)
            stats.tokens += 1
            yield t
            if row.finish is not None:
                return
        drafter.accept(len(ctx))
        nxt = pred[n_ok]
