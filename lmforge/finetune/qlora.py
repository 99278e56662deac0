"""QLoRA's frozen base: linear weights stored in int8 or 4 bits, dequantized on the fly.

    quantize_base(model, "nf4")              # every linear layer of the blocks, in place
    params = apply_lora(model, settings)      # LoRA (fp32) on top of the quantized layers

Formats (plain torch ops, no custom kernels):
- `int8`: symmetric, one fp32 scale per output row (absmax / 127).
- `nf4`: 4-bit NormalFloat codes (16 levels at quantiles of a normal distribution, as in the
  QLoRA paper), one fp32 absmax per block of 64 weights, two codes per byte.
- `int4`: 4-bit uniform symmetric codes (-7..7) per block of 64, same packing.

The forward dequantizes the weight into the compute dtype just for the matmul. A custom
autograd function saves only the quantized tensors and dequantizes again in backward, so the
graph never holds a full-precision copy of a frozen weight: that is where the memory goes.
The embedding (tied with the output head in the default model) stays in full precision.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError

KINDS = ("int8", "nf4", "int4")
BLOCK = 64


def _normal_ppf(p: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2 * p - 1)


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels: normal quantiles, asymmetric so that 0 is exact, scaled to [-1, 1]."""
    offset = 0.9677083  # the QLoRA paper's choice: mean of the extreme quantiles of 15 and 16 bins
    pos = _normal_ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -_normal_ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def int4_codebook() -> torch.Tensor:
    # index 0 (-8/7) is never produced: symmetric levels -7..7 keep 0 exact
    return torch.arange(-8, 8, dtype=torch.float32) / 7.0


def quantize_weight(w: torch.Tensor, kind: str, block: int = BLOCK) -> dict[str, torch.Tensor]:
    """Quantize a 2-D weight; returns the tensors `dequantize_weight` needs."""
    w = w.detach().float()
    out_f, in_f = w.shape
    if kind == "int8":
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q, "scale": scale}
    if kind not in ("nf4", "int4"):
        raise LmforgeError(f"unknown base quantization '{kind}' (choose {', '.join(KINDS)})")
    flat = w.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    normed = blocks / absmax[:, None]
    book = nf4_codebook() if kind == "nf4" else int4_codebook()
    # nearest level: bucketize against the midpoints between sorted levels
    mids = (book[1:] + book[:-1]) / 2
    codes = torch.bucketize(normed.reshape(-1), mids).to(torch.uint8)
    if kind == "int4":
        codes.clamp_(min=1)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return {"qweight": packed, "scale": absmax}


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, kind: str, shape: tuple[int, int],
                      dtype: torch.dtype = torch.float32, book: torch.Tensor | None = None) -> torch.Tensor:
    out_f, in_f = shape
    if kind == "int8":
        return qweight.to(dtype) * scale.to(dtype)[:, None]
    codes = torch.stack((qweight >> 4, qweight & 15), dim=-1).reshape(-1)
    vals = book.to(dtype)[codes.long()]
    n = out_f * in_f
    vals = vals[: scale.numel() * (vals.numel() // scale.numel())].view(scale.numel(), -1) * scale.to(dtype)[:, None]
    return vals.reshape(-1)[:n].view(out_f, in_f)


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x, layer):
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x.to(dt), layer.dequantize(dt))
        ctx.layer, ctx.dt, ctx.x_dtype = layer, dt, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        if not ctx.needs_input_grad[0]:
            return None, None
        with torch.autocast(gy.device.type, enabled=False):
            gx = gy.to(ctx.dt) @ ctx.layer.dequantize(ctx.dt)
        return gx.to(ctx.x_dtype), None


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (int8 / nf4 / int4)."""

    is_quantized_linear = True

    def __init__(self, linear: nn.Linear, kind: str, block: int = BLOCK):
        super().__init__()
        if kind not in KINDS:
            raise LmforgeError(f"unknown base quantization '{kind}' (choose {', '.join(KINDS)})")
        self.in_features, self.out_features, self.kind, self.block = linear.in_features, linear.out_features, kind, block
        q = quantize_weight(linear.weight, kind, block)
        self.register_buffer("qweight", q["qweight"].to(linear.weight.device))
        self.register_buffer("scale", q["scale"].to(linear.weight.device))
        if kind != "int8":
            book = nf4_codebook() if kind == "nf4" else int4_codebook()
            self.register_buffer("codebook", book.to(linear.weight.device), persistent=False)
        else:
            self.codebook = None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scale, self.kind, (self.out_features, self.in_features), dtype, self.codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QuantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kind={self.kind}"


def quantize_base(model: nn.Module, kind: str, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear (but the output head) by a frozen QuantLinear; returns how many."""
    if kind in (None, "", "none"):
        return 0
    if kind not in KINDS:
        raise LmforgeError(f"unknown --base-quant '{kind}' (choose none, {', '.join(KINDS)})")
    n = 0
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and path not in skip and not path.endswith((".lora_A", ".lora_B")):
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, QuantLinear(m, kind))
            n += 1
    for p in model.parameters():
        p.requires_grad_(False)
    return n


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights (codes + scales)."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
               for b in (m.qweight, m.scale))
