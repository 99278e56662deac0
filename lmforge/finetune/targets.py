"""What every finetuning loss shares: the targets of a rendered example (position t learns token
t+1 when that token is an assistant token), rows padded into a batch, and the output head's
cross-entropy on the target positions only, optionally in recomputed chunks
(lmforge.finetune.sft explains them). Text SFT, SFT on pictures (lmforge.vision.sft) and the VQA
demo use them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model import softcap

IGNORE = -100


def example_targets(ids: list[int], mask: list[int]) -> list[int]:
    """Per position, the next token when it is a trained (assistant) token, else IGNORE."""
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, seq_len: int | None = None) -> dict:
    """One example per row, right-padded to the longest (or `seq_len`)."""
    T = seq_len or max(len(ids) for ids, _ in rows)
    B = len(rows)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = min(len(ids), T)
        idx[b, :n] = torch.tensor(ids[:n])
        tgt[b, :n] = torch.tensor(example_targets(ids[:n], mask[:n]))
    n_tokens = sum(min(len(ids), T) for ids, _ in rows)
    return {"input_ids": idx, "targets": tgt, "positions": None, "attention_mask": None, "n_tokens": n_tokens}


def _ce_sum(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    return F.cross_entropy(softcap(F.linear(h, w), cap).float(), t, reduction="sum")


def lm_loss_sum(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                cap: float | None = None) -> torch.Tensor:
    """Sum of cross-entropy over rows of `hidden` [N, C] against `targets` [N].

    `chunk` > 0 computes the output head and loss `chunk` rows at a time and recomputes each
    chunk in backward, so at most one chunk of logits exists at any moment.
    """
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return _ce_sum(hidden, head_weight, targets, cap)
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_ce_sum, hidden[i:i + chunk], head_weight, targets[i:i + chunk], cap, use_reentrant=False)
    return total
