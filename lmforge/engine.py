"""The one generation loop, on token ids: prefill every prompt once, then decode one token per
active row per step, until each row ends (`lmforge.sampling.Row`: stop ids, stop strings via
`should_stop`, the token budget, the context).

The loop moves tokens through a backend with one small interface (`prefill(prompts)` -> logits
[B, V], `step(tokens, rows)` -> logits [n, V]): `CacheBackend`, the model's own forward with a KV
cache (any batch, any model), or, for one sequence, the fused static-cache decoder
(`lmforge.fast.decode.FastDecoder`, with CUDA graphs on a GPU). Speculative decoding is that
decoder's other step strategy (`lmforge.fast.speculative`), chosen by `params.draft`. Sampling
parameters, the logits chain and the rows' bookkeeping live in `lmforge.sampling`; the server's
scheduler (continuous batching) uses the same rows. `generate_naive` recomputes the whole
sequence every step; it is the test oracle.

Text-level streaming (`stream_text`) decodes incrementally and holds back characters that could
be the start of a stop string, so a stop string never leaks into the output.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from lmforge.sampling import (RECOMMENDED_SAMPLING, SAMPLING_KEYS, SamplingParams,  # noqa: F401  (re-exported: the generation API)
                              apply_repetition_penalty, process_rows, recommended_sampling,
                              sample_next, start_rows, with_recommended)


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


class CacheBackend:
    """The general backend: the model's forward with a KV cache of one row per prompt.
    `images`: (pixel_values, pixel_attention_mask) of a vision-language model's one prompt, whose
    image tokens take their features in the prefill (`lmforge.vision`)."""

    def __init__(self, model, batch: int, capacity: int, images: tuple | None = None):
        self.model = model
        self.device = next(model.parameters()).device  # (a GGUF head has no weight tensor to ask)
        self.cache = model.new_cache(batch, capacity)
        self.images = images

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        if self.images is None:
            return _prefill(self.model, self.cache, prompts, self.device)
        (prompt,) = prompts
        pv, mask = (None if t is None else t.to(self.device) for t in self.images)
        return self.model(torch.tensor([prompt], device=self.device), pv, mask, cache=self.cache)[:, -1].float()

    def step(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        logits = self.model(tokens[:, None], cache=self.cache, rows=torch.tensor(rows, device=self.device))
        return logits[:, -1].float()


def _backend(model, prompts: list[list[int]], capacity: int, images: tuple | None = None):
    """The fused decoder for one prompt where it supports the model, else the KV-cache backend."""
    if images is not None:
        if len(prompts) != 1:
            raise ValueError("prompts with images are generated one at a time")
        return CacheBackend(model, 1, capacity, images)
    if len(prompts) == 1:
        from lmforge.fast.decode import fast_decoder_for

        fast = fast_decoder_for(model)
        if fast is not None:
            fast.begin(capacity)
            return fast
    return CacheBackend(model, len(prompts), capacity)


@torch.inference_mode()
def generate_tokens(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: set[int] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    finished: dict[int, str] | None = None,
    images: tuple | None = None,
) -> Iterator[tuple[int, int]]:
    """Yield (row, token_id) as tokens are produced; a row ends on a stop id, `should_stop(row,
    produced)`, the token budget, or the context limit. `finished`, when given, receives each
    row's reason as it ends ("stop" or "length": the budget or the context). `images`:
    (pixel_values, pixel_attention_mask) for a vision-language model's one prompt."""
    rows = start_rows(params, prompts, model.cfg, next(model.parameters()).device, stop_ids, should_stop)
    backend = _backend(model, prompts, rows[0].capacity, images)
    if not isinstance(backend, CacheBackend) and params.draft not in (None, "none"):
        from lmforge.fast.speculative import resolve_draft, speculate

        spec = resolve_draft(params.draft, params, backend)
        if spec is not None:
            yield from ((0, t) for t in speculate(backend, prompts[0], rows[0], spec))
            if finished is not None:
                finished[0] = rows[0].finish or "length"
            return
    gen = torch.Generator(device=backend.device).manual_seed(params.seed) if params.seed is not None else None
    logits = backend.prefill(prompts)
    active = list(range(len(prompts)))
    while True:
        nxt = sample_next(process_rows([rows[b] for b in active], logits), params, gen)
        keep = []
        for j, b in enumerate(active):
            tok = int(nxt[j])
            if rows[b].accept(tok):
                yield b, tok
            if rows[b].finish is None:
                keep.append(j)
            elif finished is not None:
                finished[b] = rows[b].finish
        if not keep:
            return
        active = [active[j] for j in keep]
        logits = backend.step(nxt[keep] if len(keep) < len(nxt) else nxt, active)


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


def stream_text(model, tokenizer, prompts: list[list[int]], params: SamplingParams, images: tuple | None = None,
                stop_ids: set[int] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as text becomes final; stop strings end a row and are not emitted."""
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    pending: dict[int, str] = {}

    def should_stop(b, _ids):
        pending[b] = streams[b].push(_ids[-1])
        return streams[b].stopped

    for b, _tok in generate_tokens(model, prompts, params, stop_ids=stop_ids or tokenizer.stop_ids(), should_stop=should_stop,
                                   images=images):
        piece = pending.pop(b, "")
        if piece:
            yield b, piece
    for b, s in enumerate(streams):
        tail = s.flush()
        if tail:
            yield b, tail


def generate_text(model, tokenizer, prompts: list[list[int]], params: SamplingParams, images: tuple | None = None,
                  stop_ids: set[int] | None = None) -> list[dict]:
    """Complete texts per row with token counts and why each row finished."""
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    counts = [0] * len(prompts)

    def should_stop(b, ids):
        streams[b].push(ids[-1])
        return streams[b].stopped

    finished: dict[int, str] = {}
    for b, _tok in generate_tokens(model, prompts, params, stop_ids=stop_ids or tokenizer.stop_ids(), should_stop=should_stop,
                                   finished=finished, images=images):
        counts[b] += 1
    out = []
    for b, s in enumerate(streams):
        s.flush()
        finish = finished.get(b, "stop" if s.stopped or counts[b] < params.max_new_tokens else "length")
        out.append({"text": s.text, "ids": list(s.ids), "completion_tokens": counts[b], "prompt_tokens": len(prompts[b]), "finish_reason": finish})
    return out
