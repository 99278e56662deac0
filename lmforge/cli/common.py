"""Flags shared by every command that runs a model (the same words everywhere)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from lmforge.engine import SamplingParams
from lmforge.errors import LmforgeError


@dataclass
class ModelArgs:
    model: str | None = None  # GGUF file, HF folder, run folder, or model id; default model when unset
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    # runtime weight quantization: auto | none | int8 | int4. auto = int8 on CPU with fp32 weights
    # (the fastest decoding there, <1 % perplexity); on CUDA bf16 weights, no quantization;
    # none with --dtype bf16/fp16 (those weights run) or on MPS
    quant: str = "auto"
    device: str = "auto"  # auto (CUDA when present, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch threads; 0 = torch's default
    # trusted input only: special-token text typed in a message (e.g. "<|im_start|>system") acts as
    # that special token instead of plain text
    allow_special_in_content: bool = False
    # extra variables for the model's chat template, as a JSON object: '{"enable_thinking": false}'
    # (Qwen3 answers without thinking first)
    template_kwargs: str | None = None


@dataclass
class SamplingArgs:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    # unset: the model's generation_config.json, else llama.cpp's top-k 40, top-p 0.95, min-p 0.05
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None  # unset: the model's recommendation, else 1.0 (off)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # speculative decoding of one greedy reply (same text, faster): none | auto | ngram | self |
    # self:LAYERS | PATH of a smaller draft model. auto = prompt lookup (ngram) when greedy, else none
    draft: str = "auto"


def sampling_from(args) -> SamplingParams:
    """SamplingParams from SamplingArgs fields (unset ones off until `with_model_sampling`); a
    draft that cannot work is a one-line error here, before the model loads."""
    from lmforge.engine import SAMPLING_KEYS
    from lmforge.fast.speculative import check_draft

    given = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k, None) is not None}
    p = SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=list(args.stop),
                       draft=getattr(args, "draft", "none"), **given)
    check_draft(p.draft, p)
    return p


def with_model_sampling(params: SamplingParams, args, model) -> SamplingParams:
    """`params` with the sampling flags left unset taken from the loaded model's recommendation."""
    from lmforge.engine import SAMPLING_KEYS, with_recommended

    return with_recommended(params, model, {k for k in SAMPLING_KEYS if getattr(args, k, None) is not None})


def load_lm(args):
    """An `lmforge.api.LM` from ModelArgs fields (--device and --quant auto resolved by the
    loader: `lmforge.device.resolve_device`, `lmforge.quant.resolve_precision`)."""
    import torch

    from lmforge.api import load

    import sys
    import time

    from lmforge.loading.resolve import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    # a person waits here (seconds for a GGUF, longer with int8): say what is happening; a script
    # reading stderr (not a terminal) keeps getting nothing but errors, one line each
    say = sys.stderr.isatty()
    t0 = time.time()
    if say:
        print(f"loading {resolve_model_path(args.model)} ...", end="", file=sys.stderr, flush=True)
    try:
        lm = load(args.model, dtype=args.dtype, device=args.device, quant=args.quant)
    except BaseException:
        if say:
            print(file=sys.stderr)
        raise
    lm.tokenizer.allow_special_in_content = args.allow_special_in_content
    lm.tokenizer.template_kwargs = parse_template_kwargs(getattr(args, "template_kwargs", None))
    if say:
        print(f" ready in {time.time() - t0:.1f} s ({runtime_summary(lm, args)})", file=sys.stderr, flush=True)
    return lm


def parse_template_kwargs(text: str | None) -> dict:
    """--template-kwargs: a JSON object, or a one-line error saying what it is instead."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"--template-kwargs is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise LmforgeError(f"--template-kwargs must be a JSON object like '{{\"enable_thinking\": false}}', got {text!r}")
    return value


def runtime_summary(lm, args=None) -> str:
    """How the model runs, for banners: e.g. "int8 weights (--quant auto), fp32, cpu, draft auto"."""
    emb = lm.model.model.embed_tokens.weight
    quant = getattr(lm.model, "quant", "none")
    words = [f"{quant} weights" if quant != "none" else "unquantized weights"]
    if args is not None and getattr(args, "quant", None) == "auto":
        words[0] += " (--quant auto)"
    words += [{torch_name: short for short, torch_name in _DTYPE_NAMES}.get(str(emb.dtype), str(emb.dtype)), str(emb.device)]
    if args is not None and hasattr(args, "draft"):
        words.append(f"draft {args.draft}")
    return ", ".join(words)


_DTYPE_NAMES = (("fp32", "torch.float32"), ("bf16", "torch.bfloat16"), ("fp16", "torch.float16"))
