"""`load_model(path)`: GGUF file, HF folder or lmforge run folder -> (Transformer, Tokenizer)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.loading.gguf_file import read_gguf, read_gguf_metadata
from lmforge.loading.hf import iter_hf_tensors, read_hf_config
from lmforge.loading.resolve import resolve_model_path
from lmforge.model import Config, Transformer, rope_inv_freq
from lmforge.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype '{dtype}' (choose fp32, bf16 or fp16)")
    return DTYPES[dtype]


def _has_model(folder: Path) -> bool:
    # a full model (config.json) or a LoRA adapter in PEFT's layout (adapter_config.json)
    return (folder / "config.json").exists() or (folder / "adapter_config.json").exists()


def adapter_folder(model) -> Path | None:
    """The folder when `model` (path or run folder) holds a LoRA adapter rather than a full model."""
    path = resolve_model_path(model)
    if not path.is_dir():
        return None
    folder = resolve_run_folder(path)
    if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        return folder
    return None


def resolve_run_folder(path: Path) -> Path:
    """A run folder's newest complete checkpoint (via `latest`), else the path itself."""
    from lmforge.train.manifest import damage, newest_intact

    latest = path / "latest"
    if latest.exists() or latest.is_symlink():
        target = Path(os.readlink(latest)) if latest.is_symlink() else Path(latest.read_text().strip())
        target = target if target.is_absolute() else path / target
        if not _has_model(target):
            raise LmforgeError(f"run folder {path}: 'latest' points at {target}, which is not a complete checkpoint")
        if damage(target) is None:
            return target
    if (path / "checkpoints").is_dir() and not _has_model(path):
        done = sorted(p for p in (path / "checkpoints").iterdir() if p.is_dir())
        found = newest_intact(done, _has_model, warn=lambda msg: print(msg, file=sys.stderr))
        if found is None:
            raise LmforgeError(f"run folder {path} has no complete, intact checkpoint")
        return found
    return path


def read_model_files(model=None, dtype=torch.float32, blocks: bool = False) -> tuple[Config, dict, Tokenizer | None, Path]:
    """(config, state_dict in `dtype`, tokenizer or None, resolved path). `blocks`: a quantized
    GGUF's linear weights stay as its blocks (`BlockWeight`s, see `read_gguf`)."""
    path = resolve_model_path(model)
    dtype = parse_dtype(dtype)
    adapter = adapter_folder(path)
    if adapter is not None:  # base + LoRA adapter, merged into plain weights
        from lmforge.finetune.lora import load_adapter_model

        m, tok = load_adapter_model(adapter, dtype=dtype)
        return m.cfg, dict(m.state_dict()), tok, adapter
    if path.is_file():
        cfg, state, meta = read_gguf(path, dtype, blocks=blocks)
        tok = Tokenizer.from_gguf_fields(meta) if "tokenizer.ggml.tokens" in meta else None
        return cfg, state, tok, path
    folder = resolve_run_folder(path)
    cfg = read_hf_config(folder)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in iter_hf_tensors(folder)}
    tok = Tokenizer.from_dir(folder) if (folder / "tokenizer.json").exists() else None
    return cfg, state, tok, folder


def build_model(cfg: Config, state: dict, device="cpu") -> Transformer:
    """Instantiate without initialising weights (`_no_init`: the empty tensors are never
    touched, so cost nothing), then take `state` as is.
    `BlockWeight` entries become `BlockLinear` layers that compute from the file's blocks."""
    from lmforge.loading.gguf_file import BlockWeight

    if any(k.startswith("transformer.h.") for k in state):
        from lmforge.loading.state_maps import gpt2_state_to_lmforge  # GPT-2's names and Conv1D layout -> ours

        state = gpt2_state_to_lmforge(state, cfg)
    blocks = {k[: -len(".weight")]: v for k, v in state.items() if isinstance(v, BlockWeight)}
    state = {k: v for k, v in state.items() if not isinstance(v, BlockWeight)}
    if cfg.tie_embeddings and "lm_head" not in blocks:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    with _no_init():
        model = Transformer(cfg)
    if cfg.is_moe:
        from lmforge.moe import hf_state_to_lmforge  # Mixtral-style keys -> our module names

        state = hf_state_to_lmforge(state, cfg)
    if any(k.endswith(("qkv_proj.weight", "gate_up_proj.weight")) for k in state):
        from lmforge.loading.state_maps import split_fused  # Phi-3's fused layers -> ours

        state = split_fused(state, cfg)
    wanted = set(model.state_dict()) - {f"{name}.weight" for name in blocks}
    missing, unexpected = wanted - set(state), set(state) - wanted
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise LmforgeError(f"weights do not match the config: {what}")
    _swap_block_linears(model, blocks, state)
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings and "lm_head" not in blocks:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    return model.to(device).eval()


@contextlib.contextmanager
def _no_init():
    """Skip the layers' random initialisation: the weights come from the file. (Building on the
    meta device instead costs more: its first ops import PyTorch's reference decompositions,
    1.2 s of a 3 s cold start, measured.)"""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _swap_block_linears(model, blocks: dict, state: dict) -> None:
    """Put a BlockLinear where each block-held weight's nn.Linear was (its bias moves with it)."""
    from lmforge.native.linear import BlockLinear

    for name, bw in blocks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = state.pop(f"{name}.bias", None)
        setattr(parent, child, BlockLinear(bw.blocks, bw.qtype, bw.in_features, bias))
    if blocks:
        model.quant = "gguf"
        model.requires_grad_(False)


def _quantized_gguf(model) -> bool:
    """Whether `model` names a GGUF file whose weights are already quantized."""
    try:
        path = resolve_model_path(model)
    except LmforgeError:
        return False  # the loader says what is wrong, in its own words
    from lmforge.loading.gguf_file import gguf_is_quantized

    return path.is_file() and path.suffix.lower() == ".gguf" and gguf_is_quantized(path)


def load_model(model=None, dtype="fp32", device="cpu", quant: str = "none") -> tuple[Transformer, Tokenizer | None]:
    """Load a model for inference. `device`: cpu, cuda, cuda:N, mps or auto (CUDA when present,
    else MPS, else CPU; `lmforge.device.resolve_device`). `quant` (int8/int4) is applied after
    loading when set; "auto" picks per device (`lmforge.quant.resolve_precision`: int8 with fp32
    weights on CPU, bf16 weights on CUDA when `dtype` is fp32).

    A folder holding a LoRA adapter (PEFT layout) loads the base it names, with the adapter merged.
    """
    from lmforge.device import resolve_device
    from lmforge.quant import resolve_precision

    device = resolve_device(device)
    dtype, quant = resolve_precision(dtype, quant, device, quantized_source=quant == "auto" and _quantized_gguf(model))
    if quant == "gguf" and not _quantized_gguf(model):
        raise LmforgeError(f"--quant gguf runs a quantized GGUF file's own blocks; {resolve_model_path(model)} is not one")
    adapter = adapter_folder(model)
    vlm = _vlm_folder(model) if adapter is None else None
    if adapter is not None:
        from lmforge.finetune.lora import load_adapter_model

        m, tok = load_adapter_model(adapter, dtype=dtype, device=device)
        path = adapter
    elif vlm is not None:  # Idefics3 / SmolVLM: vision encoder + this text model (lmforge.vision)
        from lmforge.vision.load import load_vlm

        m, tok = load_vlm(vlm, dtype, device)
        path = vlm
    else:
        cfg, state, tok, path = read_model_files(model, dtype, blocks=quant == "gguf")
        m = build_model(cfg, state, device)
    m.source_path = str(path)
    if quant and quant not in ("none", "gguf"):
        from lmforge.quant import quantize_model

        if vlm is not None:  # the text model only: the vision encoder runs once per image
            m.text = quantize_model(m.text, quant, tokenizer=tok)
        else:
            m = quantize_model(m, quant, tokenizer=tok)  # the tokenizer feeds its calibration text
    return m, tok


def _vlm_folder(model) -> Path | None:
    """The folder when `model` names an Idefics3 / SmolVLM model folder (or a run folder's checkpoint of one)."""
    try:
        path = resolve_model_path(model)
    except LmforgeError:
        return None  # the text loader says what is wrong, in its own words
    if not path.is_dir():
        return None
    from lmforge.loading.vlm_files import vlm_folder

    try:
        return vlm_folder(resolve_run_folder(path))
    except LmforgeError:
        return None


def load_tokenizer(model=None) -> Tokenizer:
    """Only the tokenizer: from a model (GGUF/HF/run folder), a tokenizer.json, or a .tiktoken file."""
    path = resolve_model_path(model)
    if path.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken(path)
    if path.is_file() and path.suffix == ".json":
        return Tokenizer.from_dir(path)
    if path.is_file():
        return Tokenizer.from_gguf_fields(read_gguf_metadata(path))
    return Tokenizer.from_dir(resolve_run_folder(path))
