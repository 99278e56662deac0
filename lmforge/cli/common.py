"""Flags shared by every command that runs a model (the same words everywhere)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.engine import SamplingParams


@dataclass
class ModelArgs:
    model: str | None = None  # GGUF file, HF folder, run folder, or model id; default model when unset
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    quant: str = "none"  # none | int8 | int4 (runtime weight quantization)
    device: str = "cpu"
    threads: int = 0  # torch threads; 0 = torch's default


@dataclass
class SamplingArgs:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def sampling_from(args) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop),
    )


def load_lm(args):
    """An `lmforge.api.LM` from ModelArgs fields."""
    import torch

    from lmforge.api import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, dtype=args.dtype, device=args.device, quant=args.quant)
