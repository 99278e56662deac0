"""The low-overhead decoder for one sequence: `FastDecoder(model)`.

Same math as `Transformer.forward`, arranged for a CPU at batch 1 where per-op overhead is a
large part of a 135M model's step (a few microseconds per dispatched op, ~450+ ops a token):

- q/k/v and gate/up are fused into one matmul each, built from the model's own weights when
  the decoder is made; the model's modules and state-dict keys are untouched (PEFT and the
  parity tests see the model as it was). Quantized layers are fused exactly (per-row scales).
- q/k rows are reordered per head into llama.cpp's interleaved RoPE layout, so rotary
  embedding is one in-place complex multiply on the fused q|k output. Scores q.k are the same
  because q and k get the same reordering; the cache holds keys in that order.
- A static KV cache [layers, 2, kv_heads, capacity, head_dim] preallocated and reused across
  calls; cache writes are one copy per layer; the position is a Python int.
- Grouped-query attention without repeating K/V (heads grouped in a batched matmul).
- Only the last position goes through the output head during prefill.

It is a backend of the one generation loop (`lmforge.engine.generate_tokens`: `begin`,
`prefill`, `step`), which picks it for a single prompt.
"""
from __future__ import annotations

import math
import os
import weakref
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.fast.ops import qk_norm_
from lmforge.native.linear import BlockLinear, fuse_block_linears
from lmforge.quant import QuantLinear, fuse_quant_linears


def interleave_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns HF's rotate-half layout into adjacent (re, im) pairs per head."""
    half = head_dim // 2
    per_head = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


class _Linear:
    """A plain or quantized linear map, called as f(x)."""

    __slots__ = ("w", "b", "q", "pre", "dtype")

    def __init__(self, w=None, b=None, q: QuantLinear | None = None, dtype=None):
        self.w, self.b, self.q, self.dtype = w, b, q, dtype
        self.pre = None if q is None else q.inv_smooth  # input smoothing of a quantized layer

    def fold_into(self, norm_weight: torch.Tensor) -> torch.Tensor:
        """Move the input smoothing into the RMSNorm weight that precedes this layer."""
        if self.pre is None:
            return norm_weight
        folded = (norm_weight.float() * self.pre).to(norm_weight.dtype)
        self.pre = None
        return folded

    def __call__(self, x):
        if self.q is None:
            return F.linear(x, self.w, self.b)
        x = x.float()
        if self.pre is not None:
            x = x * self.pre
        y = self.q.forward_raw(x)
        return y if self.dtype == torch.float32 else y.to(self.dtype)


class _Parts:
    """Layers that read one input but cannot be fused (GGUF blocks of different types, as a
    K-quant mix holds): each runs on its own and the outputs are joined."""

    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = parts

    def fold_into(self, norm_weight):
        return norm_weight

    def __call__(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


class _LowRank:
    """A layer (or fused layers) plus LoRA updates kept apart from its weights, so GGUF blocks
    stay as the file has them: y = base(x) + (x A^T) B^T, where A stacks the adapters' A
    matrices and B holds their scaled B matrices block by block in the base's output order.
    `loras` are the model's LoRALinear modules: switching them off skips the update."""

    __slots__ = ("base", "A", "B", "loras")

    def __init__(self, base, A: torch.Tensor, B: torch.Tensor, loras: list):
        self.base, self.A, self.B, self.loras = base, A, B, loras

    def fold_into(self, norm_weight):
        return norm_weight  # the update must see the unsmoothed input, so the base keeps its own

    def __call__(self, x):
        y = self.base(x)
        if self.loras[0].disabled:
            return y
        return y + F.linear(F.linear(x.to(self.A.dtype), self.A), self.B).to(y.dtype)


def _is_lora(m) -> bool:
    return hasattr(m, "lora_A") and hasattr(m, "base_layer")


def _with_lora(mods: list[nn.Module], orders: list, build):
    """`build(bases, orders)` for the layers under any LoRA wrappers, plus their updates."""
    bases = [m.base_layer if _is_lora(m) else m for m in mods]
    base = build(bases, orders)
    loras = [(i, m) for i, m in enumerate(mods) if _is_lora(m) and not m.merged]
    if not loras:
        return base
    offsets = [0]
    for m in bases:
        offsets.append(offsets[-1] + m.out_features)
    A = torch.cat([m.lora_A.weight.detach().float() for _, m in loras])
    B = torch.zeros(offsets[-1], A.shape[0], device=A.device)
    r0 = 0
    for i, m in loras:
        b = m.lora_B.weight.detach().float() * m.scaling
        if orders[i] is not None:
            b = b[orders[i].to(b.device)]
        B[offsets[i]:offsets[i + 1], r0:r0 + m.r] = b
        r0 += m.r
    return _LowRank(base, A, B, [m for _, m in loras])


def _fuse(mods: list[nn.Module], orders: list, dtype):
    if any(_is_lora(m) for m in mods):
        return _with_lora(mods, orders, lambda bases, o: _fuse(bases, o, dtype))
    if all(isinstance(m, QuantLinear) for m in mods):
        return _Linear(q=fuse_quant_linears(mods, orders), dtype=dtype)
    if all(isinstance(m, BlockLinear) for m in mods):
        fused = fuse_block_linears(mods, orders)
        if fused is not None:
            return _Linear(q=fused, dtype=dtype)
    if any(isinstance(m, BlockLinear) for m in mods):
        return _Parts([_ordered(m, o, dtype) for m, o in zip(mods, orders)])
    ws, bs = [], []
    for m, o in zip(mods, orders):
        w = m.weight.detach()
        b = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        ws.append(w if o is None else w[o.to(w.device)])
        bs.append(b if o is None else b[o.to(b.device)])
    bias = torch.cat(bs) if any(m.bias is not None for m in mods) else None
    return _Linear(torch.cat(ws).contiguous(), bias)


def _ordered(m: nn.Module, order, dtype) -> _Linear:
    """One layer, output rows reordered."""
    if order is None:
        return _single(m, dtype)
    if isinstance(m, BlockLinear):
        return _Linear(q=fuse_block_linears([m], [order]), dtype=dtype)
    b = None if m.bias is None else m.bias.detach()[order]
    return _Linear(m.weight.detach()[order].contiguous(), b)


def _single(m: nn.Module, dtype) -> _Linear:
    if _is_lora(m):
        return _with_lora([m], [None], lambda bases, o: _single(bases[0], dtype))
    if isinstance(m, (QuantLinear, BlockLinear)):
        return _Linear(q=m, dtype=dtype)
    return _Linear(m.weight.detach(), None if m.bias is None else m.bias.detach())


def unsupported_config(cfg) -> str | None:
    """Which of the model's features the fast path lacks (None when it has them all); also
    what `lmforge info` says."""
    if cfg.is_moe:
        return "mixture-of-experts model"
    if cfg.kv_lora_rank:
        return "multi-head latent attention (the general engine runs it)"
    if cfg.rope_kind in ("longrope", "yarn"):
        return f"{'LongRoPE' if cfg.rope_kind == 'longrope' else 'YaRN'} scaling (the general engine runs it)"
    if cfg.post_norms or cfg.qk_norm_whole:
        return "OLMo 2-style norms (the general engine runs them)"
    if cfg.norm_kind != "rms" or cfg.learned_positions or not cfg.gated_mlp or cfg.attn_out_bias:
        return "GPT-2-style layers (the general engine runs them)"
    if (cfg.sandwich_norms or cfg.norm_unit_offset or cfg.activation != "silu" or cfg.embed_scale or cfg.attn_logit_softcap
            or cfg.final_logit_softcap or cfg.query_pre_attn_scalar):
        return "Gemma-style layers (the general engine runs them)"
    if cfg.head_dim % 2:
        return "odd head_dim"
    return None


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run this model (None when it can)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "model"):
        return "not an lmforge Transformer"
    reason = unsupported_config(cfg)
    if reason is not None:
        return reason
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"forward hooks on {name or 'the model'}"
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
            if _is_lora(m) and leaf != "lm_head" and not m.training:
                m = m.base_layer  # LoRA updates are added beside the layer (`_LowRank`)
            if type(m) not in (nn.Linear, QuantLinear, BlockLinear):
                return f"{name} is a {type(m).__name__} (adapters run on the general engine)"
    return None


def _signature(model) -> tuple:
    """Identity and in-place version of every parameter: a changed weight invalidates fusions."""
    sig = []
    for p in model.parameters():
        try:
            sig.append((id(p), p._version))
        except RuntimeError:  # inference tensors keep no version counter
            sig.append((id(p), p.data_ptr()))
    for m in model.modules():
        if isinstance(m, QuantLinear):
            sig.append(id(m._packed))
    return tuple(sig)


class FastDecoder:
    """Static-cache decoding of one sequence. `layer_ids` selects layers (a self-draft skips some)."""

    def __init__(self, model, layer_ids: list[int] | None = None, shared: "FastDecoder | None" = None):
        cfg = model.cfg
        self.cfg = cfg
        self.n_layers_total = cfg.n_layers
        emb = model.model.embed_tokens.weight
        self.device = emb.device
        self.dtype = emb.dtype
        self.embed = emb.detach()
        H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.H, self.KV, self.D = H, KV, D
        self.scale = 1.0 / math.sqrt(D)
        if shared is not None:  # a draft sharing the target's fused weights
            self.layers = [shared.layers[i] for i in layer_ids]
            self.windows = [shared.windows[i] for i in layer_ids]
            self.qk_norms = [shared.qk_norms[i] for i in layer_ids]
            self.ropes = [shared.ropes[i] for i in layer_ids]
            self.final_norm, self.head, self.inv_freq = shared.final_norm, shared.head, shared.inv_freq
        else:
            qo, ko = interleave_order(H, D), interleave_order(KV, D)
            self.layers = []
            self.windows = [cfg.window(i) for i in range(cfg.n_layers) if layer_ids is None or i in layer_ids]
            self.ropes = [cfg.uses_rope(i) for i in range(cfg.n_layers) if layer_ids is None or i in layer_ids]
            self.qk_norms = []  # per layer: (q, k) RMSNorm weights in the interleaved order, or None
            head_order = interleave_order(1, D)
            for i, blk in enumerate(model.model.layers):
                if layer_ids is not None and i not in layer_ids:
                    continue
                at, mlp = blk.self_attn, blk.mlp
                qkv = _fuse([at.q_proj, at.k_proj, at.v_proj], [qo, ko, None], self.dtype)
                gate_up = _fuse([mlp.gate_proj, mlp.up_proj], [None, None], self.dtype)
                n1 = qkv.fold_into(blk.input_layernorm.weight.detach())
                n2 = gate_up.fold_into(blk.post_attention_layernorm.weight.detach())
                self.layers.append((n1, qkv, _single(at.o_proj, self.dtype), n2, gate_up, _single(mlp.down_proj, self.dtype)))
                norms = None
                if cfg.qk_norm:
                    norms = tuple(n.weight.detach()[head_order.to(self.device)].contiguous() for n in (at.q_norm, at.k_norm))
                self.qk_norms.append(norms)
            self.head = _single(model.lm_head, self.dtype)
            self.final_norm = self.head.fold_into(model.model.norm.weight.detach())
            self.inv_freq = model.inv_freq.detach().float().to(self.device)
        self.quant = getattr(model, "quant", "none")  # a draft model loaded from a path matches it
        self.eps = cfg.norm_eps
        self.ff = cfg.d_ff
        self.kv = None  # [L, 2, KV, capacity, D]
        self.freqs = None  # complex64 [capacity, D/2]
        self.capacity = 0
        self.pos = 0
        # the token at each cached position, so a prompt that starts the same way (the
        # conversation so far in `lmforge chat`) computes only its new part (`resume`)
        self.tokens: list[int] = []
        self.reused = 0  # prompt tokens the last `resume` found in the cache
        # switching an adapter on or off changes every cached key: no reuse across the switch
        self._loras = [m for m in model.modules() if _is_lora(m)]
        self._lora_state = None
        self._capacity_wanted = 0
        self.graph = None  # the CUDA-graph stepper of the current sequence (`begin`)
        self._native = False  # the native one-call step (lmforge.native.step), built on first use

    # -- state ----------------------------------------------------------------------------
    def draft(self, layer_ids: list[int]) -> "FastDecoder":
        """A layer-skipping self-draft: these layers of this decoder, its own cache."""
        d = FastDecoder.__new__(FastDecoder)
        d.__dict__.update(self.__dict__)
        d.layers = [self.layers[i] for i in layer_ids]
        d.windows = [self.windows[i] for i in layer_ids]
        d.qk_norms = [self.qk_norms[i] for i in layer_ids]
        d.ropes = [self.ropes[i] for i in layer_ids]
        d.kv, d.freqs, d.capacity, d.pos = None, None, 0, 0
        d.tokens = []
        d._native = False
        return d

    def reset(self, capacity: int) -> None:
        """Empty the cache, growing the buffers when `capacity` exceeds them."""
        if capacity > self.capacity:
            L = len(self.layers)
            self.kv = torch.zeros(L, 2, self.KV, capacity, self.D, dtype=self.dtype, device=self.device)
            pos = torch.arange(capacity, device=self.device, dtype=torch.float32)
            ang = pos[:, None] * self.inv_freq[None, :]
            self.freqs = torch.polar(torch.ones_like(ang), ang)  # e^{i * pos * freq}
            self.capacity = capacity
        self.pos = 0
        self.tokens = []

    def resume(self, prompt: list[int], capacity: int) -> torch.Tensor:
        """Logits [1, V] after `prompt`, computing only the positions the cache does not already
        hold for it (all but the longest prefix shared with the cached tokens, and always the last
        token, whose logits start the reply). The buffers grow to `capacity`, keeping that prefix."""
        keep = 0
        state = tuple(m.disabled for m in self._loras)
        if state != self._lora_state:
            self.tokens, self._lora_state = [], state
        for a, b in zip(self.tokens[: self.pos], prompt[:-1]):
            if a != b:
                break
            keep += 1
        if capacity > self.capacity:
            old, kept = self.kv, self.tokens[:keep]
            self.reset(max(capacity, 2 * self.capacity))
            if keep:
                self.kv[:, :, :, :keep].copy_(old[:, :, :, :keep])
            self.tokens = kept
        self.pos = keep
        del self.tokens[keep:]
        self.reused = keep
        return self.forward(torch.tensor(prompt[keep:], device=self.device))

    def _record(self, p0: int, ids: torch.Tensor) -> None:
        if len(self.tokens) == p0:
            self.tokens.extend(ids.tolist())
        else:  # positions were filled elsewhere (CUDA-graph steps): nothing here is known any more
            self.tokens = []

    def rollback(self, pos: int) -> None:
        """Forget everything after `pos` tokens (rejected speculative tokens)."""
        self.pos = pos
        del self.tokens[pos:]

    # -- forward --------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append token ids [T] at the current position; fp32 logits [T, V] (or [1, V], last)."""
        T = ids.shape[0]
        p0 = self.pos
        self._record(p0, ids)
        if T == 1 and self.native_step() is not None:
            return self._native(self, int(ids[0]))
        S = p0 + T
        if S > self.capacity:
            raise ValueError(f"KV cache full: {S} tokens > capacity {self.capacity}")
        H, KV, D = self.H, self.KV, self.D
        G = H // KV
        x = F.embedding(ids, self.embed)  # [T, C]
        freqs = self.freqs[p0:S][:, None, :]  # [T, 1, D/2]
        half = self.dtype != torch.float32
        mask = windowed = None
        if T > 1:
            kpos, qpos = torch.arange(S, device=self.device), p0 + torch.arange(T, device=self.device)
            if p0 > 0:  # a chunk after a prefix: query t sees keys 0..p0+t
                mask = kpos[None, :] <= qpos[:, None]
            W = next((w for w in self.windows if w), None)  # one size per model (Config.window)
            if W:  # windowed layers: only the last W keys
                windowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W)
        for li, (n1, qkv_l, o_l, n2, gu_l, down_l) in enumerate(self.layers):
            w = self.windows[li]
            h = F.rms_norm(x, (x.shape[-1],), n1, self.eps)
            qkv = qkv_l(h)  # [T, (H + 2 KV) D]
            if self.qk_norms[li] is not None:
                qk_norm_(qkv, self.qk_norms[li], H, KV, D, self.eps)
            qk = qkv[:, : (H + KV) * D].view(T, H + KV, D // 2, 2)
            if not self.ropes[li]:
                pass  # a NoPE layer (SmolLM3): q and k carry no position
            elif half:
                qk.copy_(torch.view_as_real(torch.view_as_complex(qk.float()) * freqs))
            else:
                torch.view_as_complex(qk).mul_(freqs)
            kv = self.kv[li]
            kv[:, :, p0:S].copy_(qkv[:, H * D :].view(T, 2, KV, D).permute(1, 2, 0, 3))
            q = qkv[:, : H * D].view(T, KV, G, D)
            lo = max(0, S - w) if (w and T == 1) else 0  # one query: only its window's keys
            k, v = kv[0, :, lo:S], kv[1, :, lo:S]  # [KV, S - lo, D]
            if T == 1:
                # [KV, G, D] @ [KV, D, S] -> softmax -> @ [KV, S, D]
                s = torch.bmm(q[0], k.transpose(1, 2)).mul_(self.scale)
                y = torch.bmm(s.softmax(-1), v).reshape(1, H * D)
            else:
                qh = q.permute(1, 2, 0, 3).reshape(1, H, T, D)
                m = windowed if w else mask
                y = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=m, is_causal=m is None, enable_gqa=G > 1)
                y = y[0].permute(1, 0, 2).reshape(T, H * D)
            x = x + o_l(y)
            h = F.rms_norm(x, (x.shape[-1],), n2, self.eps)
            gu = gu_l(h)
            a = F.silu(gu[:, : self.ff]) * gu[:, self.ff :]
            x = x + down_l(a)
        self.pos = S
        if not all_logits:
            x = x[-1:]
        x = F.rms_norm(x, (x.shape[-1],), self.final_norm, self.eps)
        return self.head(x).float()

    def native_step(self):
        """The native whole-model step (`lmforge.native.step`) when every layer is GGUF blocks
        the kernels run (and LMFORGE_NATIVE_STEP is not 0); else None."""
        if self._native is False:
            from lmforge.native.step import native_step_for

            on = os.environ.get("LMFORGE_NATIVE_STEP", "1") not in ("0", "false", "off", "")
            self._native = native_step_for(self) if on else None
        return self._native

    # -- the engine's backend interface (lmforge.engine.generate_tokens) -------------------
    def begin(self, capacity: int) -> None:
        """Start a sequence of at most `capacity` tokens: per-token steps replay CUDA graphs on a
        GPU (`lmforge.fast.cuda_graph`), else run `forward`."""
        self.graph = _graph_backend(self)
        self._capacity_wanted = capacity
        if self.graph is not None:
            self.graph.begin(capacity)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        (prompt,) = prompts
        if self.graph is not None:  # the graphs' window was just emptied (`begin`)
            return self.forward(torch.tensor(prompt, device=self.device))
        return self.resume(prompt, self._capacity_wanted)

    def step(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The next logits [1, V] after `tokens` [1] (one row: `rows` is [0])."""
        if self.graph is not None:
            return self.graph.step(tokens)
        return self.forward(tokens.reshape(1))


# -- CUDA graph backend (lmforge.fast.cuda_graph) -----------------------------------------
def _graph_backend(fast: FastDecoder):
    """The GraphDecoder for `fast` on CUDA (unless LMFORGE_CUDA_GRAPHS=0 or a layer is
    quantized); None elsewhere, and the per-token steps stay on `fast.forward`."""
    if fast.device.type != "cuda":
        return None
    from lmforge.fast import cuda_graph

    return cuda_graph.graph_decoder_for(fast) if cuda_graph.wanted(fast) else None


# Decoders are cached per model (weakly: the cache never keeps a model alive) and rebuilt when a
# weight changed in place or was replaced.
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get("LMFORGE_FAST", "1") not in ("0", "false", "off", "")


def fast_decoder_for(model) -> FastDecoder | None:
    """The cached FastDecoder of `model`, built on first use; None when the fast path is off
    (LMFORGE_FAST=0) or cannot run this model (see `unsupported_reason`)."""
    if not enabled() or unsupported_reason(model) is not None:
        return None
    sig = _signature(model)
    hit = _DECODERS.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    with torch.no_grad():
        dec = FastDecoder(model)
    _DECODERS[model] = (sig, dec)
    return dec


def set_threads(n: int | None) -> None:
    """Use `n` CPU threads for matmuls (None/0: leave PyTorch's default)."""
    if n:
        torch.set_num_threads(int(n))
