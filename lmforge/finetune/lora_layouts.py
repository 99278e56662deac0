"""LoRA adapters in the layer layout of a family's own checkpoints, so PEFT loads lmforge's
adapters onto `transformers` models and lmforge loads PEFT's, exactly.

lmforge's one model has separate q/k/v and gate/up layers with LLaMA's names; two families'
checkpoints do not:
- Phi-3 fuses q|k|v into `qkv_proj` and gate|up into `gate_up_proj`;
- GPT-2 fuses q|k|v into `attn.c_attn` and names its other layers `attn.c_proj`, `mlp.c_fc`,
  `mlp.c_proj` under `transformer.h.N`, as Conv1D layers (PEFT's `fan_in_fan_out`).

Saving: the parts' adapters become one adapter of the fused layer. A stacks the parts' A rows
(rank = the sum of theirs); B is block-diagonal, each block times its part's scaling, and the
fused layer's alpha makes its own scaling 1 (alpha = r, or sqrt(r) with rsLoRA). Loading: each
part keeps A, takes its rows of B, and the fused layer's rank and alpha (the same scaling).
"""
from __future__ import annotations

import torch

# family -> (its layer prefix, {its fused layer: our parts}, {our layer: its layer}, fan_in_fan_out)
LAYOUTS = {
    "phi3": ("model.layers.{i}.", {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                   "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}, {}, False),
    "gpt2": ("transformer.h.{i}.", {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
             {"self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}, True),
}


def layout(mcfg) -> tuple | None:
    return LAYOUTS.get((mcfg.extra or {}).get("model_type")) if mcfg is not None else None


def to_checkpoint_layout(model, layers: dict, state: dict, cfg: dict, prefix: str) -> tuple[dict, dict]:
    """(tensors, adapter_config) of an adapter in lmforge's layout -> the family's."""
    theirs_prefix, fused, renamed, fan_in_fan_out = layout(model.cfg)
    out = dict(state)
    drop = set()
    for i in range(model.cfg.n_layers):
        ours, theirs = f"model.layers.{i}.", theirs_prefix.format(i=i)
        for target, parts in fused.items():
            mods = [(layers.get(ours + p), model.get_submodule(ours + p)) for p in parts]
            if not any(m for m, _ in mods):
                continue
            rank = sum(m.r for m, _ in mods if m is not None)
            a_rows, b_cols, col = [], [], 0
            for (m, layer), p in zip(mods, parts):
                drop.add(ours + p)
                block = torch.zeros(layer.out_features, rank)
                if m is not None:
                    a_rows.append(m.lora_A.weight.detach().float().cpu())
                    block[:, col:col + m.r] = m.lora_B.weight.detach().float().cpu() * m.scaling
                    col += m.r
                b_cols.append(block)
            name = theirs + target
            out[f"{prefix}{name}.lora_A.weight"] = torch.cat(a_rows).contiguous()
            out[f"{prefix}{name}.lora_B.weight"] = torch.cat(b_cols).contiguous()
            cfg["rank_pattern"][name] = rank
            cfg["alpha_pattern"][name] = rank ** 0.5 if cfg.get("use_rslora") else rank
        for mine, their in renamed.items():
            if ours + mine in layers:
                drop.add(ours + mine)
                for ab in ("lora_A", "lora_B"):
                    out[f"{prefix}{theirs}{their}.{ab}.weight"] = state[f"{prefix}{ours}{mine}.{ab}.weight"]
                for pattern in ("rank_pattern", "alpha_pattern"):
                    if ours + mine in cfg[pattern]:
                        cfg[pattern][theirs + their] = cfg[pattern].pop(ours + mine)
    for path in drop:
        out.pop(f"{prefix}{path}.lora_A.weight", None)
        out.pop(f"{prefix}{path}.lora_B.weight", None)
        cfg["rank_pattern"].pop(path, None)
        cfg["alpha_pattern"].pop(path, None)
    cfg["target_modules"] = sorted({k[len(prefix):].rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in out})
    cfg["fan_in_fan_out"] = fan_in_fan_out
    return out, cfg


def from_checkpoint_layout(pairs: dict, mcfg, cfg: dict, alpha: float, pattern_value) -> tuple[dict, dict]:
    """{module path: {lora_A, lora_B}} in the family's layout -> lmforge's, and the alphas the
    split parts take from their fused layer."""
    theirs_prefix, fused, renamed, _ = layout(mcfg)
    back = {their: mine for mine, their in renamed.items()}
    head = theirs_prefix.split("{i}")[0]
    sizes = {"self_attn.q_proj": mcfg.n_heads * mcfg.head_dim, "self_attn.k_proj": mcfg.n_kv_heads * mcfg.head_dim,
             "self_attn.v_proj": mcfg.n_kv_heads * mcfg.head_dim, "mlp.gate_proj": mcfg.d_ff, "mlp.up_proj": mcfg.d_ff}
    out, alphas = {}, {}
    for path, ab in pairs.items():
        if not path.startswith(head):
            out[path] = ab
            continue
        i, _, module = path[len(head):].partition(".")
        ours = f"model.layers.{i}."
        if module in fused and set(ab) == {"lora_A", "lora_B"}:
            a = float(pattern_value(cfg.get("alpha_pattern"), path, alpha))
            parts = fused[module]
            for part, rows in zip(parts, ab["lora_B"].split([sizes[p] for p in parts])):
                out[ours + part] = {"lora_A": ab["lora_A"], "lora_B": rows}
                alphas[ours + part] = a
        elif module in back:
            out[ours + back[module]] = ab
            alphas[ours + back[module]] = float(pattern_value(cfg.get("alpha_pattern"), path, alpha))
        else:
            out[path] = ab
    return out, alphas


def vlm_checkpoint_layout(state: dict, cfg: dict, prefix: str) -> tuple[dict, dict]:
    """(tensors, adapter_config) of a vision-language model's adapter in its checkpoint's module
    names (`lmforge.loading.state_maps.vlm_path`: PEFT puts it on transformers' model as it is on
    lmforge's, on the text model and the connector, never the vision encoder); its
    targets as a regex over full paths (names alone would also match the vision encoder's)."""
    from lmforge.loading.state_maps import vlm_path

    out = {prefix + vlm_path(k[len(prefix):]): t for k, t in state.items()}
    paths = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in out})
    cfg = dict(cfg, target_modules="^(" + "|".join(p.replace(".", r"\.") for p in paths) + ")$",
               rank_pattern={vlm_path(k): v for k, v in cfg.get("rank_pattern", {}).items()},
               alpha_pattern={vlm_path(k): v for k, v in cfg.get("alpha_pattern", {}).items()})
    return out, cfg
