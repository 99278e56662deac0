"""Supervised finetuning: a batch source and a loss that plug into the one trainer loop.

    rows = [(ids, loss_mask), ...]                 # from datasets.tokenize_examples
    batches = SFTBatches(rows, batch_size=8, seq_len=512, pack=True)
    params = prepare_model(model, "lora", LoraSettings(r=16))
    train(model, make_sft_loss(ce_chunk=1024), batches, cfg, run_dir, params=params, save_fn=...)

Targets: position t predicts token t+1 and counts only when token t+1 is an assistant token of
the same example (the renderer's mask), so every assistant turn trains and nothing else does.
Without packing a batch is right-padded: with causal attention no real token can see the
padding after it, so no mask is needed. With packing, several examples share a row; each gets
positions from 0 and a block-diagonal causal mask, so no token attends across examples.

The loss picks the hidden states of target positions only, then runs the output head and
cross-entropy on them, optionally in chunks that are recomputed in backward (`ce_chunk`): the
full [tokens, vocab] logits never exist, and prompt tokens cost no output-head work at all.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.finetune.targets import IGNORE, collate, example_targets, lm_loss_sum  # noqa: F401 (this module's API too)
from lmforge.train.trainer import BatchSource, TrainConfig, resolve_device, to_device, unwrap



# -- batches ----------------------------------------------------------------------------------
def collate_packed(packs: list[list[tuple[list[int], list[int]]]], pad_id: int, seq_len: int) -> dict:
    """Several examples per row: positions restart per example, block-diagonal causal mask."""
    B, T = len(packs), seq_len
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # example number within the row; -1 = padding
    n_tokens = 0
    for b, pack in enumerate(packs):
        at = 0
        for k, (ids, mask) in enumerate(pack):
            n = len(ids)
            idx[b, at:at + n] = torch.tensor(ids)
            tgt[b, at:at + n] = torch.tensor(example_targets(ids, mask))
            pos[b, at:at + n] = torch.arange(n)
            seg[b, at:at + n] = k
            at += n
        n_tokens += at
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]
    attn = causal[None] & same & (seg[:, :, None] >= 0)
    attn |= torch.eye(T, dtype=torch.bool)[None]  # padding queries see themselves (never trained)
    return {"input_ids": idx, "targets": tgt, "positions": pos, "attention_mask": attn, "n_tokens": n_tokens}


def pack_rows(rows: list, order: list[int], start: int, n_rows: int, seq_len: int) -> tuple[list[list], int, bool]:
    """Fill `n_rows` rows of `seq_len` greedily with examples order[start:], never splitting one.

    Returns (packs, next index, wrapped) where wrapped says the order ran out (epoch end).
    """
    packs, i = [], start
    for _ in range(n_rows):
        pack, used = [], 0
        while i < len(order):
            ids, _ = rows[order[i]]
            n = min(len(ids), seq_len)
            if used + n > seq_len and pack:
                break
            pack.append((ids[:n], rows[order[i]][1][:n]))
            used += n
            i += 1
        if not pack:
            return packs, i, True
        packs.append(pack)
    return packs, i, False


class SFTBatches(BatchSource):
    """Batches of rendered examples, reshuffled every epoch (seeded), forever.

    Data position (epoch, index) is saved in checkpoints, so resume continues exactly.
    """

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, seq_len: int, pad_id: int,
                 pack: bool = False, shuffle: bool = True, seed: int = 0, batch_of=None):
        if not rows:
            raise LmforgeError("no training examples")
        if batch_size < 1 or seq_len < 2:
            raise LmforgeError("batch_size must be >= 1 and seq_len >= 2")
        self.rows, self.batch_size, self.seq_len, self.pad_id = rows, batch_size, seq_len, pad_id
        self.pack, self.shuffle, self.seed = pack, shuffle, seed
        # how unpacked rows become a batch: `collate`, or what a row carries besides its tokens too
        # (pictures: lmforge.vision.sft.collate_with_pictures)
        self.batch_of = batch_of or (lambda rows: collate(rows, pad_id))
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def _advance_epoch(self) -> None:
        self.epoch, self.index = self.epoch + 1, 0
        self._order = self._make_order()

    def next_batch(self) -> dict:
        if self.batch_size % self.world_size:
            raise LmforgeError(f"batch size {self.batch_size} does not divide among {self.world_size} ranks")
        if self.pack:
            packs: list = []
            while len(packs) < self.batch_size:
                got, self.index, wrapped = pack_rows(self.rows, self._order, self.index, self.batch_size - len(packs), self.seq_len)
                packs += got
                if wrapped:
                    self._advance_epoch()
            per = self.batch_size // self.world_size
            return collate_packed(packs[self.rank * per:(self.rank + 1) * per], self.pad_id, self.seq_len)
        picked = []
        for _ in range(self.batch_size):
            if self.index >= len(self._order):
                self._advance_epoch()
            picked.append(self.rows[self._order[self.index]])
            self.index += 1
        per = self.batch_size // self.world_size
        return self.batch_of(picked[self.rank * per:(self.rank + 1) * per])

    def steps_per_epoch(self) -> int:
        """Batches in one pass over the data (packing: counted on the first epoch's order)."""
        if not self.pack:
            return max(1, math.ceil(len(self.rows) / self.batch_size))
        n, i = 0, 0
        order = self._make_order() if self.epoch == 0 else list(range(len(self.rows)))
        while i < len(order):
            got, i, _ = pack_rows(self.rows, order, i, 1, self.seq_len)
            n += len(got)
        return max(1, math.ceil(n / self.batch_size))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()


# -- loss -------------------------------------------------------------------------------------
def sft_loss(model: nn.Module, batch: dict, ce_chunk: int = 0) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the batch's assistant tokens; (loss, metrics) for the trainer."""
    raw = unwrap(model)
    idx, targets = batch["input_ids"], batch["targets"]
    # a vision-language model's batch carries the rows' pictures (lmforge.vision.sft)
    pictures = {k: batch[k] for k in ("pixel_values", "pixel_attention_mask") if batch.get(k) is not None}
    h = model(idx, positions=batch.get("positions"), attention_mask=batch.get("attention_mask"), hidden_only=True, **pictures)
    sel = targets != IGNORE
    n = sel.sum()
    # no target at all (cannot happen with checked data) gives 0 with the graph kept, so DDP
    # ranks stay in step
    loss = lm_loss_sum(h[sel], raw.lm_head.weight, targets[sel], ce_chunk, raw.cfg.final_logit_softcap) / n.clamp(min=1)
    return loss, {"tokens": batch.get("n_tokens", idx.numel()), "trained_tokens": n}


def make_sft_loss(ce_chunk: int = 0):
    def loss_fn(model, batch):
        return sft_loss(model, batch, ce_chunk)

    return loss_fn


@torch.no_grad()
def eval_loss(model: nn.Module, rows: list, batch_size: int, pad_id: int, ce_chunk: int = 0, batch_of=None) -> float:
    """Mean loss per assistant token over `rows` (validation); `batch_of(rows)`: how rows become
    a batch (default `collate`; a batch source's `batch_of`)."""
    batch_of = batch_of or (lambda r: collate(r, pad_id))
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = to_device(batch_of(rows[i:i + batch_size]), unwrap(model).lm_head.weight.device)
        loss, m = sft_loss(model, batch, ce_chunk)
        n = int(m["trained_tokens"])
        total += float(loss) * n
        count += n
    return total / max(count, 1)


# -- the model for each method ------------------------------------------------------------------
METHODS = ("full", "lora", "qlora")


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes bf16 matmuls at speed: a CUDA GPU with bf16, or a CPU that
    oneDNN runs bf16 on (AVX-512 / AMX / Arm bf16, by torch's own check)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        try:
            return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a private op: a build without it says no
            return False
    return False


def base_dtype(dtype: str, method: str, device: str | torch.device = "cpu") -> str:
    """The dtype SFT loads the weights in. `auto`: bf16 for LoRA's frozen base where bf16 is fast
    (gradients flow through the base but it never updates, so it needs no fp32 master copy:
    half the memory, and the matmuls run in bf16 anyway under bf16 autocast), else fp32. Full
    finetuning keeps fp32 master weights; QLoRA keeps its fp32 default (its linear layers are
    quantized anyway). The adapters and their optimizer state are fp32 in every case."""
    if dtype != "auto":
        return dtype
    return "bf16" if method == "lora" and fast_bf16(device) else "fp32"


def prepare_model(model: nn.Module, method: str, lora=None, base_quant: str = "nf4") -> list[nn.Parameter]:
    """Make `model` ready to train with `method`; return the parameters to optimize.

    full: every weight trains. lora: the base is frozen, adapters train. qlora: the base's
    linear layers are quantized (`base_quant`) and frozen, adapters train in fp32.
    """
    from lmforge.finetune.lora import LoraSettings, apply_lora

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return [p for p in model.parameters()]
    if method not in METHODS:
        raise LmforgeError(f"unknown method '{method}' (choose {', '.join(METHODS)})")
    if method == "qlora":
        from lmforge.finetune.qlora import quantize_base

        if base_quant in (None, "", "none"):
            raise LmforgeError("--method qlora needs --base-quant int8, nf4 or int4")
        quantize_base(model, base_quant)
    return apply_lora(model, lora or LoraSettings())


# -- the command ----------------------------------------------------------------------------

@dataclass
class LoraArgs:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # attention, mlp, all-linear or names
    rslora: bool = False  # scale by alpha/sqrt(r) (rank-stabilized LoRA)
    connector: bool = False  # a vision-language model: LoRA on its connector too (the vision encoder stays frozen)


@dataclass
class SFTTrainConfig(TrainConfig):
    """The trainer's settings with finetuning defaults (short warmup, no weight decay)."""

    lr: float = 2e-4
    warmup_steps: int = 10
    max_steps: int = 0  # 0 = derived from --epochs
    weight_decay: float = 0.0
    beta2: float = 0.999
    log_every: int = 5


@dataclass
class SFTConfig:
    model: str | None = None  # base model: GGUF, HF folder, run folder; default model when unset
    data: str = ""  # chat/instruction JSONL (file or folder), a datasets.save_to_disk folder, or hf:NAME
    out: str = "runs/sft"
    method: Literal["full", "lora", "qlora"] = "lora"
    base_quant: Literal["auto", "none", "int8", "nf4", "int4"] = "auto"  # qlora's frozen base (auto = nf4)
    # storage of the frozen weights; auto = bf16 for lora where bf16 is fast (CUDA with bf16, a
    # CPU with oneDNN bf16), fp32 otherwise and for qlora; full always keeps fp32 (see base_dtype)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    data_format: Literal["auto", "chat", "instruction"] = "auto"
    data_split: str = "train"
    on_error: Literal["fail", "skip"] = "fail"  # a malformed record fails the run or is skipped (reported)
    # trusted data only: special-token text inside a message's content is trained as that special
    # token (default: as plain text, as at inference)
    allow_special_in_content: bool = False
    val_data: str = ""  # held-out records for val_loss; or use val_fraction
    val_fraction: float = 0.0
    max_seq_len: int = 1024  # longer examples are truncated (and reported)
    batch_size: int = 8  # examples (or packed rows) per micro-batch
    pack: bool = False  # several examples per row, no attention across them
    epochs: float = 1.0  # used when train.max_steps is 0
    ce_chunk: int = 0  # chunked cross-entropy: tokens per chunk (0 = off)
    lean_malloc: bool = False  # hand freed memory back to the OS at once: lower peak RSS, slower steps
    sample_prompt: str = ""  # a user message answered at every eval (watch the model learn)
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)


def lean_malloc(threshold: int = 64 * 1024) -> bool:
    """Make glibc serve every allocation above `threshold` bytes with its own mapping.

    By default glibc raises that threshold as large blocks are freed, so a training step's
    transient tensors end up in heap arenas that keep their pages after the tensors die: the
    process's peak RSS measured ~0.5 GiB above its live tensors in a LoRA step of the default
    model. With a fixed threshold freed tensors go straight back to the OS; the price is page
    faults on every new large tensor (steps measured ~30 % slower on a loaded 2-core machine).
    Returns False where this is not glibc.
    """
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def base_model_id(resolved: str) -> str:
    """What adapter_config.json names as the base: the default model's hub id, else a path."""
    from pathlib import Path

    from lmforge.loading.resolve import DEFAULT_MODEL_ID, default_model_path

    p = Path(resolved).resolve()
    dp = default_model_path()
    if dp is not None and dp.resolve() == p:
        return DEFAULT_MODEL_ID
    return str(p)


def run_sft(cfg: SFTConfig, progress: bool = True) -> dict:
    """Load, render, prepare `cfg.method`, train with the one trainer, save (adapter or model)."""
    import dataclasses
    import json
    from pathlib import Path

    from lmforge.finetune.datasets import DataReport, load_examples, split_holdout, tokenize_examples
    from lmforge.finetune.lora import LoraSettings, save_adapter
    from lmforge.loading import load_model, save_hf
    from lmforge.train import train

    if not cfg.data:
        raise LmforgeError("--data is required (a chat or instruction JSONL file)")
    if cfg.method not in METHODS:
        raise LmforgeError(f"unknown method '{cfg.method}' (choose {', '.join(METHODS)})")
    dtype = base_dtype(cfg.dtype, cfg.method, resolve_device(cfg.train.device))
    if cfg.method == "full" and dtype != "fp32":
        raise LmforgeError("full finetuning keeps fp32 weights; for bf16 compute use --train.dtype bf16")
    base_quant = cfg.base_quant
    if base_quant == "auto":
        base_quant = "nf4" if cfg.method == "qlora" else "none"
    if cfg.method != "qlora" and base_quant != "none":
        raise LmforgeError(f"--base-quant {base_quant} quantizes QLoRA's frozen base; use --method qlora")
    if cfg.train.seed not in (0, cfg.seed):
        raise LmforgeError("set the seed with --seed (it seeds data order, adapter init and the trainer)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.lean_malloc:
        lean_malloc()
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)

    model, tok = load_model(cfg.model, dtype=dtype)
    from lmforge.chat import with_chat_format

    tok = with_chat_format(tok)  # a base model is trained (and saved) with ChatML
    if tok is None:
        raise LmforgeError(f"model {cfg.model} has no tokenizer; SFT needs its chat template")
    tok.allow_special_in_content = cfg.allow_special_in_content
    max_len = min(cfg.max_seq_len, model.cfg.max_seq_len)

    from lmforge.loading.state_maps import is_vlm

    sees = is_vlm(model)  # conversations with images: lmforge.vision.sft

    def rows_of(data, report):
        examples, report = load_examples(data, cfg.data_format, cfg.on_error, cfg.data_split, report, images=sees)
        if not sees:
            return tokenize_examples(tok, examples, max_len, cfg.on_error, report)
        from lmforge.vision.sft import tokenize_vision_examples

        return tokenize_vision_examples(model, tok, examples, max_len, cfg.on_error, report)

    rows, report = rows_of(cfg.data, DataReport())
    val_rows: list = []
    if cfg.val_data:
        val_rows, vrep = rows_of(cfg.val_data, None)
        for line in vrep.lines():
            print(f"val data: {line}")
    elif cfg.val_fraction > 0:
        rows, val_rows = split_holdout(rows, cfg.val_fraction, cfg.seed)
    print(f"data: {report.summary()}" + (f"; {len(val_rows)} held out for validation" if val_rows else ""))
    for line in report.lines():
        print(f"data: {line}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")

    settings = LoraSettings(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets,
                            rslora=cfg.lora.rslora)
    if sees:
        from lmforge.vision.sft import prepare_vlm

        params = prepare_vlm(model, cfg.method, settings, cfg.lora.connector)
    else:
        params = prepare_model(model, cfg.method, settings, base_quant)
    n_train = sum(p.numel() for p in {id(p): p for p in params}.values())
    frozen = {"full": "", "lora": f" (frozen base {dtype}, adapters fp32)", "qlora": f" (base {base_quant})"}[cfg.method]
    print(f"method {cfg.method}{frozen}: {n_train:,} trainable of {model.num_parameters():,} parameters")

    pad_id = tok.pad_id if tok.pad_id is not None else 0
    batch_of = None
    if sees:  # rows with pictures are not packed; each batch preprocesses its rows' pictures
        from functools import partial

        from lmforge.vision.sft import collate_with_pictures

        batch_of = partial(collate_with_pictures, pad_id=pad_id, image_config=model.image_config)
    batches = SFTBatches(rows, cfg.batch_size, max_len, pad_id, pack=cfg.pack and not sees, seed=cfg.seed, batch_of=batch_of)
    tcfg = dataclasses.replace(cfg.train, seed=cfg.seed)
    if tcfg.max_steps <= 0:
        per_epoch = math.ceil(batches.steps_per_epoch() / tcfg.grad_accum)
        tcfg = dataclasses.replace(tcfg, max_steps=max(1, math.ceil(per_epoch * cfg.epochs)))
        print(f"{tcfg.max_steps} steps ({cfg.epochs:g} epochs of {per_epoch} steps)")

    base_id = base_model_id(getattr(model, "source_path", cfg.model or ""))
    if cfg.method == "full":
        def save_fn(m, d):
            save_hf(m, tok, d)
    else:
        def save_fn(m, d):
            save_adapter(m, d, base_model=base_id, settings=settings)
            tok.save(d)  # so the checkpoint chats with the chat template it was trained on

    eval_fn = None
    if val_rows:
        def eval_fn(m):
            return {"val_loss": eval_loss(m, val_rows, cfg.batch_size, pad_id, cfg.ce_chunk, batches.batch_of)}

    sample_fn = None
    if cfg.sample_prompt:
        from lmforge.chat import render_prompt
        from lmforge.engine import SamplingParams, generate_text

        prompt_ids = render_prompt(tok, [{"role": "user", "content": cfg.sample_prompt}])

        def sample_fn(m):
            return generate_text(m, tok, [prompt_ids], SamplingParams(max_new_tokens=64))[0]["text"]

    result = train(model, make_sft_loss(cfg.ce_chunk), batches, tcfg, out, params=params, eval_fn=eval_fn,
                   save_fn=save_fn, sample_fn=sample_fn, tokenizer=tok,
                   config=dataclasses.replace(cfg, dtype=dtype, train=tcfg), progress=progress)
    what = "model" if cfg.method == "full" else "adapter (PEFT layout)"
    print(f"done: {result['step']} steps, loss {result['loss']:.4f}; {what} in {result['checkpoint']}")
    print(f"chat with it:  lmforge chat --model {out}")
    if cfg.method != "full":
        print(f"merge it:      lmforge merge --model {out} --out {out}/merged")
    result["data_report"] = report
    result["model"] = model
    return result
