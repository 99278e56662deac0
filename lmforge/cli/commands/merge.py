"""Fold a LoRA adapter (lmforge's or PEFT's) into its base model and write a full HF folder.

    lmforge merge --model runs/sft --out merged/               # run folder: its latest adapter
    lmforge merge --model BASE --adapter ADAPTER_DIR --out merged/

The base is read again from its own files at full precision (fp32), never from the bf16 copy a
LoRA run trains against by default; the update is added in fp32 and only the sum is cast to
`--dtype`. The output loads in `transformers` (AutoModelForCausalLM.from_pretrained), in lmforge,
and converts to GGUF like any HF folder. `--device` (auto: CUDA when present) is where the merge is
computed; the files are written from CPU copies, the same on any device (up to the rounding of
the fp32 update).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    model: str | None = None  # the adapter (run folder or adapter folder), or the base when --adapter is given
    adapter: str = ""  # adapter folder (adapter_config.json + adapter_model.safetensors)
    out: str = ""
    dtype: str = "fp32"  # fp32 | bf16 | fp16 weights in the output
    device: str = "auto"  # where to merge: auto (CUDA when present, else MPS, else CPU) | cpu | cuda | cuda:N | mps


def run(cfg: Config) -> int:
    from pathlib import Path

    from lmforge.device import resolve_device
    from lmforge.errors import LmforgeError
    from lmforge.finetune.lora import load_adapter_model
    from lmforge.loading import save_hf
    from lmforge.loading.load import adapter_folder, parse_dtype

    if not cfg.out:
        raise LmforgeError("--out is required (the folder for the merged model)")
    device = resolve_device(cfg.device)
    if cfg.adapter:
        adapter, base = Path(cfg.adapter), cfg.model
        if adapter_folder(adapter) is not None:
            adapter = adapter_folder(adapter)
        elif not (adapter / "adapter_config.json").exists():
            raise LmforgeError(f"{adapter} holds no adapter (adapter_config.json)")
    else:
        adapter = adapter_folder(cfg.model) if cfg.model else None
        base = None
        if adapter is None:
            raise LmforgeError(f"{cfg.model or 'the default model'} holds no LoRA adapter; pass --model RUN_OR_ADAPTER or --adapter DIR")
    dtype = parse_dtype(cfg.dtype)
    # load_adapter_model loads the base in fp32 whatever the training run stored it in, merges, casts
    model, tok = load_adapter_model(adapter, base=base, dtype=dtype, device=device)
    save_hf(model, tok, cfg.out, dtype=dtype)  # save_hf moves every tensor to the CPU
    print(f"merged {adapter} into {base or 'its base model'}; wrote {cfg.out}")
    return 0
