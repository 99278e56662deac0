"""Finetuning: turn a base model that continues text into an assistant that answers.

- `datasets`: chat / instruction JSONL and HF datasets, checked record by record (file:line).
- `lora`: LoRA layers, saved and loaded in PEFT's layout; merge into plain weights.
- `qlora`: the frozen base stored in int8 / NF4 / int4, dequantized on the fly.
- `sft`: batches (padding or packing), the masked loss (chunked cross-entropy), `run_sft`,
  which plugs them into the one trainer (`lmforge.train`).

Submodules are imported on use; importing `lmforge.finetune` loads nothing heavy.
"""
