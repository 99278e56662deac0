"""The model: a `Config` and a decoder-only transformer of the LLaMA family.

Token embedding -> N x [RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP (or a Mixture-of-Experts MLP) -> residual] -> RMSNorm -> output head.

Module names follow Hugging Face's Llama (`model.layers.0.self_attn.q_proj`, ...), so a state
dict is an HF state dict, PEFT adapter keys line up, and the parity test can compare logits
with `transformers` on the same weights. Everything else in lmforge imports this file.

The KV cache is preallocated per layer with one length per row: a forward call appends
`n_new[b]` tokens to row `b` at that row's own position, so batched prompts of unequal length
and continuous batching (rows joining and leaving) need no re-padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 49152
    d_model: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"type": "linear"|"llama3"|"dynamic", "factor": ..., ...} as in HF configs.
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    # Sliding-window attention: a query sees its last `sliding_window` positions (itself
    # included), as in Mistral. `layer_types` (HF's words: "sliding_attention" or
    # "full_attention" per layer) mixes windowed and full layers; unset, every layer slides
    # when a window is set.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attention_bias: bool = False  # Qwen2-style q/k/v biases
    qk_norm: bool = False  # Qwen3/OLMo2-style RMSNorm of each query and key head before RoPE
    # Gemma-style layers. activation: the gated MLP's ("silu": SwiGLU; "gelu_tanh": GeGLU).
    activation: str = "silu"
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), weights stored around 0
    sandwich_norms: bool = False  # attention and MLP outputs normed too (pre and post norms)
    post_norms: bool = False  # OLMo 2: only the attention and MLP outputs are normed, not their inputs
    qk_norm_whole: bool = False  # OLMo 2: the q/k norms span all heads together, not each head
    embed_scale: bool = False  # embeddings times sqrt(d_model)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers (no scaling there)
    rope_layers: list[bool] | None = None  # SmolLM3: which layers rotate q/k (the others: no positions, "NoPE")
    # GPT-2-style layers: LayerNorm (with bias) instead of RMSNorm, learned absolute positions
    # instead of RoPE, a plain (ungated) MLP, a bias on the attention output.
    norm_kind: str = "rms"  # "rms" | "layer"
    learned_positions: bool = False
    gated_mlp: bool = True
    attn_out_bias: bool = False
    mlp_bias: bool = False
    # Mixture of Experts: n_experts == 0 means a dense SwiGLU MLP in every layer.
    n_experts: int = 0
    n_experts_per_token: int = 2
    moe_d_ff: int | None = None  # expert hidden size (default d_ff)
    n_shared_experts: int = 0
    moe_capacity_factor: float = 0.0  # 0 = no token dropping
    moe_aux_loss_coef: float = 0.01
    moe_norm_topk_prob: bool = True  # renormalize the top-k router weights (Mixtral: yes)
    # DeepSeek's MoE: the first layers keep a dense MLP; the picked weights are scaled; the shared
    # experts (their total width `moe_shared_d_ff`, default d_ff * n_shared_experts) have no gate;
    # `moe_groups` (n_group, topk_group): experts are picked only from the best groups
    moe_first_dense: int = 0
    moe_routed_scale: float = 1.0
    moe_shared_d_ff: int | None = None
    moe_shared_gate: bool = True
    moe_groups: tuple[int, int] | None = None
    # DeepSeek-V2's multi-head latent attention (MLA), on when `kv_lora_rank` is set: keys and
    # values are expanded from a `kv_lora_rank`-wide latent, queries from the input or from a
    # `q_lora_rank` latent; each query/key head is qk_nope_head_dim wide plus qk_rope_head_dim
    # that RoPE turns (in adjacent pairs, one rotated key shared by every head), each value
    # head v_head_dim. head_dim is then the query/key width.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int | None = None
    # ids the engine and trainer need; the tokenizer is the source of truth when present.
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. source model id)

    def __post_init__(self):
        if self.kv_lora_rank:
            self.head_dim, self.n_kv_heads = self.qk_nope_head_dim + self.qk_rope_head_dim, self.n_heads
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def rope_dim(self) -> int:
        """How many of a head's dimensions RoPE turns (all, but MLA's rope part)."""
        return self.qk_rope_head_dim if self.kv_lora_rank else self.head_dim

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def rope_kind(self) -> str | None:
        """The RoPE scaling scheme ("linear", "llama3", "longrope", "freq_factors" (a GGUF's
        per-frequency divisors when they fit no HF scheme); None for plain RoPE)."""
        sc = self.rope_scaling or {}
        kind = sc.get("rope_type", sc.get("type"))
        return None if kind == "default" else kind

    def uses_rope(self, layer: int) -> bool:
        if self.learned_positions:
            return False
        return self.rope_layers is None or bool(self.rope_layers[layer])

    def window(self, layer: int) -> int | None:
        """The attention window of `layer` (None: it sees every earlier position)."""
        if not self.sliding_window:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return int(self.sliding_window)
        return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma: (1 + w), multiplied in fp32 before the cast back
            return (x * (1.0 + self.weight.float())).to(dtype)
        # Llama: cast back before the weight (parity in bf16)
        return self.weight * x.to(dtype)


def norm(cfg: Config, dim: int | None = None) -> nn.Module:
    if cfg.norm_kind == "layer":  # GPT-2
        return nn.LayerNorm(dim or cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(dim or cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if not cap else torch.tanh(x / cap) * cap


def rope_inv_freq(cfg: Config, long: bool = False) -> torch.Tensor:
    """Inverse frequencies for rotate-half RoPE, with the scaling schemes HF configs use.
    `long`: LongRoPE's factors for sequences past the original context (else its short ones)."""
    d = cfg.rope_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc, kind = cfg.rope_scaling or {}, cfg.rope_kind
    if kind == "longrope":  # Phi-3: one rescaling factor per frequency
        ext = torch.tensor(sc["long_factor"] if long else sc["short_factor"], dtype=torch.float32)
        return 1.0 / (ext * cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor: each frequency's divisor, as stored
        return inv_freq / torch.tensor(sc["factors"], dtype=torch.float32)
    if kind == "llama3":
        factor = sc["factor"]
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / sc["factor"]
    elif kind == "yarn":
        inv_freq = _yarn(inv_freq, sc, cfg)
    elif kind is not None:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3, longrope, yarn, freq_factors)")
    return inv_freq


def _yarn(inv_freq: torch.Tensor, sc: dict, cfg: Config) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than `beta_slow` times over the original context are
    divided by `factor` (interpolated), those that turn more than `beta_fast` times are kept,
    and a linear ramp over the dimensions blends the two between."""
    d, factor = cfg.rope_dim, sc["factor"]
    original = sc.get("original_max_position_embeddings") or cfg.max_seq_len

    def dim_of(turns):  # the dimension whose wavelength fits `turns` times into the original context
        return d * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = dim_of(sc.get("beta_fast") or 32), dim_of(sc.get("beta_slow") or 1)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(cfg: Config) -> float:
    """The scale of cos and sin (so of q.k by its square): LongRoPE's sqrt(1 + ln(s) / ln(original
    context)), s = the context's stretch; YaRN's mscale (DeepSeek's: the ratio of two); 1 for
    every other scheme."""
    sc = cfg.rope_scaling or {}
    if cfg.rope_kind in ("longrope", "yarn") and sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    if cfg.rope_kind == "yarn":
        if sc.get("mscale") and sc.get("mscale_all_dim"):
            return _yarn_mscale(sc["factor"], sc["mscale"]) / _yarn_mscale(sc["factor"], sc["mscale_all_dim"])
        return _yarn_mscale(sc["factor"])
    if cfg.rope_kind != "longrope":
        return 1.0
    original = sc["original_max_position_embeddings"]
    stretch = sc.get("factor") or cfg.max_seq_len / original
    return 1.0 if stretch <= 1.0 else math.sqrt(1 + math.log(stretch) / math.log(original))


def local_inv_freq(cfg: Config) -> torch.Tensor:
    """The sliding layers' inverse frequencies when they have their own base (Gemma 3)."""
    import dataclasses

    return rope_inv_freq(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [B, T, head_dim] for integer positions [B, T]; computed in fp32."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [B, T, D]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class KVCache:
    """Preallocated keys/values for every layer, one fill length per row.

    Buffers are [B, n_kv_heads, max_len + 1, head_dim]; the extra last slot is scratch where
    padding tokens write, so they never land on a slot a real token will read.
    """

    def __init__(self, cfg: Config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_heads, max_len + 1, cfg.head_dim)
        vshape = shape[:-1] + (cfg.value_dim,)  # (MLA's values are narrower than its keys)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(vshape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.batch_size = batch_size

    def copy_rows(self, src: list[int], dst: list[int], upto: int | None = None) -> None:
        """Row dst[i] becomes a copy of row src[i] (a shared prompt prefilled once); `upto`: only
        its first positions (what the source holds), not the whole buffer."""
        s = torch.as_tensor(src, device=self.lengths.device)
        d = torch.as_tensor(dst, device=self.lengths.device)
        for k, v in zip(self.k, self.v):
            k[d, :, :upto] = k[s, :, :upto]
            v[d, :, :upto] = v[s, :, :upto]
        self.lengths[d] = self.lengths[s]

    def reset(self, rows=None) -> None:
        """Forget the contents of some rows (all by default); the buffers stay allocated."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, device=self.lengths.device)] = 0


def apply_rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ... as DeepSeek's checkpoints turn them
    (`apply_rope` turns the halves); cos/sin as `rope_cos_sin` makes them."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.rope = cfg.uses_rope(layer)
        hd = cfg.head_dim
        if cfg.kv_lora_rank:
            self._latent_projections(cfg)
        else:
            self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.attention_bias)
            self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
            self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.value_dim, cfg.d_model, bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            self.q_norm = norm(cfg, hd * (cfg.n_heads if cfg.qk_norm_whole else 1))
            self.k_norm = norm(cfg, hd * (cfg.n_kv_heads if cfg.qk_norm_whole else 1))

    def _latent_projections(self, cfg: Config) -> None:
        """MLA's (DeepSeek-V2's names): the latents' norms use DeepSeek's fixed epsilon."""
        H, hd = cfg.n_heads, cfg.head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * hd, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, H * hd, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.value_dim), bias=False)

    def _latent_qkv(self, x, cos, sin):
        """MLA's queries, keys and values, every head's [B, H, T, *]: keys and values expanded
        from the latent, one turned key part shared by the heads."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, nope, rope = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if cfg.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, cfg.head_dim).transpose(1, 2).split([nope, rope], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], -1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, H, nope + cfg.value_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, cfg.value_dim], -1)
        k_pe = apply_rope_pairs(k_pe[:, None], cos, sin).expand(B, H, T, rope)
        return torch.cat([q_nope, apply_rope_pairs(q_pe, cos, sin)], -1), torch.cat([k_nope, k_pe], -1), v

    def _qkv(self, x, cos, sin):
        cfg = self.cfg
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if cfg.qk_norm and cfg.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm and not cfg.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def qkv(self, x, cos, sin):
        """Queries [B, H, T, D] and keys and values [B, KV, T, D], positions applied (what the
        cache keeps); `lmforge.inspect.attention` recomputes the scores from them."""
        return self._latent_qkv(x, cos, sin) if self.cfg.kv_lora_rank else self._qkv(x, cos, sin)

    @property
    def scale(self) -> float:
        """The scores' scale: 1/sqrt(head width, or Gemma's query_pre_attn_scalar); MLA with YaRN
        also folds the square of DeepSeek's `mscale_all_dim` into it, over every dimension."""
        cfg = self.cfg
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        sc = cfg.rope_scaling or {}
        if cfg.kv_lora_rank and cfg.rope_kind == "yarn" and sc.get("mscale_all_dim"):
            scale *= _yarn_mscale(sc["factor"], sc["mscale_all_dim"]) ** 2
        return scale

    def forward(self, x, cos, sin, mask, layer_cache=None):
        """x [B, T, C]; mask: bool [B, 1, T, S] (True = may attend) or None for plain causal."""
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv(x, cos, sin)
        if layer_cache is not None:
            k, v = layer_cache(k, v)
        groups = cfg.n_heads // cfg.n_kv_heads
        if cfg.attn_logit_softcap:  # soft-capped scores: SDPA cannot, so the attention is written out
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            s = softcap(q @ k.transpose(-1, -2) * self.scale, cfg.attn_logit_softcap)
            if mask is None and T > 1:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            y = s.float().softmax(-1).to(q.dtype) @ v
        else:
            # grouped-query attention without copying K/V once per query head
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
                                               enable_gqa=groups > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.value_dim))


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu, GeGLU with gelu_tanh. Ungated
    (GPT-2): down(act(up(x)))."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, activation: str = "silu", gated: bool = True):
        super().__init__()
        if gated:
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act, self.gated = ACTIVATIONS[activation], gated

    def forward(self, x):
        if not self.gated:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(cfg: Config, layer: int = 0) -> nn.Module:
    """The feed-forward block a layer gets: dense SwiGLU, or routed experts when configured
    (past DeepSeek's first dense layers)."""
    if cfg.is_moe and layer >= cfg.moe_first_dense:
        from lmforge.moe import MoE  # the MoE block lives beside the trainer's routing logic

        return MoE(cfg)
    return MLP(cfg.d_model, cfg.d_ff, cfg.mlp_bias, cfg.activation, cfg.gated_mlp)


class Block(nn.Module):
    # The trainer compiles each compile unit on its own ("regional" compilation: one compile is
    # reused by every layer, so compile time does not grow with depth) and FSDP2 shards by them.
    compile_unit = True

    def __init__(self, cfg: Config, layer: int = 0):
        super().__init__()
        if not cfg.post_norms:
            self.input_layernorm = norm(cfg)
        self.self_attn = Attention(cfg, layer)
        # LLaMA: the norm before the MLP. With sandwich norms (Gemma) HF's same name is the norm
        # of the attention's output, and the MLP gets a norm on each side.
        self.post_attention_layernorm = norm(cfg)
        self.sandwich, self.post = cfg.sandwich_norms, cfg.post_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm(cfg)
        if self.sandwich or self.post:
            self.post_feedforward_layernorm = norm(cfg)
        self.mlp = make_mlp(cfg, layer)

    def forward(self, x, cos, sin, mask, layer_cache=None):
        if self.post:  # OLMo 2
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, layer_cache))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class NextTokenLoss(nn.Module):
    """Mean cross-entropy of the output head over `targets` (-100 = ignored), in fp32.

    A module of its own (no weights, so no state-dict keys) so the trainer can compile it as
    one region: the fp32 upcast fuses into the log-softmax and the fp32 [tokens, vocab] logits
    are never written out, which is most of the loss's cost at a 32k-50k vocabulary.
    """

    compile_unit = True

    def forward(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None = None) -> torch.Tensor:
        logits = softcap(F.linear(h, weight), cap)
        total = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=-100, reduction="sum")
        return total / (targets != -100).sum().clamp(min=1)  # no target at all: 0, not nan


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.d_model),
                layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers)),
                norm=norm(cfg),
            )
        )
        if cfg.learned_positions:  # GPT-2: a learned vector per position, added to the tokens'
            self.model.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.next_token_loss = NextTokenLoss()

    # -- construction -------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Fresh weights for pretraining: normal(0, init_std), output projections scaled by depth."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                is_norm = name.endswith("norm.weight") or "layernorm" in name
                nn.init.ones_(p) if is_norm and not self.cfg.norm_unit_offset else nn.init.zeros_(p)
                continue
            s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)
        return self

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final-norm hidden states: the output head, soft-capped where the family
        caps (Gemma 2). Every caller that runs the head on hidden states goes through here."""
        return softcap(self.lm_head(h), self.cfg.final_logit_softcap)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.model.embed_tokens.weight  # always dense (a quantized head's weight is computed)
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, device=p.device, dtype=dtype or p.dtype)

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `positions`; LongRoPE switches to its long factors once a position passes
        the original context (as transformers does, for the whole call) and scales both."""
        f = rope_attention_factor(self.cfg)
        if self.cfg.rope_kind != "longrope" and f == 1.0:
            return rope_cos_sin(self.inv_freq, positions, dtype)
        long = self.cfg.rope_kind == "longrope" and int(positions.max()) + 1 > self.cfg.rope_scaling["original_max_position_embeddings"]
        inv = rope_inv_freq(self.cfg, long).to(self.inv_freq.device) if long else self.inv_freq
        cos, sin = rope_cos_sin(inv, positions, torch.float32)
        return (cos * f).to(dtype), (sin * f).to(dtype)

    def _windowed_mask(self, mask, positions, cache, S: int):
        """`mask` (None = plain causal) narrowed to each query's window: key k is visible from
        query q only when pos(q) - pos(k) < sliding_window. None when no layer has a window."""
        if not self.cfg.sliding_window:
            return None
        w = int(self.cfg.sliding_window)
        if cache is not None:  # cache slots are positions
            key_pos = torch.arange(S, device=positions.device)
            near = key_pos[None, None, :] > positions[:, :, None] - w  # [B, T, S]
        else:
            near = (positions[:, :, None] - positions[:, None, :]) < w  # [B, T, T]
        if mask is None:
            T = positions.shape[1]
            mask = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()[None, None]
        return mask & near[:, None]

    # -- forward --------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        n_new: torch.Tensor | None = None,
        hidden_only: bool = False,
        collect_hidden: list | None = None,
        targets: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T].

        Without a cache: `positions` default to 0..T-1 per row; `attention_mask` [B, T] (1 =
        real token) hides padding keys, e.g. for a left-padded batch; a [B, T, T] boolean
        `attention_mask` is used as is (packed sequences: block-diagonal causal).
        With a cache: row b of `idx` is appended to cache row `rows[b]` (default b); only its
        first `n_new[b]` tokens are real (default T, right padding beyond), placed at positions
        lengths[row] + t. The cache lengths advance by n_new.
        `hidden_only` returns the final-norm hidden states instead of logits (for chunked loss).
        `collect_hidden`, a list, receives the residual stream after the embedding and after
        every layer (n_layers + 1 tensors, before the final norm) for inspection.
        `targets` [B, T] (next-token ids, -100 = no loss) returns the mean cross-entropy instead
        of logits: the loss is computed inside forward so DDP, FSDP and the compiler see it.
        `inputs_embeds` [B, T, C], when given, stands in for the token embeddings of `idx` (a
        vision-language model puts image features at its image tokens, `lmforge.vision.vlm`).
        """
        B, T = idx.shape
        x = self.model.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        if self.cfg.embed_scale:  # Gemma: sqrt(d_model), rounded to the activations' dtype first
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)
        mask, S = None, T
        layer_caches = [None] * self.cfg.n_layers
        if cache is not None:
            dev = idx.device
            rows = torch.arange(B, device=dev) if rows is None else torch.as_tensor(rows, device=dev)
            n_new = torch.full((B,), T, device=dev) if n_new is None else torch.as_tensor(n_new, device=dev)
            start = cache.lengths[rows]  # [B]
            if bool((start + n_new > cache.max_len).any()):
                raise ValueError(f"KV cache full: {int((start + n_new).max())} tokens > capacity {cache.max_len}")
            t = torch.arange(T, device=dev)
            positions = start[:, None] + t[None, :] if positions is None else positions
            real = t[None, :] < n_new[:, None]  # [B, T]
            slots = torch.where(real, start[:, None] + t[None, :], cache.max_len)  # padding -> scratch slot
            S = int((start + n_new).max())
            key_pos = torch.arange(S, device=dev)
            # query t of row b sees keys 0..start[b]+t (its own prefix, causal)
            mask = key_pos[None, None, :] <= (start[:, None, None] + t[None, :, None])
            mask = mask[:, None]  # [B, 1, T, S]
            row_idx = rows[:, None].expand(B, T)
            # rows r0..r0+B-1 (the usual case) are read as a view of the cache, not gathered:
            # a gather copies every cached key and value of every layer at every step
            r0 = int(rows[0])
            span = slice(r0, r0 + B) if bool((rows == torch.arange(r0, r0 + B, device=dev)).all()) else None

            def make_layer_cache(i):
                kb, vb = cache.k[i], cache.v[i]

                def update(k, v):  # k, v: [B, H, T, D]
                    kb[row_idx, :, slots] = k.transpose(1, 2).to(kb.dtype)
                    vb[row_idx, :, slots] = v.transpose(1, 2).to(vb.dtype)
                    if span is not None:
                        return kb[span, :, :S].to(k.dtype), vb[span, :, :S].to(v.dtype)
                    return kb[rows, :, :S].to(k.dtype), vb[rows, :, :S].to(v.dtype)

                return update

            layer_caches = [make_layer_cache(i) for i in range(self.cfg.n_layers)]
        else:
            if positions is None:
                positions = torch.arange(T, device=idx.device)[None, :].expand(B, T)
            if attention_mask is not None and attention_mask.dim() == 3:
                # a full [B, T, T] mask (True = query t may see key s), e.g. block-diagonal causal
                # for packed sequences; the caller makes sure every query sees at least itself
                mask = attention_mask.bool()[:, None]
            elif attention_mask is not None:
                causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
                mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
                # a query on a padding position would see no key: let it see itself (ignored anyway)
                mask = mask | torch.eye(T, dtype=torch.bool, device=idx.device)[None, None]
        if self.cfg.learned_positions:
            x = x + self.model.embed_positions(positions)
        rope = {None: self._rope(positions, x.dtype)}
        if self.cfg.rope_local_theta:  # sliding layers turn at their own base
            rope["local"] = rope_cos_sin(local_inv_freq(self.cfg).to(self.inv_freq.device), positions, x.dtype)
        windowed = self._windowed_mask(mask, positions, cache, S)
        if collect_hidden is not None:
            collect_hidden.append(x)
        for i, (layer, lc) in enumerate(zip(self.model.layers, layer_caches)):
            w = self.cfg.window(i)
            cos, sin = rope["local" if w and "local" in rope else None]
            x = layer(x, cos, sin, windowed if w else mask, lc)
            if collect_hidden is not None:
                collect_hidden.append(x)
        if cache is not None:
            cache.lengths[rows] = cache.lengths[rows] + n_new
        x = self.model.norm(x)
        if targets is not None:
            return self.next_token_loss(x, self.lm_head.weight, targets, self.cfg.final_logit_softcap)
        return x if hidden_only else self.head(x)


def aux_losses(model: nn.Module) -> torch.Tensor | float:
    """Sum of auxiliary losses (MoE load balancing) left by the last forward; 0 for dense models."""
    total = 0.0
    for m in model.modules():
        loss = getattr(m, "aux_loss", None)
        if loss is not None:
            total = total + loss
    return total
