"""Convert a model: GGUF or run folder -> HF folder (--to hf), or -> GGUF file (--to gguf)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    model: str | None = None
    to: str = "hf"  # hf | gguf
    out: str = "converted"
    dtype: str = "fp32"  # weights dtype written to an HF folder
    gguf_type: str = "f16"  # f16 | q8_0 | q4_0 (GGUF export)
    device: str = "auto"  # where the model is loaded: auto (CUDA when present, else MPS, else CPU) | cpu | cuda | cuda:N | mps


def run(cfg: Config) -> None:
    from pathlib import Path

    from lmforge.device import resolve_device
    from lmforge.errors import LmforgeError
    from lmforge.loading import load_model, save_hf
    from lmforge.loading.load import parse_dtype

    if cfg.to not in ("hf", "gguf"):
        raise LmforgeError(f"--to must be hf or gguf, got '{cfg.to}'")
    device = resolve_device(cfg.device)  # before reading any weights: a bad --device fails fast
    # the files are the same on any device: save_hf and write_gguf take CPU copies of the tensors
    model, tok = load_model(cfg.model, dtype="fp32", device=device)
    if cfg.to == "hf":
        out = save_hf(model, tok, cfg.out, dtype=parse_dtype(cfg.dtype))
        print(f"wrote HF folder {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
        return
    from lmforge.export.gguf import write_gguf

    out = Path(cfg.out)
    if out.suffix != ".gguf":
        out = out.with_suffix(".gguf")
    write_gguf(model, tok, out, cfg.gguf_type)
    print(f"wrote {out} ({cfg.gguf_type})")
