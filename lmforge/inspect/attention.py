"""Attention maps: the softmax(QK^T / sqrt(d)) of one layer, per head, recomputed from the layer's
real inputs.

The model calls `F.scaled_dot_product_attention`, which never materialises the probabilities.
A forward pre-hook on `model.model.layers[L].self_attn` captures what the attention module
receives (the normed residual stream and RoPE cos/sin); the probabilities are recomputed from
its own queries and keys (`Attention.qkv`: norms, positions, MLA's latents as the layer computes
them), soft-cap and window included. `attention_maps` also returns the
attention output rebuilt from those probabilities (`o_proj(P @ V)`), which a test checks
against the module's real output, so the picture shows what the model actually computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model import softcap


@dataclass
class AttentionResult:
    probs: torch.Tensor  # [n_heads, T, T], rows = queries
    output: torch.Tensor  # [T, d_model] rebuilt attention output
    real_output: torch.Tensor  # [T, d_model] what the module returned
    tokens: list[str]
    layer: int


@torch.inference_mode()
def attention_maps(model, ids: list[int], layer: int, tokenizer=None) -> AttentionResult:
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise LmforgeError(f"--layer must be between 0 and {n - 1} (the model has {n} layers)")
    attn = model.model.layers[layer].self_attn
    seen: dict = {}

    def pre(_mod, args):
        seen["x"], seen["cos"], seen["sin"] = args[0], args[1], args[2]

    def post(_mod, _args, out):
        seen["out"] = out

    h1 = attn.register_forward_pre_hook(pre)
    h2 = attn.register_forward_hook(post)
    try:
        model(torch.tensor([ids], device=model.lm_head.weight.device))
    finally:
        h1.remove()
        h2.remove()
    cfg = model.cfg
    x, cos, sin = seen["x"], seen["cos"], seen["sin"]
    B, T, _ = x.shape
    q, k, v = attn.qkv(x, cos, sin)  # the module's own queries and keys (norms, positions, latents)
    groups = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = softcap((q.float() @ k.float().transpose(-1, -2)) * attn.scale, cfg.attn_logit_softcap)
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    window = cfg.window(layer)
    if window:  # a sliding layer's query sees its last `window` keys
        causal &= torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(-(window - 1))
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [1, H, T, T]
    y = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.value_dim)
    out = attn.o_proj(y)
    tokens = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
    return AttentionResult(probs=probs[0].cpu(), output=out[0].float().cpu(), real_output=seen["out"][0].float().cpu(),
                           tokens=tokens, layer=layer)


def _label(s: str, width: int = 12) -> str:
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    s = s if s.strip() else s.replace(" ", "␣")
    return s if len(s) <= width else s[: width - 1] + "…"


def render_attention_png(res: AttentionResult, path: str | Path, title: str = "", last: int | None = 40) -> Path:
    """One heat map per head (queries down, keys across), arranged in a grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    H, T, _ = res.probs.shape
    keep = list(range(T))[-last:] if last else list(range(T))
    P = res.probs[:, keep][:, :, keep].numpy()
    labels = [_label(res.tokens[t]) for t in keep]
    cols = math.ceil(math.sqrt(H))
    rows = math.ceil(H / cols)
    cell = max(2.6, min(6.0, 0.16 * len(keep) + 1.4))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.6, rows * cell + 1.4), squeeze=False,
                             layout="constrained")
    show_ticks = len(keep) <= 40
    fs = 8 if len(keep) <= 16 else 6
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        # square-root colour scale: the first token soaks up most attention ("attention sink");
        # the weaker links between content tokens stay visible
        im = ax.imshow(P[h], cmap="magma", norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0))
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(len(keep)) if show_ticks else [])
        ax.set_yticks(range(len(keep)) if show_ticks else [])
        # every head shares the tokens: label keys under the bottom row, queries left of column 0
        if show_ticks and h % cols == 0:
            ax.set_yticklabels(labels, fontsize=fs)
        else:
            ax.set_yticklabels([])
        if show_ticks and h + cols >= H:
            ax.set_xticklabels(labels, rotation=90, fontsize=fs)
        else:
            ax.set_xticklabels([])
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="attention probability (square-root scale)")
    fig.suptitle(title or f"attention, layer {res.layer} (rows: query token, columns: key token)", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
