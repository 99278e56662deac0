"""Batch sources for the trainer, and the one place a batch moves to the model's device."""
from __future__ import annotations

from typing import Any, Callable

import torch

from lmforge.errors import LmforgeError


def to_device(batch, device: torch.device):
    """`batch` (a tensor, or dicts/lists/tuples of them) on `device`; other values as they are.

    Every stage's batch goes through here once, in the trainer, so loss functions never move
    tensors themselves. On CUDA the host copy is pinned so the transfer does not block the
    step that is still running on the GPU.
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class BatchSource:
    """Base for batch sources: implement `next_batch()`, `state_dict()`, `load_state_dict()`.

    `rank` / `world_size` are set by the trainer (via `set_rank`) before the first batch; a
    source should yield only its rank's part of each global batch, on the CPU (the trainer
    moves it to the model's device).
    """

    rank: int = 0
    world_size: int = 1

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def next_batch(self):
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ListBatches(BatchSource):
    """Batches from a list of examples, reshuffled every epoch (seeded), forever.

    A global batch is `batch_size` consecutive examples of the epoch's order; rank r takes its
    contiguous slice of it (`batch_size` must divide by world_size). `collate(list) -> batch`.
    The data position is (epoch, index), so resume continues with the very next example.
    """

    def __init__(self, examples: list, batch_size: int, collate: Callable[[list], Any] | None = None,
                 shuffle: bool = True, seed: int = 0):
        if not examples:
            raise LmforgeError("no training examples")
        self.examples, self.batch_size, self.shuffle, self.seed = examples, batch_size, shuffle, seed
        self.collate = collate or (lambda xs: xs)
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        n = len(self.examples)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def next_batch(self):
        if self.batch_size % self.world_size:
            raise LmforgeError(f"batch size {self.batch_size} does not divide among {self.world_size} ranks")
        picked = []
        for _ in range(self.batch_size):
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            picked.append(self.examples[self._order[self.index]])
            self.index += 1
        per = self.batch_size // self.world_size
        return self.collate(picked[self.rank * per:(self.rank + 1) * per])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()
