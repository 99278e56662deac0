"""Families whose checkpoints name or lay out weights differently from lmforge's one model:
their state dicts mapped in (on load) and out (on save), exactly (splits, joins, transposes).

- Phi-3 fuses q|k|v into `qkv_proj` and gate|up into `gate_up_proj`.
- GPT-2 names everything `transformer.h.N.*`, fuses q|k|v into `c_attn`, and stores its linear
  weights as Conv1D ([in, out], the transpose of nn.Linear's).
- Idefics3 / SmolVLM keep the text model under `model.text_model` and the connector's projection
  under `model.connector.modality_projection` (`vlm_path`).
"""
from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.model import Config


def split_fused(state: dict, cfg: Config) -> dict:
    """Phi-3's fused q|k|v and gate|up weights -> the separate layers of lmforge's one model."""
    out = {}
    q, kv, ff = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    for key, t in state.items():
        if key.endswith("self_attn.qkv_proj.weight"):
            stem = key[: -len("qkv_proj.weight")]
            out[stem + "q_proj.weight"], out[stem + "k_proj.weight"], out[stem + "v_proj.weight"] = t.split([q, kv, kv])
        elif key.endswith("mlp.gate_up_proj.weight"):
            stem = key[: -len("gate_up_proj.weight")]
            out[stem + "gate_proj.weight"], out[stem + "up_proj.weight"] = t.split([ff, ff])
        else:
            out[key] = t
    return out


def join_fused(state: dict) -> dict:
    """The inverse of `split_fused`, for a Phi-3 folder."""
    out = {}
    for key, t in state.items():
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            continue
        if key.endswith("self_attn.q_proj.weight"):
            stem = key[: -len("q_proj.weight")]
            out[stem + "qkv_proj.weight"] = torch.cat([t, state[stem + "k_proj.weight"], state[stem + "v_proj.weight"]])
        elif key.endswith("mlp.gate_proj.weight"):
            stem = key[: -len("gate_proj.weight")]
            out[stem + "gate_up_proj.weight"] = torch.cat([t, state[stem + "up_proj.weight"]])
        else:
            out[key] = t
    return out


# GPT-2 (transformer.h.N.*, Conv1D weights stored [in, out]) <-> lmforge's names, per layer
_GPT2_LINEARS = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
_GPT2_NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}


def gpt2_state_to_lmforge(state: dict, cfg: Config) -> dict:
    out, d = {}, cfg.d_model
    for key, t in state.items():
        k = key.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or (k == "lm_head.weight" and cfg.tie_embeddings):
            continue  # old checkpoints' causal-mask buffers; the tied head
        if k in ("wte.weight", "wpe.weight"):
            out[{"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight"}[k]] = t
        elif k.startswith("ln_f."):
            out["model.norm." + k[len("ln_f."):]] = t
        elif k.startswith("h."):
            _, i, rest = k.split(".", 2)
            p, (mod, _, kind) = f"model.layers.{i}.", rest.rpartition(".")
            if mod == "attn.c_attn":  # q|k|v fused, [in, 3 out]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), (t.t() if kind == "weight" else t).split(d)):
                    out[f"{p}self_attn.{name}.{kind}"] = part.contiguous()
            elif mod in _GPT2_LINEARS:
                out[f"{p}{_GPT2_LINEARS[mod]}.{kind}"] = t.t().contiguous() if kind == "weight" else t
            elif mod in _GPT2_NORMS:
                out[f"{p}{_GPT2_NORMS[mod]}.{kind}"] = t
            else:
                raise LmforgeError(f"unexpected GPT-2 tensor '{key}'")
        else:
            out[k] = t
    return out


def lmforge_state_to_gpt2(state: dict) -> dict:
    out = {}
    for key, t in state.items():
        if key in ("model.embed_tokens.weight", "model.embed_positions.weight"):
            out[{"model.embed_tokens.weight": "transformer.wte.weight", "model.embed_positions.weight": "transformer.wpe.weight"}[key]] = t
        elif key.startswith("model.norm."):
            out["transformer.ln_f." + key[len("model.norm."):]] = t
        elif key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            p, (mod, _, kind) = f"transformer.h.{i}.", rest.rpartition(".")
            if mod == "self_attn.q_proj":
                parts = [state[f"model.layers.{i}.self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")]
                out[f"{p}attn.c_attn.{kind}"] = torch.cat(parts).t().contiguous() if kind == "weight" else torch.cat(parts)
            elif mod in ("self_attn.k_proj", "self_attn.v_proj"):
                continue
            else:
                theirs = {v: k for k, v in {**_GPT2_LINEARS, **_GPT2_NORMS}.items()}[mod]
                out[f"{p}{theirs}.{kind}"] = t.t().contiguous() if kind == "weight" and mod in _GPT2_LINEARS.values() else t
        else:
            out[key] = t
    return out


def tensors_to_save(model, dtype: torch.dtype | None = None, tied_head: str | None = None) -> dict:
    """The model's state dict as a checkpoint holds it: detached, on the CPU, contiguous, floats
    in `dtype` when given, without the tied head `tied_head` (HF leaves it out)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == tied_head:
            continue
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().cpu()
    return out


# A vision-language model's (Idefics3 / SmolVLM) module paths in its checkpoints, beside lmforge's
# `VLM` (lmforge/vision/vlm.py): its weights and its LoRA adapters are saved under these.
VLM_PATHS = (("text.model.", "model.text_model."), ("text.lm_head", "lm_head"),
             ("connector.proj", "model.connector.modality_projection.proj"), ("vision_model.", "model.vision_model."))


def is_vlm(model) -> bool:
    return hasattr(model, "vision_model") and hasattr(model, "text")


def vlm_path(path: str, to_checkpoint: bool = True) -> str:
    """A module path (or state dict key) of lmforge's VLM in the checkpoint's names (or back)."""
    for ours, theirs in VLM_PATHS:
        a, b = (ours, theirs) if to_checkpoint else (theirs, ours)
        if path.startswith(a):
            return b + path[len(a):]
    return path
