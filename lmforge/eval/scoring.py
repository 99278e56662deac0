"""Log-likelihood of continuations given a context, batched, with the context shared by its choices.

Tokenization boundary (the choice made here, as lm-evaluation-harness does):
1. Trailing spaces/tabs of the context move to the front of the continuation ("...A: " + "four"
   becomes "...A:" + " four"), because byte-level BPE glues a space to the word after it: the
   model saw " four" as one token, never ": " then "four".
2. Context and continuation are tokenized together, as one string, and split after the longest
   common token prefix of that and the context tokenized alone (usually all of the context's
   tokens). A token straddling the boundary (rare after step 1) is counted as continuation, so
   the continuation is always scored on the tokens the model would really see for the whole
   text. (Token ids, not character offsets: some tokenizer.json post-processors trim offsets.)
3. An empty context is replaced by one document-start token (`<|endoftext|>` when the vocabulary
   has it, else BOS, else EOS), so the first continuation token has something to condition on.
   When the tokenizer adds BOS by itself (`add_bos`), BOS starts every context.

Batching: one row per context, holding the context once followed by all of its continuations:
`[ctx | choice 1 | choice 2 | ...]`. A block mask lets each choice see the context and its own
earlier tokens only, and each choice's positions restart right after the context, so every
choice gets exactly the logits of the plain `ctx + choice` sequence while the context is run
once. Rows are right-padded into batches of about `batch_tokens` tokens, sorted by length. The
output head runs only on the positions that predict continuation tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmforge.errors import LmforgeError


@dataclass
class Score:
    logprob: float  # sum of log p(continuation token | everything before it), natural log
    greedy: bool  # every continuation token was the argmax
    n_tokens: int


def doc_start_id(tokenizer) -> int | None:
    for tok in ("<|endoftext|>",):
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return i
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip(" \t")
    return stripped, context[len(stripped) :] + continuation


def encode_pair(tokenizer, context: str, continuation: str, _ctx_cache: dict | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by the rules in the module docstring."""
    if not continuation:
        raise LmforgeError("empty continuation: nothing to score")
    ctx, cont = move_trailing_space(context, continuation)
    if _ctx_cache is not None and ctx in _ctx_cache:
        alone = _ctx_cache[ctx]
    else:
        alone = tokenizer.encode(ctx, add_bos=False) if ctx else []
        if _ctx_cache is not None:
            _ctx_cache[ctx] = alone
    ids = tokenizer.encode(ctx + cont, add_bos=False)
    split = 0
    while split < min(len(alone), len(ids)) and alone[split] == ids[split]:
        split += 1
    ctx_ids, cont_ids = list(ids[:split]), list(ids[split:])
    if not cont_ids:
        raise LmforgeError(f"continuation {continuation!r} produced no tokens")
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
        ctx_ids = [tokenizer.bos_id] + ctx_ids
    if not ctx_ids:
        start = doc_start_id(tokenizer)
        if start is None:
            raise LmforgeError("empty context and the tokenizer has no BOS/EOS token to start a document")
        ctx_ids = [start]
    return ctx_ids, cont_ids


def _fit(ctx: list[int], conts: list[list[int]], max_len: int) -> list[tuple[list[int], list[list[int]], list[int]]]:
    """Rows (ctx, conts, choice indices) no longer than max_len: left-truncate the context, and
    give each choice its own row when all of them together do not fit."""
    total = sum(len(c) for c in conts)
    if len(ctx) + total <= max_len:
        return [(ctx, conts, list(range(len(conts))))]
    if total < max_len:
        return [(ctx[len(ctx) + total - max_len :], conts, list(range(len(conts))))]
    rows = []
    for j, c in enumerate(conts):
        if len(c) >= max_len:
            raise LmforgeError(f"a continuation of {len(c)} tokens does not fit the model's context of {max_len}")
        keep = max_len - len(c)
        rows.append((ctx[-keep:], [c], [j]))
    return rows


@torch.inference_mode()
def score_groups(
    model,
    groups: list[tuple[list[int], list[list[int]]]],
    batch_tokens: int = 2048,
    max_len: int | None = None,
    progress: Callable[[list[int]], None] | None = None,
) -> list[list[Score]]:
    """Scores for every (context ids, [continuation ids]) group, in the given order.
    `progress` receives the indices of groups as they complete."""
    device = model.lm_head.weight.device
    max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    rows = []  # (group index, ctx, conts, choice indices)
    for g, (ctx, conts) in enumerate(groups):
        for r in _fit(ctx, conts, max_len):
            rows.append((g, *r))
    out: list[list[Score | None]] = [[None] * len(conts) for _, conts in groups]
    remaining = [0] * len(groups)
    for r in rows:
        remaining[r[0]] += 1
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][1]) + sum(len(c) for c in rows[i][2])))
    i = 0
    while i < len(order):
        T = len(rows[order[i]][1]) + sum(len(c) for c in rows[order[i]][2])
        n = max(1, min(len(order) - i, batch_tokens // max(T, 1)))
        batch = [rows[k] for k in order[i : i + n]]
        i += n
        for (g, _, _, idx), scores in zip(batch, _score_batch(model, batch, T, device)):
            for j, s in zip(idx, scores):
                out[g][j] = s
        done = []
        for g, *_ in batch:
            remaining[g] -= 1
            if remaining[g] == 0:
                done.append(g)
        if progress is not None and done:
            progress(done)
    return out  # type: ignore[return-value]


def _score_batch(model, batch, T: int, device) -> list[list[Score]]:
    B = len(batch)
    idx = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # 0 = context, j+1 = choice j, -1 = padding
    pred_at, target, owner = [], [], []  # flat lists: hidden position, target id, (row, choice)
    for b, (_, ctx, conts, _) in enumerate(batch):
        L = len(ctx)
        idx[b, :L] = torch.tensor(ctx)
        pos[b, :L] = torch.arange(L)
        seg[b, :L] = 0
        t = L
        for j, c in enumerate(conts):
            n = len(c)
            idx[b, t : t + n] = torch.tensor(c)
            pos[b, t : t + n] = torch.arange(L, L + n)
            seg[b, t : t + n] = j + 1
            # token 0 is predicted by the context's last position, token k by the choice's k-1
            prev = [L - 1] + list(range(t, t + n - 1))
            pred_at += [b * T + p for p in prev]
            target += c
            owner += [(b, j)] * n
            t += n
    q = seg[:, :, None]
    k = seg[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
    mask = causal & (k >= 0) & ((k == 0) | (k == q)) & (q >= 0)
    mask |= torch.eye(T, dtype=torch.bool)[None]  # padding queries see themselves (ignored)
    h = model(idx.to(device), positions=pos.to(device), attention_mask=mask.to(device), hidden_only=True)
    h = h.reshape(B * T, -1)[torch.tensor(pred_at, device=device)]
    tgt = torch.tensor(target, device=device)
    lp, greedy = [], []
    for s in range(0, h.shape[0], 1024):  # the head on at most 1024 positions at a time (memory)
        logits = model.head(h[s : s + 1024]).float()
        logp = torch.log_softmax(logits, dim=-1)
        lp.append(logp.gather(-1, tgt[s : s + 1024, None])[:, 0])
        greedy.append(logits.argmax(-1) == tgt[s : s + 1024])
    lp_all = torch.cat(lp).double().cpu().tolist()
    gr_all = torch.cat(greedy).cpu().tolist()
    res: list[list[list]] = [[[0.0, True, 0] for _ in conts] for (_, _, conts, _) in batch]
    for (b, j), v, g in zip(owner, lp_all, gr_all):
        acc = res[b][j]
        acc[0] += v
        acc[1] = acc[1] and g
        acc[2] += 1
    return [[Score(float(a), bool(gr), int(n)) for a, gr, n in r] for r in res]


@torch.inference_mode()
def score_groups_unshared(model, groups, batch_tokens: int = 2048, max_len: int | None = None) -> list[list[Score]]:
    """The plain way, one `ctx + choice` row per choice (right-padded, causal): a test oracle for
    the shared-context batching above and the baseline of benchmarks/eval_speed.py."""
    flat = [(ctx, [c]) for ctx, conts in groups for c in conts]
    scores = score_groups(model, flat, batch_tokens=batch_tokens, max_len=max_len)
    out, k = [], 0
    for _, conts in groups:
        out.append([scores[k + j][0] for j in range(len(conts))])
        k += len(conts)
    return out


def loglikelihoods(model, tokenizer, requests: list[tuple[str, list[str]]], batch_tokens: int = 2048,
                   progress: Callable[[int], None] | None = None) -> list[list[Score]]:
    """Score each (context, [continuations]) request; texts in, `Score`s out.

    Choices share one context row when they all split off the same context tokens; a choice
    that merges with the context's last token (step 2 of the module docstring) gets its own row.
    """
    groups, owners = [], []  # owners[i]: (request, [choice indices]) of group i
    for r, (ctx, conts) in enumerate(requests):
        cache: dict = {}
        pairs = [encode_pair(tokenizer, ctx, c, cache) for c in conts]
        if all(p[0] == pairs[0][0] for p in pairs):
            groups.append((pairs[0][0], [p[1] for p in pairs]))
            owners.append((r, list(range(len(conts)))))
        else:
            for j, p in enumerate(pairs):
                groups.append((p[0], [p[1]]))
                owners.append((r, [j]))
    left = [0] * len(requests)
    for r, _ in owners:
        left[r] += 1

    def on_progress(done_groups: list[int]):  # report requests whose every group is scored
        finished = 0
        for g in done_groups:
            left[owners[g][0]] -= 1
            finished += left[owners[g][0]] == 0
        if finished:
            progress(finished)

    scores = score_groups(model, groups, batch_tokens=batch_tokens, progress=None if progress is None else on_progress)
    out: list[list[Score | None]] = [[None] * len(conts) for _, conts in requests]
    for (r, idx), sc in zip(owners, scores):
        for j, s in zip(idx, sc):
            out[r][j] = s
    return out  # type: ignore[return-value]


@torch.inference_mode()
def token_logprobs(model, ids: list[int], top_k: int = 0, chunk: int = 512) -> list[dict]:
    """Per-token log-probabilities of a whole sequence, as the server's prompt logprobs (`echo`
    with `logprobs`, which lm-evaluation-harness scores multiple-choice tasks with): None as the
    first token's logprob and top (nothing predicts it), then {"id", "logprob", "top": [(id,
    logprob)] * top_k} for every later token.
    The output head runs on `chunk` positions at a time, so a long prompt never holds
    [tokens, vocab] logits at once."""
    device = model.lm_head.weight.device
    x = torch.tensor([ids], device=device)
    h = model(x, hidden_only=True)[0, :-1]
    out: list[dict] = [{"id": ids[0], "logprob": None, "top": None}]
    for s in range(0, h.shape[0], chunk):
        lp = torch.log_softmax(model.head(h[s:s + chunk]).float(), dim=-1)
        nxt = x[0, s + 1:s + 1 + lp.shape[0]]
        chosen = lp.gather(-1, nxt[:, None])[:, 0].tolist()
        tops = torch.topk(lp, top_k) if top_k else None
        for j, (tok, v) in enumerate(zip(nxt.tolist(), chosen)):
            top = list(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if tops is not None else []
            out.append({"id": tok, "logprob": v, "top": top})
    return out
