"""Mixture of Experts: the MLP a layer gets when `Config.n_experts > 0`.

Each token's router (`gate`, a linear map to one logit per expert) picks its top-k experts by
softmax probability; the picked weights are renormalized to sum to 1 (Mixtral; Qwen2-MoE's
`norm_topk_prob`), each expert is a SwiGLU MLP, and the output is the weighted sum. An optional
shared expert sees every token, scaled by a sigmoid gate (Qwen2-MoE).

Training extras, all active only in `train()` mode so inference equals Mixtral exactly:
- capacity: with `moe_capacity_factor > 0` an expert takes at most
  ceil(factor * tokens * k / n_experts) assignments per forward; the rest are dropped (that
  expert adds nothing for that token; the residual stream carries it on). First choices are
  served before second choices, earlier tokens before later ones (GShard's priority).
- load balancing: `aux_loss = coef * n_experts * sum_e f_e * P_e` (Switch Transformer), with
  f_e the fraction of top-k assignments routed to expert e and P_e its mean router probability;
  1.0 * coef when perfectly balanced. `lmforge.model.aux_losses(model)` sums it over layers and
  the trainer adds it to the loss.
- `last_load` (fraction of assignments per expert) and `last_dropped` (fraction dropped) feed
  `router_metrics`, which the trainer logs as router_load_e0.. and moe_drop_frac.

Parameter names (`mlp.gate`, `mlp.experts.N.{gate,up,down}_proj`, `mlp.shared_expert`,
`mlp.shared_expert_gate`) are Qwen2-MoE's per-expert layout, so LoRA can target expert
projections. `lmforge_state_to_hf` writes Mixtral's keys (`block_sparse_moe.experts.N.w1/w2/w3`,
the layout every transformers version and converter reads; transformers 5 fuses them on load)
or Qwen2-MoE's when there is a shared expert; `hf_state_to_lmforge` reads both and
transformers 5's fused `experts.gate_up_proj` / `experts.down_proj`.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model import MLP, Config


class MoE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        if not 1 <= cfg.n_experts_per_token <= cfg.n_experts:
            raise ValueError(f"n_experts_per_token ({cfg.n_experts_per_token}) must be between 1 and n_experts ({cfg.n_experts})")
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_token
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_coef = cfg.moe_aux_loss_coef
        self.norm_topk = getattr(cfg, "moe_norm_topk_prob", True)
        d_ff = cfg.moe_d_ff or cfg.d_ff
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.d_model, d_ff, cfg.mlp_bias) for _ in range(cfg.n_experts))
        if cfg.n_shared_experts > 0:
            self.shared_expert = MLP(cfg.d_model, cfg.moe_shared_d_ff or cfg.d_ff * cfg.n_shared_experts, cfg.mlp_bias)
            if cfg.moe_shared_gate:  # Qwen2-MoE gates it; DeepSeek's shared experts always add in full
                self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)
        self.routed_scale, self.groups = cfg.moe_routed_scale, cfg.moe_groups
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.last_dropped: float = 0.0

    def route(self, x: torch.Tensor):
        """x [N, D] -> (probs [N, E] fp32, top-k weights [N, k] fp32, top-k expert ids [N, k])."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(self._best_groups(probs), self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights * self.routed_scale, ids

    def _best_groups(self, probs: torch.Tensor) -> torch.Tensor:
        """DeepSeek's group-limited routing: experts outside the `topk_group` groups whose best
        expert scores highest are out of the running (their probabilities zeroed)."""
        if self.groups is None:
            return probs
        n_group, topk_group = self.groups
        best = probs.view(probs.shape[0], n_group, -1).max(-1).values
        keep = torch.zeros_like(best).scatter_(1, torch.topk(best, topk_group, dim=-1).indices, 1.0)
        return probs * keep.repeat_interleave(self.n_experts // n_group, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, E, k = x.shape[0], self.n_experts, self.top_k
        probs, weights, ids = self.route(x)
        # assignments in priority order: all first choices (token order), then second choices...
        flat_e = ids.t().reshape(-1)  # [k*N]
        flat_t = torch.arange(N, device=x.device).repeat(k)
        flat_w = weights.t().reshape(-1)
        keep = None
        if self.training and self.capacity_factor > 0:
            capacity = max(1, math.ceil(self.capacity_factor * N * k / E))
            onehot = F.one_hot(flat_e, E)
            slot = (onehot.cumsum(0) * onehot).sum(-1) - 1  # position of each assignment in its expert's queue
            keep = slot < capacity
        with torch.no_grad():
            load = torch.bincount(flat_e, minlength=E).float() / flat_e.numel()
            self.last_load = load
            self.last_dropped = float((~keep).float().mean()) if keep is not None else 0.0
        if self.training:
            self.aux_loss = self.aux_coef * E * (load * probs.mean(0)).sum()
        else:
            self.aux_loss = None
        if keep is not None:
            flat_e, flat_t, flat_w = flat_e[keep], flat_t[keep], flat_w[keep]
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=E).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]
            start += n
            tok = flat_t[sel]
            y = self.experts[e](x[tok]) * flat_w[sel, None]
            out.index_add_(0, tok, y.to(out.dtype))
        if hasattr(self, "shared_expert_gate"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif hasattr(self, "shared_expert"):
            out = out + self.shared_expert(x)
        return out.reshape(shape)


def router_metrics(model: nn.Module) -> dict:
    """Mean over MoE layers of each expert's share of assignments, plus the dropped fraction."""
    loads, drops = [], []
    for m in model.modules():
        if isinstance(m, MoE) and m.last_load is not None:
            loads.append(m.last_load)
            drops.append(m.last_dropped)
    if not loads:
        return {}
    mean = torch.stack(loads).mean(0)
    out = {f"router_load_e{i}": float(v) for i, v in enumerate(mean)}
    out["router_load_max"] = float(torch.stack(loads).max(-1).values.mean() * mean.numel())  # 1.0 = balanced
    out["moe_drop_frac"] = sum(drops) / len(drops)
    return out


# -- checkpoint key layouts ----------------------------------------------------------------------
_MIXTRAL_TO_OURS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_OURS_TO_MIXTRAL = {v: k for k, v in _MIXTRAL_TO_OURS.items()}
_LEGACY = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.(gate\.weight|experts\.(\d+)\.(w[123])\.weight)$")
_FUSED = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def hf_state_to_lmforge(state: dict, cfg: Config) -> dict:
    """Mixtral (per-expert w1/w2/w3 or transformers-5 fused) or Qwen2-MoE keys -> our names."""
    out = {}
    for key, t in state.items():
        m = _LEGACY.match(key)
        if m:
            prefix, rest, e, w = m.groups()
            out[f"{prefix}.mlp.gate.weight" if e is None else f"{prefix}.mlp.experts.{e}.{_MIXTRAL_TO_OURS[w]}.weight"] = t
            continue
        m = _FUSED.match(key)
        if m:
            prefix, what = m.groups()
            if what == "gate_up_proj":  # [E, 2F, D]: gate rows first, then up
                f = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = t[e, :f]
                    out[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = t[e, f:]
            else:  # [E, D, F]
                for e in range(t.shape[0]):
                    out[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = t[e]
            continue
        out[key.replace(".mlp.shared_experts.", ".mlp.shared_expert.")] = t  # DeepSeek's plural
    return out


def lmforge_state_to_hf(state: dict, cfg: Config) -> dict:
    """Our names -> Mixtral's per-expert keys, or the Qwen MoE names ours already are (Qwen2-MoE:
    a shared expert; Qwen3-MoE: q/k norms)."""
    if cfg.kv_lora_rank:  # DeepSeek-V2: per-expert keys (transformers fuses them on load), its plural shared name
        return {k.replace(".mlp.shared_expert.", ".mlp.shared_experts."): t for k, t in state.items()}
    if cfg.n_shared_experts > 0 or cfg.qk_norm:
        return dict(state)
    out = {}
    pat = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight)$")
    for key, t in state.items():
        m = pat.match(key)
        if not m:
            out[key] = t
            continue
        prefix, rest, e, proj = m.groups()
        if e is None:
            out[f"{prefix}.block_sparse_moe.gate.weight"] = t
        else:
            out[f"{prefix}.block_sparse_moe.experts.{e}.{_OURS_TO_MIXTRAL[proj]}.weight"] = t
    return out
