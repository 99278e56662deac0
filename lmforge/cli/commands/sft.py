"""Finetune a model on chat or instruction data (full, LoRA or QLoRA).

    lmforge sft --data train.jsonl --method lora --out runs/sft
    lmforge sft --config recipes/sft/lora.yaml --data mine.jsonl --lora.r 8 --train.max-steps 200
    lmforge sft --method qlora --base-quant nf4 --data train.jsonl --train.activation-checkpointing

Data: JSONL with {"messages": [...]} (OpenAI chat format, tool calls included) or
{"instruction", "input", "output"}; a folder of them; a `datasets.save_to_disk` folder; hf:NAME.
A malformed record stops the run with its file:line, or is skipped and reported (--on-error skip).
LoRA runs save adapters in PEFT's layout; `lmforge chat --model OUT` chats with the result and
`lmforge merge` folds the adapter into a full model folder.
"""
from __future__ import annotations

from lmforge.finetune.sft import SFTConfig as Config


def run(cfg: Config) -> int:
    from lmforge.finetune.sft import run_sft

    run_sft(cfg)
    return 0
