"""Hugging Face folders: `config.json` (read tolerantly) + safetensors weights, both ways."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.loading.state_maps import join_fused, lmforge_state_to_gpt2
from lmforge.model import Config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "olmo2",
                         "smollm3", "gpt2", "deepseek_v2")
GEMMA = ("gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# lmforge-only MoE settings kept in config.json["lmforge"]; n_shared_experts is not: the HF config says it
MOE_FIELDS = ("n_experts", "n_experts_per_token", "moe_d_ff", "moe_capacity_factor",
              "moe_aux_loss_coef", "moe_norm_topk_prob")


_REQUIRED = object()


def _int(hf: dict, key: str, where: str, default=_REQUIRED, low: int = 1, high: int = 1 << 31) -> int:
    """hf[key] as an int, or a one-line error naming the file and the key (a string, a float with
    a fraction, a bool or an absurd size would otherwise fail deep inside torch)."""
    v = hf.get(key, default)
    if v is _REQUIRED:
        raise LmforgeError(f"{where}: '{key}' is missing")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise LmforgeError(f"{where}: '{key}' must be an integer, got {v!r}")
    if not low <= v <= high:
        raise LmforgeError(f"{where}: '{key}' is {v}, outside {low}..{high}")
    return v


def _float(hf: dict, key: str, where: str, default: float) -> float:
    v = hf.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise LmforgeError(f"{where}: '{key}' must be a finite number, got {v!r}")
    return float(v)


def config_from_hf(hf: dict, where: str = "config.json") -> Config:
    """Map what matters of an HF config; ignore the rest; refuse what changes the math."""
    mtype = hf.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        arch = (hf.get("architectures") or ["?"])[0]
        raise LmforgeError(f"unsupported architecture '{mtype or arch}' in {where} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if mtype == "gpt2":
        return _gpt2_config(hf, where)
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise LmforgeError(f"unsupported hidden_act '{act}' in {where} (supported: {', '.join(_ACTIVATIONS)})")
    # transformers >= 5 moves rope_theta/rope_scaling into rope_parameters (Gemma 3: one per layer type)
    rope = dict(hf.get("rope_parameters") or {})
    local_theta = None
    if "full_attention" in rope:
        local_theta = (rope.get("sliding_attention") or {}).get("rope_theta")
        rope = dict(rope["full_attention"])
    elif mtype == "gemma3_text":
        local_theta = hf.get("rope_local_base_freq", 10000.0)
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "llama3", "default", "longrope", "su", "yarn"):
            raise LmforgeError(f"unsupported rope scaling '{kind}' in {where} (supported: linear, llama3, longrope, yarn)")
        scaling = None if kind == "default" else _longrope(dict(scaling), hf, where) if kind in ("longrope", "su") else dict(scaling)
    if float((hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise LmforgeError(f"unsupported in {where}: partial_rotary_factor (RoPE on part of each head)")
    sliding, layer_types = _sliding_window(hf, mtype, where)
    max_pos = _int(hf, "max_position_embeddings", where, 2048)
    n_heads = _int(hf, "num_attention_heads", where, high=1 << 16)
    d_model = _int(hf, "hidden_size", where, high=1 << 20)
    moe = {}
    if mtype == "mixtral":
        moe = dict(n_experts=_int(hf, "num_local_experts", where, high=1 << 16), n_experts_per_token=_int(hf, "num_experts_per_tok", where, 2),
                   moe_d_ff=_int(hf, "intermediate_size", where, high=1 << 22))
    elif mtype in ("qwen2_moe", "qwen3_moe"):
        if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
            raise LmforgeError(f"unsupported in {where}: dense layers among MoE layers (mlp_only_layers / decoder_sparse_step)")
        experts = "num_experts" if "num_experts" in hf else "num_local_experts"  # transformers 5 writes the latter
        moe = dict(n_experts=_int(hf, experts, where, high=1 << 16), n_experts_per_token=_int(hf, "num_experts_per_tok", where, 2),
                   moe_d_ff=_int(hf, "moe_intermediate_size", where, high=1 << 22),
                   n_shared_experts=1 if hf.get("shared_expert_intermediate_size") else 0,
                   moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        if hf.get("shared_expert_intermediate_size"):  # the shared expert's width is d_ff * n_shared_experts
            hf = dict(hf, intermediate_size=hf["shared_expert_intermediate_size"])
    elif mtype == "deepseek_v2":
        moe = _deepseek(hf, where)
    lm_extra = hf.get("lmforge", {})
    for k in MOE_FIELDS:
        if k in lm_extra:
            moe[k] = lm_extra[k]
    return Config(
        vocab_size=_int(hf, "vocab_size", where, high=1 << 24),
        d_model=d_model,
        n_layers=_int(hf, "num_hidden_layers", where, high=1 << 12),
        n_heads=n_heads,
        n_kv_heads=_int(hf, "num_key_value_heads", where, n_heads, high=n_heads) if hf.get("num_key_value_heads") is not None else n_heads,
        head_dim=_int(hf, "head_dim", where, high=1 << 14) if hf.get("head_dim") is not None else d_model // n_heads,
        d_ff=_int(hf, "intermediate_size", where, hf.get("shared_expert_intermediate_size", 4 * d_model), high=1 << 22),
        norm_eps=_float(hf, "rms_norm_eps", where, 1e-6),
        rope_theta=_float({"rope_theta": theta}, "rope_theta", where, 10000.0),
        rope_scaling=scaling,
        max_seq_len=max_pos,
        sliding_window=sliding,
        layer_types=layer_types,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", mtype in ("qwen2", "qwen2_moe"))),
        qk_norm=mtype in ("qwen3", "qwen3_moe", "gemma3_text", "olmo2"),
        post_norms=mtype == "olmo2",
        rope_layers=_rope_layers(hf, mtype, where),
        qk_norm_whole=mtype == "olmo2",
        activation=_ACTIVATIONS[act],
        **(_gemma(hf, where, mtype) if mtype in GEMMA else {}),
        rope_local_theta=_float({"t": local_theta}, "t", where, None) if local_theta else None,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        extra={"source_format": "hf", "model_type": mtype},
        **moe,
    )


def _deepseek(hf: dict, where: str) -> dict:
    """DeepSeek-V2: multi-head latent attention, and its MoE (dense first layers, top-k weights
    scaled and never renormalized, shared experts without a gate, optionally group-limited)."""
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise LmforgeError(f"unsupported in {where}: topk_method '{method}' (greedy, group_limited_greedy)")
    if int(hf.get("moe_layer_freq", 1)) != 1:
        raise LmforgeError(f"unsupported in {where}: moe_layer_freq (MoE in every layer past first_k_dense_replace)")
    out = dict(kv_lora_rank=_int(hf, "kv_lora_rank", where, high=1 << 16),
               q_lora_rank=_int(hf, "q_lora_rank", where, high=1 << 16) if hf.get("q_lora_rank") else None,
               qk_nope_head_dim=_int(hf, "qk_nope_head_dim", where, high=1 << 12),
               qk_rope_head_dim=_int(hf, "qk_rope_head_dim", where, high=1 << 12),
               v_head_dim=_int(hf, "v_head_dim", where, high=1 << 12))
    if not hf.get("n_routed_experts"):
        return out
    shared, width = _int(hf, "n_shared_experts", where, 0, low=0), _int(hf, "moe_intermediate_size", where, high=1 << 22)
    groups = (_int(hf, "n_group", where), _int(hf, "topk_group", where)) if method == "group_limited_greedy" else None
    return dict(out, n_experts=_int(hf, "n_routed_experts", where, high=1 << 16), moe_d_ff=width,
                n_experts_per_token=_int(hf, "num_experts_per_tok", where, 2), n_shared_experts=shared,
                moe_shared_d_ff=width * shared if shared else None, moe_shared_gate=False, moe_norm_topk_prob=False,
                moe_routed_scale=_float(hf, "routed_scaling_factor", where, 1.0), moe_groups=groups,
                moe_first_dense=_int(hf, "first_k_dense_replace", where, 0, low=0))


def _deepseek_to_hf(cfg: Config) -> dict:
    out = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", kv_lora_rank=cfg.kv_lora_rank,
               q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
               v_head_dim=cfg.value_dim, head_dim=cfg.qk_rope_head_dim, num_key_value_heads=cfg.n_heads)
    if not cfg.is_moe:
        return dict(out, n_routed_experts=None, first_k_dense_replace=cfg.n_layers)
    if cfg.moe_norm_topk_prob or cfg.moe_shared_gate and cfg.n_shared_experts:
        raise LmforgeError("a DeepSeek-V2 config keeps the top-k router weights as they are and has no shared-expert gate")
    if cfg.n_shared_experts and cfg.moe_shared_d_ff != (cfg.moe_d_ff or cfg.d_ff) * cfg.n_shared_experts:
        raise LmforgeError("a DeepSeek-V2 config has shared experts as wide as its routed ones (moe_shared_d_ff = "
                           "moe_d_ff x n_shared_experts)")
    groups = cfg.moe_groups
    return dict(out, n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_token, moe_intermediate_size=cfg.moe_d_ff,
                n_shared_experts=cfg.n_shared_experts, routed_scaling_factor=cfg.moe_routed_scale,
                first_k_dense_replace=cfg.moe_first_dense, topk_method="group_limited_greedy" if groups else "greedy",
                n_group=groups[0] if groups else None, topk_group=groups[1] if groups else None, norm_topk_prob=False)


def _sliding_window(hf: dict, mtype: str, where: str) -> tuple[int | None, list[str] | None]:
    """(window, per-layer types) from an HF config: Mistral slides in every layer when
    `sliding_window` is set; Qwen2-family configs only with `use_sliding_window`, in the layers
    `layer_types` (or `max_window_layers`) name."""
    if hf.get("sliding_window") is None or not hf.get("use_sliding_window", mtype in ("mistral", "phi3") + GEMMA):
        return None, None
    window = _int(hf, "sliding_window", where, high=1 << 30)
    types = hf.get("layer_types")
    if types is None and mtype in GEMMA:  # configs before transformers 5: the layers' pattern
        every = _int(hf, "sliding_window_pattern", where, 6) if mtype == "gemma3_text" else 2
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(_int(hf, "num_hidden_layers", where))]
    if types is None and mtype != "mistral" and hf.get("max_window_layers") is not None:
        n = _int(hf, "num_hidden_layers", where, high=1 << 12)
        first = _int(hf, "max_window_layers", where, high=1 << 12)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if types is not None:
        bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
        if bad or len(types) != hf.get("num_hidden_layers"):
            raise LmforgeError(f"{where}: layer_types must name sliding_attention or full_attention for each of the "
                               f"{hf.get('num_hidden_layers')} layers (got {len(types)}{', ' + bad[0] if bad else ''})")
        if all(t == "sliding_attention" for t in types):
            types = None
        elif not any(t == "sliding_attention" for t in types):
            return None, None
    return window, types


def _gemma(hf: dict, where: str, mtype: str) -> dict:
    """Gemma 2 and 3's Config fields: (1 + w) norms on both sides of attention and MLP, scaled
    embeddings, soft-capped attention scores and logits (Gemma 2), its own attention scale."""
    def cap(key):
        return _float(hf, key, where, None) if hf.get(key) is not None else None

    return dict(norm_unit_offset=True, sandwich_norms=True, embed_scale=True, attn_logit_softcap=cap("attn_logit_softcapping"),
                final_logit_softcap=cap("final_logit_softcapping"),
                query_pre_attn_scalar=_float(hf, "query_pre_attn_scalar", where, None) if hf.get("query_pre_attn_scalar") else None)


def _gpt2_config(hf: dict, where: str) -> Config:
    """GPT-2: LayerNorm, learned positions, an ungated GELU MLP, biases everywhere, tied head."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS or _ACTIVATIONS[act] != "gelu_tanh":
        raise LmforgeError(f"unsupported activation_function '{act}' in {where} (GPT-2's is gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise LmforgeError(f"unsupported in {where}: GPT-2 attention scaled other than by 1/sqrt(head size)")
    d, heads = _int(hf, "n_embd", where, high=1 << 20), _int(hf, "n_head", where, high=1 << 16)
    return Config(vocab_size=_int(hf, "vocab_size", where, high=1 << 24), d_model=d, n_layers=_int(hf, "n_layer", where, high=1 << 12),
                  n_heads=heads, n_kv_heads=heads, head_dim=d // heads,
                  d_ff=_int(hf, "n_inner", where, high=1 << 22) if hf.get("n_inner") else 4 * d,
                  norm_eps=_float(hf, "layer_norm_epsilon", where, 1e-5), max_seq_len=_int(hf, "n_positions", where, 1024),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attention_bias=True, mlp_bias=True,
                  activation="gelu_tanh", norm_kind="layer", learned_positions=True, gated_mlp=False, attn_out_bias=True,
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
                  extra={"source_format": "hf", "model_type": "gpt2"})


def _gpt2_config_to_hf(cfg: Config) -> dict:
    if not (cfg.norm_kind == "layer" and cfg.learned_positions and not cfg.gated_mlp and cfg.attention_bias and cfg.mlp_bias
            and cfg.attn_out_bias and cfg.activation == "gelu_tanh" and cfg.n_kv_heads == cfg.n_heads) or cfg.is_moe:
        raise LmforgeError("an HF config for LayerNorm/learned-position layers needs all of GPT-2's features")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_positions": cfg.max_seq_len, "n_inner": cfg.d_ff,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": "float32", "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id}


def _rope_layers(hf: dict, mtype: str, where: str) -> list[bool] | None:
    """SmolLM3's `no_rope_layers` (despite its name: 1 = the layer uses RoPE) as lmforge's
    `rope_layers`; None when every layer rotates."""
    flags = hf.get("no_rope_layers") if mtype == "smollm3" else None
    if flags is None:
        return None
    if len(flags) != hf.get("num_hidden_layers") or any(f not in (0, 1, True, False) for f in flags):
        raise LmforgeError(f"{where}: no_rope_layers must hold a 0 or 1 for each of the {hf.get('num_hidden_layers')} layers")
    return None if all(flags) else [bool(f) for f in flags]


def _longrope(sc: dict, hf: dict, where: str) -> dict:
    """Phi-3's LongRoPE ("su" in older configs) with what it needs in one place: both factor
    lists and the original context (top-level in Phi-3 configs)."""
    original = sc.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if original is None or not sc.get("short_factor") or not sc.get("long_factor"):
        raise LmforgeError(f"{where}: longrope scaling needs short_factor, long_factor and original_max_position_embeddings")
    out = {"rope_type": "longrope", "short_factor": [float(x) for x in sc["short_factor"]],
           "long_factor": [float(x) for x in sc["long_factor"]], "original_max_position_embeddings": int(original)}
    for key in ("factor", "attention_factor"):
        if sc.get(key) is not None:
            out[key] = float(sc[key])
    return out


def _whole(x: float) -> int | float:
    """An int where the value is whole (transformers' typed configs want ints there)."""
    return int(x) if float(x).is_integer() else x


def _gemma_to_hf(cfg: Config) -> dict:
    """Gemma 2 (soft-caps, no q/k norms) or Gemma 3 text (q/k norms, a local RoPE base)."""
    if not (cfg.norm_unit_offset and cfg.embed_scale and cfg.activation == "gelu_tanh") or cfg.attention_bias or cfg.is_moe:
        raise LmforgeError("an HF config for sandwich norms needs Gemma's other features too ((1 + w) norms, scaled "
                           "embeddings, GeGLU; no biases or experts)")
    out = dict(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
               attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
               sliding_window=cfg.sliding_window or cfg.max_seq_len,
               layer_types=[("sliding_attention" if cfg.window(i) else "full_attention") for i in range(cfg.n_layers)])
    if not cfg.qk_norm:
        return dict(out, architectures=["Gemma2ForCausalLM"], model_type="gemma2")
    local = cfg.rope_local_theta or cfg.rope_theta
    full = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    return dict(out, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", rope_local_base_freq=local,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": local}, "full_attention": full})


def config_to_hf(cfg: Config) -> dict:
    """A config.json `transformers` loads as LlamaForCausalLM (dense) or Mixtral (MoE)."""
    if cfg.rope_kind == "freq_factors":
        raise LmforgeError("an HF config cannot hold this GGUF's RoPE frequency factors (rope_freqs): "
                           "they fit neither the llama3 nor the linear scheme")
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "torch_dtype": "float32",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.learned_positions or cfg.norm_kind != "rms":
        return _gpt2_config_to_hf(cfg)
    if cfg.rope_layers is not None:
        if cfg.attention_bias or cfg.qk_norm or cfg.is_moe or cfg.sandwich_norms or cfg.post_norms:
            raise LmforgeError("an HF config for layers without RoPE is SmolLM3's, which has no biases, q/k norms, experts or extra norms")
        hf.update(architectures=["SmolLM3ForCausalLM"], model_type="smollm3", no_rope_layers=[int(f) for f in cfg.rope_layers],
                  use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window,
                  layer_types=[("sliding_attention" if cfg.window(i) else "full_attention") for i in range(cfg.n_layers)])
        return hf
    if cfg.post_norms or cfg.qk_norm_whole:
        if not (cfg.post_norms and cfg.qk_norm and cfg.qk_norm_whole) or cfg.attention_bias or cfg.is_moe or cfg.sliding_window:
            raise LmforgeError("an HF config for post norms needs OLMo 2's whole-projection q/k norms (and no biases, experts or windows)")
        hf.update(architectures=["Olmo2ForCausalLM"], model_type="olmo2")
        return hf
    if cfg.extra.get("model_type") == "phi3":
        if cfg.attention_bias or cfg.mlp_bias or cfg.qk_norm or cfg.is_moe or cfg.sandwich_norms or cfg.layer_types:
            raise LmforgeError("a Phi-3 config cannot hold biases, q/k norms, experts, sandwich norms or per-layer windows")
        sc = dict(cfg.rope_scaling or {})
        hf.update(architectures=["Phi3ForCausalLM"], model_type="phi3", sliding_window=cfg.sliding_window,
                  original_max_position_embeddings=sc.pop("original_max_position_embeddings", cfg.max_seq_len),
                  rope_scaling=({**sc, "type": "longrope"} if sc else None))
        return hf
    if cfg.sandwich_norms:
        hf.update(_gemma_to_hf(cfg))
        hf.pop("hidden_act")
        return hf
    if cfg.kv_lora_rank:
        hf.update(_deepseek_to_hf(cfg))
        return hf
    if cfg.qk_norm and cfg.is_moe:
        if cfg.n_shared_experts:
            raise LmforgeError("no transformers family has q/k norms with a shared expert (Qwen3-MoE has none)")
        hf.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=cfg.n_experts,
                  num_experts_per_tok=cfg.n_experts_per_token, moe_intermediate_size=cfg.moe_d_ff or cfg.d_ff,
                  norm_topk_prob=cfg.moe_norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                  router_aux_loss_coef=cfg.moe_aux_loss_coef, lmforge={k: getattr(cfg, k) for k in MOE_FIELDS})
        return hf
    if cfg.qk_norm:
        hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
        if cfg.sliding_window:
            hf.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=0,
                      layer_types=cfg.layer_types or ["sliding_attention"] * cfg.n_layers)
    elif cfg.sliding_window and not cfg.is_moe:
        if cfg.layer_types is not None and not cfg.attention_bias:
            raise LmforgeError("no transformers family has per-layer attention windows without q/k/v biases (Qwen2 has them with)")
        if cfg.attention_bias:  # Qwen2's window; Mistral has no biases
            hf.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
                      sliding_window=cfg.sliding_window, max_window_layers=0,
                      layer_types=cfg.layer_types or ["sliding_attention"] * cfg.n_layers)
        else:
            hf.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=cfg.sliding_window)
    elif cfg.sliding_window:
        raise LmforgeError("an HF config for a mixture of experts with sliding-window attention is not supported")
    if cfg.is_moe and cfg.n_shared_experts > 0:  # a shared expert: Qwen2-MoE has one, Mixtral not
        hf.update(
            architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.n_experts_per_token, moe_intermediate_size=cfg.moe_d_ff or cfg.d_ff,
            shared_expert_intermediate_size=cfg.d_ff * cfg.n_shared_experts, intermediate_size=cfg.d_ff * cfg.n_shared_experts,
            norm_topk_prob=cfg.moe_norm_topk_prob, qkv_bias=cfg.attention_bias, decoder_sparse_step=1,
            mlp_only_layers=[], router_aux_loss_coef=cfg.moe_aux_loss_coef, use_sliding_window=False,
        )
    elif cfg.is_moe:
        if not cfg.moe_norm_topk_prob:
            raise LmforgeError("Mixtral always renormalizes the top-k router weights; set moe_norm_topk_prob: true")
        hf.update(
            architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.n_experts_per_token, intermediate_size=cfg.moe_d_ff or cfg.d_ff,
            router_aux_loss_coef=cfg.moe_aux_loss_coef, sliding_window=None,
        )
    if cfg.is_moe:
        hf["lmforge"] = {k: getattr(cfg, k) for k in MOE_FIELDS}
    return hf


def read_hf_config(folder: Path) -> Config:
    path = folder / "config.json"
    if not path.exists():
        raise LmforgeError(f"no config.json in {folder}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise LmforgeError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    cfg = config_from_hf(hf, str(path))
    sampling = read_generation_config(folder)
    if sampling:
        cfg.extra["sampling"] = sampling
    return cfg


def read_generation_config(folder: Path) -> dict:
    """The sampling a model folder recommends (generation_config.json: temperature, top_k, top_p,
    min_p, repetition_penalty); {} when absent, unreadable, or when it asks for greedy decoding."""
    path = folder / "generation_config.json"
    try:
        gen = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        print(f"warning: {path} is not valid JSON; using lmforge's sampling defaults")
        return {}
    if not isinstance(gen, dict) or gen.get("do_sample") is False:
        return {}
    out = {}
    for key, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("min_p", float), ("repetition_penalty", float)):
        if isinstance(gen.get(key), (int, float)) and not isinstance(gen.get(key), bool):
            out[key] = kind(gen[key])
    return out


def iter_hf_tensors(folder: Path):
    """(name, tensor) pairs from model.safetensors, a sharded index, or pytorch_model.bin.

    safetensors are memory-mapped: a tensor is read only when converted, one at a time.
    """
    from safetensors import safe_open

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists() or index.exists():
        files = [single] if single.exists() else sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        for f in files:
            if not f.exists():
                raise LmforgeError(f"missing weight shard {f}")
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for key in sf.keys():
                        yield key, sf.get_tensor(key)
            except LmforgeError:
                raise
            except Exception as e:
                raise LmforgeError(f"cannot read {f}: truncated or corrupt ({e})") from None
        return
    binf = folder / "pytorch_model.bin"
    if binf.exists():
        yield from torch.load(binf, map_location="cpu", weights_only=True, mmap=True).items()
        return
    raise LmforgeError(f"no weights in {folder} (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None, extra_files: dict | None = None) -> Path:
    """Write config.json, model.safetensors (tied head omitted, as HF does) and tokenizer files."""
    from safetensors.torch import save_file

    from lmforge.loading.state_maps import is_vlm, tensors_to_save

    if is_vlm(model):  # Idefics3 / SmolVLM: the folder it came from, with these weights
        from lmforge.loading.vlm_files import save_vlm

        return save_vlm(model, tokenizer, out_dir, dtype)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: Config = model.cfg
    state = tensors_to_save(model, dtype, "lm_head.weight" if cfg.tie_embeddings else None)
    if cfg.is_moe:
        from lmforge.moe import lmforge_state_to_hf  # Mixtral / Qwen2-MoE expert keys

        state = lmforge_state_to_hf(state, cfg)
    if cfg.extra.get("model_type") == "phi3":
        state = join_fused(state)
    if cfg.learned_positions:
        state = lmforge_state_to_gpt2(state)  # both in lmforge.loading.state_maps
    hf = config_to_hf(cfg)
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).replace("torch.", "")
    if tokenizer is not None:
        for key, tid in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id), ("pad_token_id", tokenizer.pad_id)):
            if tid is not None:
                hf[key] = tid
    _atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    return out
