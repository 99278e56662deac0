"""Next-token cross-entropy for `train`'s loss_fn (pretraining; SFT with a loss mask)."""
from __future__ import annotations

import torch


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Mean next-token loss in nats.

    `batch`: a LongTensor [B, T+1] of token ids, or a dict with `input_ids` [B, T+1] and an
    optional `loss_mask` [B, T+1] (1 where the token is a target; position 0 is never one) and
    `attention_mask`. The model computes the loss itself (`targets=`), in fp32, so a compiled
    model fuses it; the token count stays a tensor so the step never waits for the device.
    """
    if isinstance(batch, torch.Tensor):
        ids, mask, attn = batch, None, None
    else:
        ids, mask, attn = batch["input_ids"], batch.get("loss_mask"), batch.get("attention_mask")
    x, y = ids[:, :-1], ids[:, 1:]
    if mask is not None:
        y = y.masked_fill(mask[:, 1:] == 0, -100)
    loss = model(x, attention_mask=attn[:, :-1] if attn is not None else None, targets=y)
    return loss, {"tokens": y.numel() if mask is None else (y != -100).sum()}
