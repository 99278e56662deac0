"""What a model is and what lmforge does with it: `describe(cfg)` for `lmforge info`.

Families are `Config` fields read by the one `Transformer` (lmforge/model.py), not copies of
it: a checkpoint's family is the set of features its config turns on. This file names them
for people, and says which of lmforge's paths run each one.
"""
from __future__ import annotations

from lmforge.model import Config

# HF model_type / GGUF architecture lmforge reads -> the family's name
FAMILIES = {"llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
            "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3", "phi3": "Phi-3", "olmo2": "OLMo 2", "smollm3": "SmolLM3", "gpt2": "GPT-2",
            "deepseek_v2": "DeepSeek-V2", "gemma3": "Gemma 3", "qwen3moe": "Qwen3-MoE"}  # the last two: llama.cpp's names


def family(cfg: Config) -> str:
    source = cfg.extra.get("model_type") or cfg.extra.get("architecture")
    if source in FAMILIES:
        return FAMILIES[source]
    if cfg.kv_lora_rank:
        return "DeepSeek-V2"
    if cfg.sandwich_norms:
        return "Gemma 3" if cfg.qk_norm else "Gemma 2"
    if cfg.post_norms:
        return "OLMo 2"
    if cfg.rope_layers is not None:
        return "SmolLM3"
    if cfg.learned_positions:
        return "GPT-2"
    if cfg.is_moe:
        return "Qwen2-MoE" if cfg.n_shared_experts else "Qwen3-MoE" if cfg.qk_norm else "Mixtral"
    if cfg.qk_norm:
        return "Qwen3"
    if cfg.attention_bias:
        return "Qwen2"
    return "Mistral" if cfg.sliding_window else "LLaMA"


def features(cfg: Config) -> list[str]:
    out = []
    if cfg.kv_lora_rank:
        q = f", queries from a {cfg.q_lora_rank}-wide latent" if cfg.q_lora_rank else ""
        out.append(f"multi-head latent attention (keys and values from a {cfg.kv_lora_rank}-wide latent{q}; "
                   f"RoPE on {cfg.qk_rope_head_dim} of {cfg.head_dim} key dimensions)")
    elif cfg.n_kv_heads == 1:
        out.append(f"multi-query attention ({cfg.n_heads} query heads)")
    elif cfg.n_kv_heads < cfg.n_heads:
        out.append(f"grouped-query attention ({cfg.n_heads} query heads, {cfg.n_kv_heads} key/value heads)")
    if cfg.sliding_window:
        slides = sum(cfg.window(i) is not None for i in range(cfg.n_layers))
        where = "every layer" if slides == cfg.n_layers else f"{slides} of {cfg.n_layers} layers"
        out.append(f"sliding-window attention ({cfg.sliding_window} positions, {where})")
    if cfg.post_norms:
        out.append("norms after attention and MLP only")
    if cfg.qk_norm:
        out.append("RMSNorm of the whole query and key projections" if cfg.qk_norm_whole else "RMSNorm of each query and key head")
    if cfg.attention_bias:
        out.append("q/k/v biases")
    if cfg.sandwich_norms:
        out.append("norms before and after attention and MLP, (1 + w) scales, GeGLU, scaled embeddings")
    for what, cap in (("attention scores", cfg.attn_logit_softcap), ("logits", cfg.final_logit_softcap)):
        if cap:
            out.append(f"{what} soft-capped at {cap:g}")
    if cfg.learned_positions:
        out.append("LayerNorm, learned positions, GELU MLP, biases")
    if cfg.rope_layers is not None:
        out.append(f"no positional encoding in {sum(not f for f in cfg.rope_layers)} of {cfg.n_layers} layers (NoPE)")
    if cfg.rope_local_theta:
        out.append(f"RoPE base {cfg.rope_local_theta:g} in sliding layers, {cfg.rope_theta:g} in full ones")
    if cfg.rope_kind:
        out.append(f"RoPE scaling {cfg.rope_kind}")
    if cfg.is_moe:
        shared = f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""
        dense = f"; the first {cfg.moe_first_dense} layers dense" if cfg.moe_first_dense else ""
        out.append(f"mixture of experts ({cfg.n_experts} experts, top-{cfg.n_experts_per_token}{shared}{dense})")
    out.append("tied input/output embeddings" if cfg.tie_embeddings else "separate output head")
    return out


def support(cfg: Config) -> dict[str, str]:
    """lmforge's paths for this model: "yes", or why not (the reasons the paths themselves give)."""
    from lmforge.export.gguf import unsupported_reason as gguf_reason
    from lmforge.fast.decode import unsupported_config

    fast, gguf = unsupported_config(cfg), gguf_reason(cfg)
    return {
        "run (CLI, Python API, server)": "yes",
        "fast single-sequence decoder (and native GGUF step on CPU)": "yes" if fast is None else f"no: {fast}",
        "finetune (SFT, LoRA, QLoRA), align (DPO, GRPO), eval, inspect": "yes",
        "convert --to hf": "yes",
        "convert --to gguf": "yes" if gguf is None else f"no: {gguf}",
    }


def describe(cfg: Config) -> dict:
    return {"family": family(cfg), "features": features(cfg), "lmforge": support(cfg)}
