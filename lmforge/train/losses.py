"""Next-token cross-entropy for `train`'s loss_fn (pretraining; SFT with a loss mask)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Mean next-token loss in nats.

    `batch`: a LongTensor [B, T+1] of token ids, or a dict with `input_ids` [B, T+1] and an
    optional `loss_mask` [B, T+1] (1 where the token is a target; position 0 is never one) and
    `attention_mask`. Logits are computed in fp32 for the loss (bf16 log-softmax loses bits).
    """
    if isinstance(batch, torch.Tensor):
        ids, mask, attn = batch, None, None
    else:
        ids, mask, attn = batch["input_ids"], batch.get("loss_mask"), batch.get("attention_mask")
    x, y = ids[:, :-1], ids[:, 1:]
    logits = model(x, attention_mask=attn[:, :-1] if attn is not None else None)
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    if mask is None:
        return losses.mean(), {"tokens": y.numel()}
    m = mask[:, 1:].reshape(-1).to(losses.dtype)
    n = m.sum()
    return (losses * m).sum() / n.clamp(min=1), {"tokens": int(n)}
