"""The logit lens: each layer's residual stream read through the final norm and output head.

`model.forward(..., collect_hidden=list)` hands back the residual stream after the embedding
and after every layer (n_layers + 1 tensors, before the final norm). Passing each through
`model.model.norm` and `model.lm_head` gives the distribution that layer "would" predict; the
last one equals the model's real output. Rows are layers (0 = embeddings), columns positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LensResult:
    tokens: list[str]  # the prompt's tokens, as text
    top_ids: torch.Tensor  # [n_layers + 1, T, k]
    top_probs: torch.Tensor  # [n_layers + 1, T, k]
    top_text: list[list[list[str]]]  # [layer][position][k] decoded top tokens

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[0] - 1


@torch.inference_mode()
def lens_log_probs(model, ids: list[int]) -> torch.Tensor:
    """Log-probabilities [n_layers + 1, T, vocab] of every layer's lens (fp32)."""
    device = model.lm_head.weight.device
    hidden: list[torch.Tensor] = []
    model(torch.tensor([ids], device=device), collect_hidden=hidden)
    out = []
    for h in hidden:
        out.append(torch.log_softmax(model.head(model.model.norm(h[0])).float(), dim=-1))
    return torch.stack(out)


def token_text(tokenizer, i: int) -> str:
    return tokenizer.decode([int(i)])


@torch.inference_mode()
def logit_lens(model, tokenizer, ids: list[int], top_k: int = 5) -> LensResult:
    logp = lens_log_probs(model, ids)
    probs, top = logp.exp().topk(top_k, dim=-1)
    probs, top = probs.cpu(), top.cpu()  # small; the table and the PNG read them with numpy
    text = [[[token_text(tokenizer, i) for i in pos] for pos in layer.tolist()] for layer in top]
    return LensResult(tokens=[token_text(tokenizer, i) for i in ids], top_ids=top, top_probs=probs, top_text=text)


def _show(s: str, width: int = 10) -> str:
    """A token readable in a table cell: visible whitespace, clipped."""
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    s = s if s.strip() else s.replace(" ", "␣")
    return s if len(s) <= width else s[: width - 1] + "…"


def lens_table(res: LensResult, last: int | None = 8, k: int = 3) -> str:
    """Text table: top-1 token (and its probability) per layer and position, then the top-k of
    the last position per layer."""
    T = len(res.tokens)
    cols = list(range(T))[-last:] if last else list(range(T))
    w = 12
    head = "layer " + "".join(f"{_show(res.tokens[t], w - 1):>{w}}" for t in cols)
    lines = [head, "-" * len(head)]
    for layer in range(res.n_layers + 1):
        cells = "".join(f"{_show(res.top_text[layer][t][0], 7) + f' {res.top_probs[layer, t, 0]:.2f}':>{w}}" for t in cols)
        lines.append(f"{('emb' if layer == 0 else layer):>5} {cells}")
    lines += ["", f"top-{k} after the last token {res.tokens[-1]!r}:"]
    for layer in range(res.n_layers + 1):
        tops = ", ".join(f"{res.top_text[layer][-1][j]!r} {res.top_probs[layer, -1, j]:.3f}" for j in range(min(k, res.top_ids.shape[-1])))
        lines.append(f"{('emb' if layer == 0 else layer):>5}  {tops}")
    return "\n".join(lines)


def render_lens_png(res: LensResult, path: str | Path, title: str = "", last: int | None = 24) -> Path:
    """Heat map: rows = layers (embeddings at the bottom), columns = positions, colour = top-1
    probability, text = top-1 token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(res.tokens)
    cols = list(range(T))[-last:] if last else list(range(T))
    L = res.n_layers + 1
    probs = res.top_probs[:, cols, 0].numpy()
    fig_w = max(6.0, 1.05 * len(cols) + 2.0)
    fig_h = max(4.0, 0.30 * L + 1.8)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(probs, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0)
    for li in range(L):
        for cj, t in enumerate(cols):
            p = float(probs[li, cj])
            ax.text(cj, li, _show(res.top_text[li][t][0], 9), ha="center", va="center", fontsize=6.5,
                    color="black" if p > 0.6 else "white")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([_show(res.tokens[t], 12) for t in cols], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(L))
    ax.set_yticklabels(["emb"] + [str(i) for i in range(1, L)], fontsize=7)
    ax.set_xlabel("input token (the cell shows the lens's top prediction for the NEXT token)")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="top-1 probability")
    ax.set_title(title or "logit lens", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
