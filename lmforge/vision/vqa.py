"""Teaching a VLM to answer questions about pictures: token layout, a batch source and a loss
for the one trainer loop (`lmforge.train.train`), and greedy exact-match evaluation.

A training row is one picture and several questions about it:

    <image> x n  "Question: How many shapes are there?\\nAnswer:" " 3" "\\n"  "Question: ..." ...

Only the answers and their closing newline are trained (the sft rule: position t counts when
token t+1 is an answer token). The first question of a row has exactly the layout of an
evaluation prompt, which is the image tokens and one question, answered greedily up to the
newline. Pieces are encoded one by one, so training and evaluation see the same ids.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from lmforge.finetune.sft import IGNORE, lm_loss_sum
from lmforge.train.batches import BatchSource
from lmforge.train.distributed import unwrap
from lmforge.vision.build import pixels
from lmforge.vision.synthetic import QA, draw, pick_questions


def prompt_ids(encode: Callable[[str], list[int]], question: str) -> list[int]:
    return encode(f"Question: {question}\nAnswer:")


def answer_ids(encode: Callable[[str], list[int]], answer: str) -> list[int]:
    return encode(f" {answer}")


def encode_row(encode, qas: list[QA], image_token_id: int, n_image: int, end_id: int) -> tuple[list[int], list[int]]:
    """(ids, targets) of one picture with its questions; targets are IGNORE except answers."""
    ids = [image_token_id] * n_image
    for qa in qas:
        ids += prompt_ids(encode, qa.question)
        ans = answer_ids(encode, qa.answer) + [end_id]
        ids += ans
    targets = [IGNORE] * len(ids)
    at = n_image
    for qa in qas:  # position t predicts token t+1
        at += len(prompt_ids(encode, qa.question))
        n = len(answer_ids(encode, qa.answer)) + 1
        targets[at - 1:at - 1 + n] = ids[at:at + n]
        at += n
    return ids, targets


class VQABatches(BatchSource):
    """Rows drawn from `scenes` in a seeded order, reshuffled every epoch; each visit of a scene
    asks it a fresh random set of questions (one of each kind it has). Pictures are drawn here,
    on the fly: a 64x64 scene takes well under a millisecond."""

    def __init__(self, scenes: list, batch_size: int, encode, image_token_id: int, n_image: int, end_id: int,
                 pad_id: int, image_cfg, size: int, seed: int = 0):
        self.scenes, self.batch_size, self.encode = scenes, batch_size, encode
        self.image_token_id, self.n_image, self.end_id, self.pad_id = image_token_id, n_image, end_id, pad_id
        self.image_cfg, self.size, self.seed = image_cfg, size, seed
        self.position = 0  # rows served so far: the whole data state

    def _row(self, k: int):
        epoch, i = divmod(k, len(self.scenes))
        order = list(range(len(self.scenes)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        scene = self.scenes[order[i]]
        qas = pick_questions(scene, random.Random(self.seed * 7_919 + k))
        return scene, encode_row(self.encode, qas, self.image_token_id, self.n_image, self.end_id)

    def next_batch(self) -> dict:
        per = self.batch_size // self.world_size
        start = self.position + self.rank * per
        rows = [self._row(k) for k in range(start, start + per)]
        self.position += self.batch_size
        return collate([r for _, r in rows], [draw(s, self.size) for s, _ in rows], self.pad_id, self.image_cfg)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def collate(rows: list[tuple[list[int], list[int]]], images: list, pad_id: int, image_cfg) -> dict:
    """Right-padded ids and targets (causal attention: no real token sees the padding after it)."""
    T = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (ids, targets) in enumerate(rows):
        idx[b, :len(ids)] = torch.tensor(ids)
        tgt[b, :len(ids)] = torch.tensor(targets)
    return {"input_ids": idx, "targets": tgt, "pixel_values": pixels(images, image_cfg)}


def vqa_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over answer tokens; the head runs on those positions only."""
    raw = unwrap(model)
    h = model(batch["input_ids"], pixel_values=batch["pixel_values"], hidden_only=True)
    sel = batch["targets"] != IGNORE
    n = sel.sum()
    loss = lm_loss_sum(h[sel], raw.lm_head.weight, batch["targets"][sel], cap=raw.cfg.final_logit_softcap)
    return loss / n.clamp(min=1), {"answer_tokens": n}


@torch.no_grad()
def forced_accuracy(vlm, batch: dict) -> torch.Tensor:
    """Share of rows whose every answer token is the argmax given the tokens before it: for
    one-question rows, what greedy decoding's exact match is, in one batched forward (for the
    curves during training; the final numbers decode through the engine)."""
    h = vlm(batch["input_ids"], pixel_values=batch["pixel_values"], hidden_only=True)
    sel = batch["targets"] != IGNORE
    right = torch.ones_like(sel)
    right[sel] = vlm.head(h[sel]).argmax(-1) == batch["targets"][sel]
    return right.all(1).float().mean()


@torch.no_grad()
def answer(vlm, encode, decode, image, question: str, end_id: int, max_new_tokens: int = 6) -> str:
    """The model's greedy answer to one question about one picture (through the generation
    engine, as chat does), up to the closing newline."""
    from lmforge.sampling import SamplingParams
    from lmforge.vision.generate import generate_with_images

    ids = [vlm.image_token_id] * vlm.image_seq_len + prompt_ids(encode, question)
    pv = pixels([image], vlm.image_config).to(next(vlm.parameters()).device)
    out = list(generate_with_images(vlm, ids, pv, None, SamplingParams(max_new_tokens=max_new_tokens), stop_ids={end_id}))
    return decode([t for t in out if t != end_id]).strip()


def accuracy(vlm, encode, decode, items: list[tuple], end_id: int, size: int) -> dict:
    """Exact-match accuracy per question kind and overall over `items` = [(scene, QA)], with
    the replies (for the result file)."""
    was = vlm.training
    vlm.eval()
    hits: dict[str, list[bool]] = {}
    replies = []
    for scene, qa in items:
        got = answer(vlm, encode, decode, draw(scene, size), qa.question, end_id)
        hits.setdefault(qa.kind, []).append(got == qa.answer)
        replies.append({"kind": qa.kind, "question": qa.question, "answer": qa.answer, "reply": got})
    vlm.train(was)
    out = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in hits.items()}
    every = [h for v in hits.values() for h in v]
    out["overall"] = {"accuracy": sum(every) / max(len(every), 1), "n": len(every)}
    return {"by_kind": out, "replies": replies}
