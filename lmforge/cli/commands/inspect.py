"""Look inside a model: logit lens per layer, attention maps per head (PNG + text).

    lmforge inspect logit-lens --prompt "The capital of France is"
    lmforge inspect attention --prompt "The capital of France is" --layer 15
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PROMPT = "The capital of France is"
DEVICE_HELP = "auto (CUDA when present, else MPS, else CPU) | cpu | cuda | cuda:N | mps"


@dataclass
class LensConfig:
    prompt: str = DEFAULT_PROMPT
    model: str | None = None
    chat: bool = field(default=False, metadata={"help": "render the prompt as a user turn of the chat template"})
    out: str = field(default="runs/inspect", metadata={"help": "folder for logit_lens.png / logit_lens.txt"})
    top_k: int = 3
    last: int = field(default=24, metadata={"help": "show at most this many final positions (0 = all)"})
    dtype: str = "fp32"
    quant: str = "none"
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})


@dataclass
class AttentionConfig:
    prompt: str = DEFAULT_PROMPT
    layer: int = 0
    model: str | None = None
    chat: bool = False
    out: str = "runs/inspect"
    last: int = field(default=40, metadata={"help": "show at most this many final positions (0 = all)"})
    dtype: str = "fp32"
    quant: str = "none"
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})


def _prompt_ids(lm, prompt: str, chat: bool) -> list[int]:
    from lmforge.errors import LmforgeError

    if not prompt:
        raise LmforgeError("--prompt is empty")
    ids = lm.encode_chat([{"role": "user", "content": prompt}]) if chat else lm.tokenizer.encode(prompt)
    if not ids:
        raise LmforgeError("the prompt produced no tokens")
    return ids


def logit_lens(cfg: LensConfig) -> int:
    """Top next-token predictions of every layer's residual stream (heat map PNG + text table)."""
    from pathlib import Path

    import lmforge
    from lmforge.inspect.logit_lens import lens_table, logit_lens as lens, render_lens_png

    lm = lmforge.load(cfg.model, dtype=cfg.dtype, device=cfg.device, quant=cfg.quant)
    ids = _prompt_ids(lm, cfg.prompt, cfg.chat)
    res = lens(lm.model, lm.tokenizer, ids, top_k=max(1, cfg.top_k))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = lens_table(res, last=min(cfg.last or 8, 8), k=cfg.top_k)
    (out / "logit_lens.txt").write_text(table + "\n")
    png = render_lens_png(res, out / "logit_lens.png", title=f"logit lens: {cfg.prompt!r}", last=cfg.last or None)
    print(table)
    print(f"\nwrote {png} and {out / 'logit_lens.txt'}")
    return 0


def attention(cfg: AttentionConfig) -> int:
    """Per-head attention probabilities of one layer (PNG grid)."""
    from pathlib import Path

    import lmforge
    from lmforge.inspect.attention import attention_maps, render_attention_png

    lm = lmforge.load(cfg.model, dtype=cfg.dtype, device=cfg.device, quant=cfg.quant)
    ids = _prompt_ids(lm, cfg.prompt, cfg.chat)
    res = attention_maps(lm.model, ids, cfg.layer, lm.tokenizer)
    png = render_attention_png(res, Path(cfg.out) / f"attention_layer{cfg.layer}.png",
                               title=f"layer {cfg.layer} attention: {cfg.prompt!r} (rows: query, columns: key)",
                               last=cfg.last or None)
    # a short text summary: for the last token, where each head looks most
    last = res.probs[:, -1]
    print(f"layer {cfg.layer}, last token {res.tokens[-1]!r}: strongest key per head")
    for h in range(last.shape[0]):
        j = int(last[h].argmax())
        print(f"  head {h}: {res.tokens[j]!r} (position {j}) {float(last[h, j]):.2f}")
    print(f"\nwrote {png}")
    return 0


SUBCOMMANDS = {"logit-lens": (LensConfig, logit_lens), "attention": (AttentionConfig, attention)}
