"""What `lmforge rm`, `dpo` and `rl` share: task data, model preparation, run-folder helpers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.errors import LmforgeError
from lmforge.finetune.lora import LoraSettings
from lmforge.train.trainer import TrainConfig


@dataclass
class TaskArgs:
    """A generated task instead of --data: `arithmetic` (checkable answers)."""

    name: Literal["", "arithmetic"] = ""
    n: int = 2000  # training items
    n_eval: int = 200  # held-out items (never the same problems)
    digits: int = 2  # digits of the first operand
    digits_b: int = 0  # digits of the second operand (0 = digits)
    ops: str = "+"  # any of + - *


# the same LoRA flags as `lmforge sft`
LoraArgs = LoraSettings


@dataclass
class AlignTrainConfig(TrainConfig):
    """The trainer's settings with alignment defaults (small lr, short warmup, no decay)."""

    lr: float = 5e-5
    warmup_steps: int = 10
    max_steps: int = 200
    weight_decay: float = 0.0
    beta2: float = 0.999
    log_every: int = 5
    eval_every: int = 50


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"data not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise LmforgeError(f"{path}:{n}: each record needs 'prompt' or 'messages'")
            rows.append(row)
    if not rows:
        raise LmforgeError(f"no records in {path}")
    return rows


def prepare(model, method: str, lora: LoraArgs, extra_trainable: list | None = None) -> tuple[list, object]:
    """(parameters to train, LoraSettings or None) for full finetuning or LoRA."""
    from lmforge.finetune.sft import prepare_model

    if method not in ("full", "lora"):
        raise LmforgeError(f"unknown method '{method}' (choose full or lora)")
    params = prepare_model(model, method, lora)
    for p in extra_trainable or []:
        p.requires_grad_(True)
        if all(p is not q for q in params):
            params.append(p)
    return params, (lora if method == "lora" else None)


def lm_save_fn(tok, settings, base_id: str):
    """save_fn for the trainer: a full HF folder, or a PEFT adapter + tokenizer."""
    from lmforge.finetune.lora import save_adapter
    from lmforge.loading import save_hf

    if settings is None:
        return lambda m, d: save_hf(m, tok, d)

    def save(m, d):
        save_adapter(m, d, base_model=base_id, settings=settings)
        tok.save(d)

    return save


def load_policy(model_path, dtype: str = "fp32"):
    from lmforge.loading import load_model

    from lmforge.chat import with_chat_format

    model, tok = load_model(model_path, dtype=dtype)
    if tok is None:
        raise LmforgeError(f"model {model_path} has no tokenizer; alignment needs its chat template")
    return model, with_chat_format(tok)
