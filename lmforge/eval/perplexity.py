"""Perplexity, per-token loss and bits-per-byte of text, with a sliding window.

Each document is `[document-start token] + tokens(text)`, so every token of the text is scored
and bits-per-byte covers every byte. A document longer than the window is read in windows of
`window` tokens starting every `stride` tokens; each window scores only the tokens no earlier
window scored, so every token is scored once, with at least `window - stride` tokens of context
(except near the start). stride == window means back-to-back chunks (fast, less context), each
starting on the previous chunk's last token so that no token goes unscored.

The window defaults to the model's context (`model.cfg.max_seq_len`) and the stride to half the
window. A window above the context is clipped to it (with a note in `PerplexityResult.notes`,
also passed to `log`): clipping loses no token (each is still scored once) and the model could
not attend further back anyway, so it is not an error. A stride set by the user that no longer
fits the clipped window becomes half of it, with a note; one above a window that was not clipped
is an error.

    loss          mean negative log-likelihood per token (nats)
    perplexity    exp(loss)
    bits_per_byte total NLL / ln 2 / UTF-8 bytes of the text (tokenizer-independent)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmforge.errors import LmforgeError


@dataclass
class PerplexityResult:
    nll: float  # total, nats
    tokens: int
    bytes: int
    token_losses: list[list[float]] = field(default_factory=list)  # per document
    window: int | None = None  # the window and stride actually used (after defaults and clipping)
    stride: int | None = None
    notes: list[str] = field(default_factory=list)  # e.g. the window was clipped to the context

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) over a sequence of n tokens; index 0 is never scored."""
    if not 0 < stride <= window:
        raise LmforgeError(f"stride must be between 1 and the window ({window}); got {stride}")
    out, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + window, n)
        if end > prev_end:
            out.append((begin, end, prev_end))
            prev_end = end
        if end >= n:
            return out
        # move by `stride`, but keep one already-scored token in the window so the first new
        # token is predicted from inside it (stride == window: chunks overlapping by one token)
        begin = min(begin + stride, prev_end - 1)


def resolve_window(context: int, window: int | None = None, stride: int | None = None) -> tuple[int, int, list[str]]:
    """(window, stride, notes) for a model whose context is `context` tokens.

    window: None (or 0) -> the context; above the context -> clipped to it, with a note.
    stride: None (or 0) -> half the window; above a clipped window -> half of it, with a note;
    otherwise it must lie in 1..window.
    """
    notes: list[str] = []
    if context is None or context < 1:
        raise LmforgeError(f"the model's context must be a positive number of tokens; got {context}")
    if window is not None and window < 0:
        raise LmforgeError(f"the perplexity window must be a positive number of tokens; got {window}")
    if not window:
        window = context
    elif window > context:
        notes.append(f"perplexity window {window} is above the model's context ({context} tokens): using {context}")
        window = context
        if stride and stride > window:
            notes.append(f"perplexity stride {stride} is above the clipped window: using {max(1, window // 2)}")
            stride = max(1, window // 2)
    if not stride:
        stride = max(1, window // 2)
    if not 0 < stride <= window:
        raise LmforgeError(f"stride must be between 1 and the window ({window}); got {stride}")
    return window, stride, notes


@torch.inference_mode()
def score_token_ids(model, docs: list[list[int]], window: int | None = None, stride: int | None = None,
                    batch_tokens: int = 4096, progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Per-token NLL (nats) of tokens 1.. of every document, via sliding windows, batched.
    Window and stride as `resolve_window` makes them (default: the context and half of it)."""
    device = model.lm_head.weight.device
    window, stride, _ = resolve_window(model.cfg.max_seq_len, window, stride)
    jobs = []  # (doc, begin, end, first)
    for d, ids in enumerate(docs):
        if len(ids) < 2:
            continue
        jobs += [(d, b, e, f) for b, e, f in windows(len(ids), window, stride)]
    losses: list[list[float | None]] = [[None] * max(len(ids) - 1, 0) for ids in docs]
    left = [0] * len(docs)
    for d, *_ in jobs:
        left[d] += 1
    order = sorted(range(len(jobs)), key=lambda j: -(jobs[j][2] - jobs[j][1]))
    i = 0
    while i < len(order):
        T = jobs[order[i]][2] - jobs[order[i]][1]
        n = max(1, min(len(order) - i, batch_tokens // T))
        batch = [jobs[j] for j in order[i : i + n]]
        i += n
        x = torch.zeros(len(batch), T, dtype=torch.long)
        at, tgt = [], []
        for r, (d, b, e, f) in enumerate(batch):
            x[r, : e - b] = torch.tensor(docs[d][b:e])
            at += [r * T + (t - 1 - b) for t in range(f, e)]  # position predicting token t
            tgt += docs[d][f:e]
        h = model(x.to(device), hidden_only=True).reshape(len(batch) * T, -1)[torch.tensor(at, device=device)]
        tgt_t = torch.tensor(tgt, device=device)
        nll = []
        for s in range(0, h.shape[0], 1024):
            logits = model.head(h[s : s + 1024]).float()
            nll.append(torch.nn.functional.cross_entropy(logits, tgt_t[s : s + 1024], reduction="none"))
        vals = torch.cat(nll).double().cpu().tolist()
        k = 0
        finished = 0
        for d, b, e, f in batch:
            losses[d][f - 1 : e - 1] = vals[k : k + e - f]
            k += e - f
            left[d] -= 1
            finished += left[d] == 0
        if progress is not None and finished:
            progress(finished)
    return losses  # type: ignore[return-value]


def perplexity(model, tokenizer, texts: list[str], window: int | None = None, stride: int | None = None,
               batch_tokens: int = 4096, progress: Callable[[int], None] | None = None,
               log: Callable[[str], None] | None = None) -> PerplexityResult:
    """Loss, perplexity and bits per byte of `texts`. `window` defaults to the model's context
    and `stride` to half the window; a window above the context is clipped (see the module doc),
    and each such note goes to `log` and into the result's `notes`."""
    from lmforge.eval.scoring import doc_start_id

    window, stride, notes = resolve_window(model.cfg.max_seq_len, window, stride)
    for note in notes:
        if log is not None:
            log(note)

    start = doc_start_id(tokenizer)
    if start is None:
        raise LmforgeError("the tokenizer has no BOS/EOS token to start a document")
    docs = [[start] + tokenizer.encode(t, add_bos=False) for t in texts]
    losses = score_token_ids(model, docs, window, stride, batch_tokens, progress)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return PerplexityResult(nll=float(sum(sum(x) for x in losses)), tokens=sum(len(x) for x in losses), bytes=n_bytes,
                            token_losses=losses, window=window, stride=stride, notes=notes)
