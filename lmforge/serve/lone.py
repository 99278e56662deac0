"""A lone decoding row on the fast decoder.

When a single request is decoding (the common case of one person at the web page), a batched
`model.forward` step for one row costs twice the fast decoder's step (GGUF blocks: one native
call for the whole model, `lmforge.native.step`). The row's keys/values move into a fast
decoder's cache when it is alone and back into its slot when anything else needs the batch.

The fast decoder keeps each key head in adjacent (re, im) pairs (`interleave_order`), the
model's cache in rotate-half order: the copies permute the key dimensions; values are as is.
"""
from __future__ import annotations

import torch

from lmforge.fast.decode import FastDecoder, fast_decoder_for, interleave_order


def lone_decoder_for(model, ctx: int) -> "LoneRow | None":
    """A LoneRow for `model` on a CPU with room for `ctx` tokens; None when the fast decoder
    cannot run it (a vision model, a GPU: the batched path serves those)."""
    if next(model.parameters()).device.type != "cpu":
        return None
    base = fast_decoder_for(model)  # None for what it cannot run (`unsupported_reason`)
    if base is None:
        return None
    # its own cache, the shared decoder's fused weights (another caller of the model, such as
    # `LM.generate` in the same process, keeps the shared decoder's cache to itself)
    return LoneRow(base.draft(list(range(len(base.layers)))), ctx)


class LoneRow:
    def __init__(self, fast: FastDecoder, ctx: int):
        self.fast = fast
        fast.reset(ctx + 1)
        self.order = interleave_order(1, fast.D).to(fast.device)  # fast key dim j = model dim order[j]
        self.slot: int | None = None  # the slot whose row lives here now
        self.start = 0  # its cache length when it moved here

    def enter(self, cache, slot: int) -> None:
        """Move `slot`'s row (its first `cache.lengths[slot]` positions) into the fast cache."""
        n = int(cache.lengths[slot])
        kv = self.fast.kv
        for li, (k, v) in enumerate(zip(cache.k, cache.v)):
            kv[li, 0, :, :n].copy_(k[slot, :, :n][..., self.order])
            kv[li, 1, :, :n].copy_(v[slot, :, :n])
        self.fast.pos, self.fast.tokens = n, []
        self.slot, self.start = slot, n

    def step(self, token: int) -> torch.Tensor:
        """fp32 logits [V] after `token` at the row's next position."""
        return self.fast.forward(torch.tensor([token], device=self.fast.device))[0]

    def leave(self, cache) -> None:
        """Write the positions computed here back into the slot; the slot is the row's again."""
        if self.slot is None:
            return
        s, a, b = self.slot, self.start, self.fast.pos
        kv = self.fast.kv
        for li, (k, v) in enumerate(zip(cache.k, cache.v)):
            k[s, :, a:b][..., self.order] = kv[li, 0, :, a:b]
            v[s, :, a:b].copy_(kv[li, 1, :, a:b])
        cache.lengths[s] = b
        self.slot = None

    def drop(self) -> None:
        """Forget the row without writing it back (the scheduler no longer trusts any cache)."""
        self.slot = None
