"""llama.cpp's layout of each family in a GGUF file, both ways: which architecture a `Config` is,
which llama.cpp tensor holds which of lmforge's (HF-named) weights, and the value conventions
llama.cpp's own converter (convert_hf_to_gguf.py) uses:

- `llama`, `smollm3`: q/k rows permuted for llama.cpp's interleaved RoPE (the others rotate halves,
  as HF does).
- `gemma2`, `gemma3`: every norm weight is stored as (1 + w), the scale llama.cpp multiplies by.
- `phi3`: q|k|v fused in `attn_qkv`, gate|up fused in `ffn_up`; `gpt2`: q|k|v (and their biases)
  fused in `attn_qkv`.
- `qwen3moe`, `qwen2moe`, and `llama` with experts (Mixtral): the experts of a layer stacked into
  one 3-D tensor per projection; Qwen2-MoE's shared expert and its gate as `*_shexp`.
- Gemma's and OLMo 2's sandwich norms have names of their own (`post_attention_norm`,
  `post_ffw_norm`; Gemma's norm before the MLP is `ffn_norm`).

Both the writer (lmforge/export/gguf.py) and the reader (gguf_file.py) use these tables.
"""
from __future__ import annotations

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.model import Config

ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "gpt2", "smollm3", "qwen3moe", "qwen2moe")
PERMUTED = ("llama", "smollm3")  # llama.cpp's "normal" RoPE: adjacent pairs, not halves
GEMMA = ("gemma2", "gemma3")
# the layers llama.cpp's sliding-window pattern makes local when the file names none
DEFAULT_SWA_EVERY = {"gemma2": 2, "gemma3": 6, "olmo2": 4}

_GLOBAL = {"model.embed_tokens": "token_embd", "model.embed_positions": "position_embd", "model.norm": "output_norm",
           "lm_head": "output"}
# HF module under model.layers.N -> llama.cpp tensor under blk.N
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# Gemma 2/3 and OLMo 2: HF's post_attention_layernorm norms the attention's output there
_SANDWICH = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}
# one llama.cpp tensor holding several HF modules, their rows in this order
_FUSED = {
    "phi3": {"attn_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "ffn_up": ("mlp.gate_proj", "mlp.up_proj")},
    "gpt2": {"attn_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def arch_of(cfg: Config) -> str:
    """The llama.cpp architecture a model is written as (what its features say it is)."""
    if cfg.learned_positions or cfg.norm_kind == "layer":
        return "gpt2"
    if cfg.sandwich_norms:
        return "gemma3" if cfg.qk_norm else "gemma2"
    if cfg.post_norms:
        return "olmo2"
    if cfg.rope_kind == "longrope" or (cfg.extra.get("model_type") or cfg.extra.get("architecture")) == "phi3":
        return "phi3"
    if cfg.rope_layers is not None:
        return "smollm3"
    if cfg.is_moe:  # Mixtral is llama.cpp's llama with experts
        return "qwen3moe" if cfg.qk_norm else "qwen2moe" if cfg.n_shared_experts or cfg.attention_bias else "llama"
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else "llama"


def smollm3_rope_layers(n_layers: int) -> list[bool] | None:
    """llama.cpp's smollm3 leaves RoPE out of every 4th layer (fixed, no key says otherwise)."""
    flags = [(i + 1) % 4 != 0 for i in range(n_layers)]
    return None if all(flags) else flags


def swa_layers(arch: str, n_layers: int, pattern) -> list[bool]:
    """Which layers slide, as llama.cpp reads `attention.sliding_window_pattern`: a list of
    flags, or every n-th layer global (n given, or the family's default)."""
    if isinstance(pattern, list):
        return [bool(p) for p in pattern][:n_layers]
    every = int(pattern) if pattern is not None else DEFAULT_SWA_EVERY.get(arch, 0)
    return [every == 0 or i % every < every - 1 for i in range(n_layers)]


def _layer_table(arch: str) -> dict[str, str]:
    t = dict(_LAYER, **(_SANDWICH if arch in GEMMA + ("olmo2",) else {}))
    for fused, parts in _FUSED.get(arch, {}).items():
        t.update({p: fused for p in parts})
    return t


def gguf_name(hf: str, arch: str) -> str | None:
    """The llama.cpp tensor that holds (all or part of) the HF-named weight `hf`."""
    stem, _, suffix = hf.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return None
    i, mod = parts[2], ".".join(parts[3:])
    if parts[3:5] == ["mlp", "experts"] and len(parts) == 7:  # model.layers.i.mlp.experts.e.proj
        ours = {v: k for k, v in _EXPERTS.items()}
        return f"blk.{i}.{ours[parts[6]]}.{suffix}" if parts[6] in ours else None
    table = _layer_table(arch)
    return f"blk.{i}.{table[mod]}.{suffix}" if mod in table else None


def hf_pieces(name: str, arch: str, cfg: Config) -> list[tuple[str, int]] | None:
    """The HF-named weights a llama.cpp tensor holds, each with its number of rows, in order
    (one piece for a plain tensor). None for a tensor lmforge has no place for."""
    stem, _, suffix = name.rpartition(".")
    ours = {v: k for k, v in _GLOBAL.items()}
    if stem in ours:
        return [(f"{ours[stem]}.{suffix}", 0)]
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    p, g = f"model.layers.{parts[1]}.", parts[2]
    if g in _FUSED.get(arch, {}):
        rows = {"self_attn.q_proj": cfg.n_heads * cfg.head_dim, "self_attn.k_proj": cfg.n_kv_heads * cfg.head_dim,
                "self_attn.v_proj": cfg.n_kv_heads * cfg.head_dim, "mlp.gate_proj": cfg.d_ff, "mlp.up_proj": cfg.d_ff}
        return [(f"{p}{m}.{suffix}", rows[m]) for m in _FUSED[arch][g]]
    if g in _EXPERTS:
        return [(f"{p}mlp.experts.{e}.{_EXPERTS[g]}.{suffix}", 0) for e in range(cfg.n_experts)]
    table = {v: k for k, v in _layer_table(arch).items() if v not in _FUSED.get(arch, {})}
    return [(f"{p}{table[g]}.{suffix}", 0)] if g in table else None


def split_rows(x, pieces: list[tuple[str, int]]) -> dict:
    """A fused tensor's rows (ndarray rows, or a 3-D stack of experts) as its pieces."""
    if len(pieces) == 1:
        return {pieces[0][0]: x}
    if all(n == 0 for _, n in pieces):  # experts: [E, rows, in] values, or E * rows rows of blocks
        parts = list(x) if x.ndim == 3 else np.split(x, len(pieces))
        return {hf: part for (hf, _), part in zip(pieces, parts)}
    if sum(n for _, n in pieces) != x.shape[0]:
        raise LmforgeError(f"a fused tensor has {x.shape[0]} rows, its parts {sum(n for _, n in pieces)}")
    return {hf: part for (hf, _), part in zip(pieces, np.split(x, np.cumsum([n for _, n in pieces])[:-1]))}


def join_pieces(arrays: list[np.ndarray], pieces: list[tuple[str, int]]) -> np.ndarray:
    """The inverse of `split_rows`: experts stacked (a 3-D tensor), fused rows concatenated."""
    if len(arrays) == 1:
        return arrays[0]
    return np.stack(arrays) if all(n == 0 for _, n in pieces) else np.concatenate(arrays)


def shifts_norm(arch: str, hf: str) -> bool:
    """Whether the file holds this weight as (1 + w): Gemma's norms, as llama.cpp multiplies."""
    return arch in GEMMA and hf.endswith("norm.weight")


def attention_scale_fold(cfg: Config, arch: str) -> float:
    """Gemma: llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(d_model / n_heads) in the
    27B models (which it knows by their layer count), never by `query_pre_attn_scalar`. The
    ratio to the model's own scale is folded into the query weights (1.0: nothing to fold)."""
    if arch not in GEMMA:
        return 1.0
    theirs = llama_cpp_query_scalar(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, arch)
    return float(theirs / (cfg.query_pre_attn_scalar or cfg.head_dim)) ** 0.5


def llama_cpp_query_scalar(n_layers: int, d_model: int, n_heads: int, head_dim: int, arch: str) -> float:
    big = {"gemma2": 46, "gemma3": 62}[arch]  # the 27B models' depth
    return d_model / n_heads if n_layers == big else float(head_dim)


def rope_freq_factors(cfg: Config) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor for a config: each frequency's divisor (base / scaled)."""
    import dataclasses

    from lmforge.model import rope_inv_freq

    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    return (plain / rope_inv_freq(cfg)).numpy().astype(np.float32)


def rope_scaling_from_freqs(factors, cfg: Config) -> dict | None:
    """A `rope_freqs` tensor (llama.cpp's converter writes one for Llama 3.1's "llama3" RoPE) as
    the HF scheme that gives the same divisors: none, "linear", or "llama3" fitted from the
    frequencies between its two bands; the divisors themselves ("freq_factors") when none fits."""
    import dataclasses

    f = np.asarray(factors, dtype=np.float64)
    big = float(f.max())
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    if np.allclose(f, big, rtol=1e-6, atol=0):
        return {"rope_type": "linear", "factor": big}
    generic = {"rope_type": "freq_factors", "factors": [float(x) for x in f]}
    from lmforge.model import rope_inv_freq

    wavelen = 2 * np.pi / rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)).double().numpy()
    medium = (f > 1 + 1e-6) & (f < big * (1 - 1e-6))
    if medium.sum() < 2:
        return generic
    # llama3 blends scaled and unscaled frequencies by smooth = (old / wavelen - low) / (high - low),
    # a line in 1 / wavelen; only ratios to the original context count, so low is taken as 1 (as
    # Llama 3.1 and 3.2 have it) and the line gives high and the original context
    smooth = (1 / f[medium] - 1 / big) / (1 - 1 / big)
    slope, icept = np.polyfit(1 / wavelen[medium], smooth, 1)
    # the file's float32 factors put the fit a hair off the round numbers configs use (4 -> 3.999999):
    # the roundest high_freq_factor that gives the same divisors is taken
    for digits in (3, 6):
        fit = {"rope_type": "llama3", "factor": big, "low_freq_factor": 1.0, "high_freq_factor": round(1 - 1 / float(icept), digits),
               "original_max_position_embeddings": int(round(-slope / icept))}
        if np.allclose(rope_freq_factors(dataclasses.replace(cfg, rope_scaling=fit)), f, rtol=1e-5, atol=0):
            return fit
    return generic
