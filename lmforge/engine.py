"""The one generation engine, on token ids, with a KV cache.

Prefill every prompt once (rows of unequal length, right-padded, each at its own positions),
then decode one token per active row per step. Sampling: temperature, top-k, top-p,
repetition penalty, seeded. Stops: EOS/end-of-turn ids, stop strings, max new tokens.
`generate_naive` recomputes the whole sequence every step; it is the test oracle for the cache.

Text-level streaming (`stream_text`) decodes incrementally and holds back characters that could
be the start of a stop string, so a stop string never leaks into the output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

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
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[..., 0] = False  # even a top_p that rounds to 0 keeps the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_prompts(model, prompts: list[list[int]], max_new_tokens: int) -> int:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("empty prompt")
    longest = max(len(p) for p in prompts)
    ctx = model.cfg.max_seq_len
    if longest > ctx:
        raise LmforgeError(f"prompt is {longest} tokens, longer than the model's context of {ctx} tokens")
    return min(longest + max_new_tokens, ctx)


def _prefill(model, cache, prompts: list[list[int]], device) -> torch.Tensor:
    """fp32 logits [B, V] at every prompt's last position, the prompts written into `cache`.
    Identical prompts (a GRPO group, System 2's N samples) are prefilled once and their cache
    rows copied."""
    first: dict[tuple, int] = {}
    lead = [first.setdefault(tuple(p), b) for b, p in enumerate(prompts)]
    uniq = sorted(set(lead))
    T = max(len(prompts[b]) for b in uniq)  # from the host's own lists: no wait for the device
    idx = torch.zeros(len(uniq), T, dtype=torch.long, device=device)
    for j, b in enumerate(uniq):
        idx[j, : len(prompts[b])] = torch.tensor(prompts[b], device=device)
    lens = torch.tensor([len(prompts[b]) for b in uniq], device=device)
    logits = model(idx, cache=cache, rows=torch.tensor(uniq, device=device), n_new=lens)
    last = logits[torch.arange(len(uniq), device=device), lens - 1].float()
    copies = [b for b, a in enumerate(lead) if a != b]
    if copies:
        cache.copy_rows([lead[b] for b in copies], copies)
    at = {b: j for j, b in enumerate(uniq)}
    return last[torch.tensor([at[a] for a in lead], device=device)]


@torch.inference_mode()
def generate_tokens(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: set[int] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> Iterator[tuple[int, int]]:
    """Yield (row, token_id) as tokens are produced; a row ends on a stop id, `should_stop`, the
    token budget, or the context limit."""
    if len(prompts) == 1:  # one sequence: the static-cache fast path when it supports the model
        from lmforge.fast.decode import fast_decoder_for

        fast = fast_decoder_for(model)
        if fast is not None:
            yield from fast.generate_tokens(prompts[0], params, stop_ids, should_stop)
            return
    device = model.lm_head.weight.device
    B = len(prompts)
    capacity = _check_prompts(model, prompts, params.max_new_tokens)
    stop_ids = set(params.stop_ids if params.stop_ids is not None else (stop_ids or set()))
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    cache = model.new_cache(B, capacity)
    vocab = model.cfg.vocab_size
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor(p, device=device)] = True
    last = _prefill(model, cache, prompts, device)
    active = list(range(B))
    produced = [[] for _ in range(B)]
    for _ in range(params.max_new_tokens):
        rows = torch.tensor(active, device=device)
        step_logits = last
        if seen is not None:
            step_logits = apply_repetition_penalty(step_logits, seen[rows], params.repetition_penalty)
        nxt = sample_next(step_logits, params, gen)
        still = []
        for j, b in enumerate(active):
            tok = int(nxt[j])
            if tok in stop_ids:
                continue
            produced[b].append(tok)
            # ask before yielding so a caller's per-token state is current when it sees the token
            stop_here = should_stop is not None and should_stop(b, produced[b])
            yield b, tok
            if seen is not None:
                seen[b, tok] = True
            if stop_here:
                continue
            if int(cache.lengths[b]) + 1 > capacity:
                continue
            still.append((j, b))
        if not still or len(produced[still[0][1]]) >= params.max_new_tokens:
            break
        keep = torch.tensor([j for j, _ in still], device=device)
        active = [b for _, b in still]
        tokens = nxt[keep][:, None]
        logits = model(tokens, cache=cache, rows=torch.tensor(active, device=device))
        last = logits[:, -1].float()


@torch.inference_mode()
def generate_naive(model, prompt: list[int], params: SamplingParams, stop_ids: set[int] | None = None) -> list[int]:
    """Greedy/sampled decoding without a cache: the whole sequence every step (test oracle)."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    stop_ids = set(params.stop_ids if params.stop_ids is not None else (stop_ids or set()))
    ids = list(prompt)
    out = []
    for _ in range(params.max_new_tokens):
        logits = model(torch.tensor([ids], device=device))[:, -1].float()
        if params.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, torch.tensor(ids, device=device)] = True
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        tok = int(sample_next(logits, params, gen)[0])
        if tok in stop_ids:
            break
        ids.append(tok)
        out.append(tok)
        if len(ids) >= model.cfg.max_seq_len:
            break
    return out


class TextStream:
    """Incremental detokenization for one row, holding back text that might begin a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already released
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            return ""
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped = True
                piece = text[self.emitted : at]
                self.emitted = at
                return piece
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(text) - hold
        piece = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids)
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece

    @property
    def text(self) -> str:
        full = self.tok.decode(self.ids)
        return full[: self.emitted] if self.stopped else full


def stream_text(model, tokenizer, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as text becomes final; stop strings end a row and are not emitted."""
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    pending: dict[int, str] = {}

    def should_stop(b, _ids):
        pending[b] = streams[b].push(_ids[-1])
        return streams[b].stopped

    for b, _tok in generate_tokens(model, prompts, params, stop_ids=tokenizer.stop_ids(), should_stop=should_stop):
        piece = pending.pop(b, "")
        if piece:
            yield b, piece
    for b, s in enumerate(streams):
        tail = s.flush()
        if tail:
            yield b, tail


def generate_text(model, tokenizer, prompts: list[list[int]], params: SamplingParams) -> list[dict]:
    """Complete texts per row with token counts and why each row finished."""
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    counts = [0] * len(prompts)

    def should_stop(b, ids):
        streams[b].push(ids[-1])
        return streams[b].stopped

    for b, _tok in generate_tokens(model, prompts, params, stop_ids=tokenizer.stop_ids(), should_stop=should_stop):
        counts[b] += 1
    out = []
    for b, s in enumerate(streams):
        s.flush()
        finish = "stop" if s.stopped or counts[b] < params.max_new_tokens else "length"
        out.append({"text": s.text, "ids": list(s.ids), "completion_tokens": counts[b], "prompt_tokens": len(prompts[b]), "finish_reason": finish})
    return out
