"""`lmforge sft` on conversations with images, for a vision-language model (`VLM`).

The stage is text SFT's (`lmforge.finetune.sft`: the one trainer loop, the same data checks,
the assistant-turn loss), with three differences:
- rows are rendered by `lmforge.vision.prompt.render_training` (image tokens expanded by each
  image's tiles) and keep their images, which each batch preprocesses (pictures are not held
  in memory as pixels);
- the loss runs the VLM's forward, image features in place of the image tokens;
- what trains: the vision encoder is frozen; LoRA goes on the text model, and on the connector
  with `--lora.connector`; `--method full` trains the text model and the connector.
"""
from __future__ import annotations

import random

import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.datasets import RecordError, handle_bad_record
from lmforge.finetune.targets import IGNORE, example_targets, lm_loss_sum
from lmforge.train.batches import BatchSource
from lmforge.train.distributed import unwrap
from lmforge.vision.preprocess import preprocess_images
from lmforge.vision.prompt import render_training


def tokenize_vision_examples(vlm, tokenizer, examples: list, max_len: int, on_error: str, report) -> list[tuple]:
    """(ids, loss mask, images) per example; one whose images do not fit in `max_len` tokens, or
    whose images cannot be read, is skipped or fails like any bad record."""
    rows = []
    for ex in examples:
        try:
            ids, mask, images = render_training(tokenizer, ex.messages, vlm.image_config, vlm.image_seq_len)
            if len(ids) > max_len:
                if vlm.image_token_id in ids[max_len:]:
                    raise RecordError(f"its images take more than the {max_len} tokens of a row")
                report.truncated.append(f"{ex.where}: {len(ids)} tokens > {max_len}")
                ids, mask = ids[:max_len], mask[:max_len]
            if sum(mask[1:]) == 0:
                raise RecordError(f"no assistant token within the first {max_len} tokens")
            rows.append((ids, mask, images))
        except (RecordError, LmforgeError) as e:
            handle_bad_record(report, ex.where, e, on_error)
    report.kept = len(rows)
    if not rows:
        raise LmforgeError(f"no usable training examples ({report.summary()})")
    return rows


class VisionSFTBatches(BatchSource):
    """Rows in a seeded order, reshuffled every epoch; each batch's images are preprocessed
    when it is served."""

    def __init__(self, rows: list[tuple], batch_size: int, pad_id: int, image_config, seed: int = 0):
        self.rows, self.batch_size, self.pad_id, self.image_config, self.seed = rows, batch_size, pad_id, image_config, seed
        self.position = 0  # rows served so far: the whole data state

    def _row(self, k: int) -> tuple:
        epoch, i = divmod(k, len(self.rows))
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return self.rows[order[i]]

    def next_batch(self) -> dict:
        per = max(1, self.batch_size // self.world_size)
        start = self.position + self.rank * per
        rows = [self._row(k) for k in range(start, start + per)]
        self.position += per * self.world_size
        return collate(rows, self.pad_id, self.image_config)

    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.rows) // self.batch_size))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def collate(rows: list[tuple], pad_id: int, image_config) -> dict:
    """Right-padded ids and targets (the sft rule: position t learns token t+1 of an assistant
    turn), and the rows' pixels (None when no row has an image)."""
    T = max(len(ids) for ids, _, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (ids, mask, _) in enumerate(rows):
        idx[b, :len(ids)] = torch.tensor(ids)
        tgt[b, :len(ids)] = torch.tensor(example_targets(ids, mask))
    batch = {"input_ids": idx, "targets": tgt, "pixel_values": None, "pixel_attention_mask": None}
    if any(images for _, _, images in rows):
        pics = preprocess_images([images for _, _, images in rows], image_config)
        batch.update(pixel_values=pics.pixel_values, pixel_attention_mask=pics.pixel_attention_mask)
    return batch


def vision_sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the assistant tokens; the head runs on those positions only."""
    raw = unwrap(model)
    h = model(batch["input_ids"], pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"],
              hidden_only=True)
    sel = batch["targets"] != IGNORE
    n = sel.sum()
    loss = lm_loss_sum(h[sel], raw.lm_head.weight, batch["targets"][sel], cap=raw.cfg.final_logit_softcap)
    return loss / n.clamp(min=1), {"tokens": n}


def prepare_vlm(vlm, method: str, settings, connector: bool = False) -> list[torch.nn.Parameter]:
    """Freeze the vision encoder; LoRA on the text model (and the connector), or, for `full`,
    the text model and the connector trainable. Returns the parameters to optimize."""
    from lmforge.finetune.lora import LoraSettings, apply_lora

    for p in vlm.parameters():
        p.requires_grad_(False)
    if method == "full":
        params = [p for m in (vlm.text, vlm.connector) for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params
    if method != "lora":
        raise LmforgeError(f"--method {method} is not supported for vision-language models (lora or full)")
    params = apply_lora(vlm.text, settings)
    if connector:
        params += apply_lora(vlm.connector, LoraSettings(r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                                                         targets=["proj"], rslora=settings.rslora))
    return params


@torch.no_grad()
def vision_eval_loss(model, rows: list[tuple], batch_size: int, pad_id: int, image_config) -> float:
    """Mean loss per assistant token over held-out rows (in eval mode)."""
    was = model.training
    model.eval()
    total = n = 0.0
    for i in range(0, len(rows), batch_size):
        loss, info = vision_sft_loss(model, collate(rows[i:i + batch_size], pad_id, image_config))
        total, n = total + float(loss) * int(info["tokens"]), n + int(info["tokens"])
    model.train(was)
    return total / max(n, 1)
