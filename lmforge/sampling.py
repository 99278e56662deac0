"""Sampling parameters, the one logits-processor chain and the per-row bookkeeping that every
decode loop shares: the engine's (`lmforge.engine.generate_tokens`, with its KV-cache, fused and
CUDA-graph backends), speculative decoding's, and the server's scheduler's.

A `Row` is one sequence being decoded. `Row.process` shapes its next-token logits (logit bias,
repetition penalty, presence/frequency penalties, banned ids), `sample_next` picks the token,
and `Row.accept` decides what the token means: a stop id ends the row unseen; otherwise the
token is produced and the row may end on the caller's `should_stop` (stop strings), its token
budget or the context. Loops only move tokens through a model; these rules live here once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from lmforge.errors import LmforgeError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: set[int] | None = None  # default: the tokenizer's EOS / end-of-turn ids
    # speculative drafting for a single greedy sequence on the fast decoder (lmforge.fast.speculative):
    # none | auto | ngram | self | self:LAYERS | a draft model's path (or a loaded model); batches ignore it
    draft: object = "none"


# What a user gets when neither they nor the model's generation_config.json say otherwise:
# llama.cpp's defaults, which keep small models on track at ordinary temperatures.
RECOMMENDED_SAMPLING = {"top_k": 40, "top_p": 0.95, "min_p": 0.05}
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def recommended_sampling(model) -> dict:
    """The sampling the model recommends (its generation_config.json, kept in cfg.extra by the
    loader) over llama.cpp's defaults. `temperature` is present only when the model names one."""
    rec = dict(RECOMMENDED_SAMPLING)
    rec.update((getattr(getattr(model, "cfg", None), "extra", None) or {}).get("sampling", {}))
    return rec


def with_recommended(params: "SamplingParams", model, given: set[str]) -> "SamplingParams":
    """`params` with every sampling field the caller did not give (not in `given`) taken from
    the model's recommendation; temperature stays as given (greedy unless set)."""
    import dataclasses

    rec = {k: v for k, v in recommended_sampling(model).items() if k not in given and k != "temperature"}
    return dataclasses.replace(params, **rec)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present (`seen` is a bool mask [B, V])."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits [B, V] (fp32)."""
    if p.temperature <= 0:
        return logits.argmax(-1)
    if p.top_k and p.top_k < logits.shape[-1]:
        # only the k candidates can be drawn: shape and draw among them (the same distribution as
        # masking the whole vocabulary, ~20x less work: the server samples every row every step)
        values, ids = torch.topk(logits, p.top_k, dim=-1)
        kth = values[..., -1:]
        if bool(((logits >= kth).sum(-1) == p.top_k).all()):  # else ties with the k-th stay in, below
            pick = _sample_shaped(values / p.temperature, p, generator, presorted=True)
            return ids.gather(-1, pick[..., None]).squeeze(-1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return _sample_shaped(logits / p.temperature, p, generator)


def _sample_shaped(logits: torch.Tensor, p: SamplingParams, generator, presorted: bool = False) -> torch.Tensor:
    """top-p, min-p, then a draw; `presorted`: each row's logits already descend."""
    if p.top_p < 1.0:
        sorted_logits, order = (logits, None) if presorted else torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[..., 0] = False  # even a top_p that rounds to 0 keeps the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = sorted_logits if presorted else torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def context_capacity(max_seq_len: int, prompt_lens: list[int], max_new_tokens: int) -> int:
    """Cache positions a batch needs: its longest prompt plus the budget, within the context."""
    if not prompt_lens or min(prompt_lens) == 0:
        raise LmforgeError("empty prompt")
    longest = max(prompt_lens)
    if longest > max_seq_len:
        raise LmforgeError(f"prompt is {longest} tokens, longer than the model's context of {max_seq_len} tokens")
    return min(longest + max_new_tokens, max_seq_len)


@dataclass
class Row:
    """One sequence being decoded: what it produced, and when it must end (`finish`)."""

    params: SamplingParams
    prompt_len: int
    capacity: int  # cache positions: the row ends before feeding a token past them
    stop_ids: set[int]
    should_stop: Callable[[list[int]], bool] | None = None  # asked after each produced token
    seen: torch.Tensor | None = None  # bool [V]: prompt and output tokens (repetition penalty)
    counts: dict[int, int] = field(default_factory=dict)  # output token -> times (presence/frequency)
    banned: list[int] = field(default_factory=list)  # ids never sampled (ignore_eos bans the stop ids)
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    produced: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" | "length" once the row has ended

    @classmethod
    def start(cls, params: SamplingParams, prompt: list[int], capacity: int, stop_ids, vocab: int, device,
              should_stop=None, **kw) -> "Row":
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(prompt, device=device)] = True
        return cls(params, len(prompt), capacity, set(stop_ids), should_stop, seen, **kw)

    @property
    def shapes_logits(self) -> bool:
        return (self.seen is not None or bool(self.logit_bias) or bool(self.banned)
                or bool(self.counts and (self.presence_penalty or self.frequency_penalty)))

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits chain for this row's next token (logits [V], fp32; a new tensor if changed)."""
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), device=logits.device)
            logits = logits.index_add(0, ids, torch.tensor(list(self.logit_bias.values()), device=logits.device,
                                                           dtype=logits.dtype))
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty)
        if self.counts and (self.presence_penalty or self.frequency_penalty):
            ids = torch.tensor(list(self.counts), device=logits.device)
            c = torch.tensor(list(self.counts.values()), device=logits.device, dtype=logits.dtype)
            logits = logits.index_add(0, ids, -(self.presence_penalty + self.frequency_penalty * c))
        if self.banned:
            logits = logits.index_fill(0, torch.tensor(self.banned, device=logits.device), float("-inf"))
        return logits

    def accept(self, tok: int) -> bool:
        """Take the sampled `tok`; True when it is output (a stop id is not). Sets `finish` when
        the row ends here: the caller's `should_stop` is asked before the caller sees the token,
        so per-token state (a text stream) is current when it does."""
        if tok in self.stop_ids:
            self.finish = "stop"
            return False
        self.produced.append(tok)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        if self.seen is not None:
            self.seen[tok] = True
        if self.should_stop is not None and self.should_stop(self.produced):
            self.finish = "stop"
        elif len(self.produced) >= self.params.max_new_tokens or self.prompt_len + len(self.produced) > self.capacity:
            self.finish = "length"
        return True


def process_rows(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """`Row.process` over a batch's logits [n, V] (untouched when no row shapes them)."""
    if not any(r.shapes_logits for r in rows):
        return logits
    return torch.stack([r.process(lg) if r.shapes_logits else lg for r, lg in zip(rows, logits)])


def start_rows(params: SamplingParams, prompts: list[list[int]], model_cfg, device, stop_ids=None,
               should_stop: Callable[[int, list[int]], bool] | None = None) -> list[Row]:
    """A `Row` per prompt, sharing one cache capacity; `params.stop_ids` over the caller's
    `stop_ids` (a tokenizer's), and `should_stop(row, produced)` bound to each row."""
    capacity = context_capacity(model_cfg.max_seq_len, [len(p) for p in prompts], params.max_new_tokens)
    stops = set(params.stop_ids if params.stop_ids is not None else (stop_ids or set()))
    return [Row.start(params, p, capacity, stops, model_cfg.vocab_size, device,
                      None if should_stop is None else partial(should_stop, b)) for b, p in enumerate(prompts)]
