"""Runtime weight quantization for CPU inference: `quantize_model(model, "int8" | "int4")`;
`resolve_quant("auto", device, dtype)` is the one place that picks a scheme per device.

Every `nn.Linear` of the transformer (attention, MLP, output head) becomes a `QuantLinear`
under the same module name, so `model.forward`, the engine and the fast decoder run unchanged.
The embedding table stays in full precision (a lookup reads one row per token). The model
becomes inference-only.

Kernels, and why (2-core AVX-512 machines, batch-1 decode; see shared/PERF_NOTES.md and
benchmarks/decode.py):
- One token (decode): fbgemm's dynamic-quantized linear, the fastest matmul PyTorch has here
  at batch 1. Its activation quantization is per call, so with one row it is per token.
- Several tokens (prefill, scoring): per-token symmetric int8 activations and `torch._int_mm`.
  fbgemm would quantize the whole [tokens, features] block with one scale, and this model
  family has "massive activations" (single tokens reaching ~3000 where others stay near 1)
  that wreck a shared scale: perplexity +150 % measured; per token it is +1 %.
- Activation outliers also sit in fixed channels. SmoothQuant's rescaling moves them into the
  weights: x W^T = (x / s)(W s)^T with s_j = sqrt(max|x_j| / max|W_j|), max|x_j| measured on a
  short built-in calibration text. Layers reading the same input (q/k/v, gate/up) share s, so
  the fast decoder can still fuse them; it folds 1/s into the preceding RMSNorm weight.
  Measured on the default model: per-token int8 without smoothing +2.5 % perplexity, with it
  under 1 %.

Schemes:
- int8: weights int8 per output row.
- int4: weights rounded to asymmetric 4-bit groups of 32 inputs (llama.cpp's Q4_1 layout,
  with a search over the level spacing), then held on their row's int8 grid and run on the
  int8 kernels: 4-bit weights at int8 speed. PyTorch's packed 4-bit CPU kernels
  (`_weight_int4pack_mm_for_cpu`, `_dyn_quant_matmul_4bit`) are many times slower than fp32 at
  batch 1 here, so in this runtime int4 saves no memory over int8; it gives the accuracy of a
  4-bit model (what a Q4 GGUF export will do) at int8 speed. No smoothing for int4: scaling
  input channels breaks the 4-bit grid of weights that came from a Q4 GGUF (measured: the
  default model's perplexity +24 % with smoothing, +6 % without, before the spacing search).
  The output head stays int8 (with smoothing), as llama.cpp's Q4 types keep it at 6-8 bits.

The deprecated `torch.ao`/`torch.ops.quantized` calls are isolated in the `_fbgemm_*`
functions so a successor library can be swapped in one place.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError

SCHEMES = ("int8", "int4")
CHOICES = ("auto", "none", "gguf") + SCHEMES  # what --quant accepts ("gguf": a GGUF's own blocks)
INT4_GROUP = 32
SMOOTH_ALPHA = 0.5
CALIBRATION_TEXT = Path(__file__).with_name("quant_calibration.txt")


# -- the one place that touches fbgemm's (deprecated) quantized ops ------------------------
def _fbgemm_available() -> bool:
    return hasattr(torch.ops, "quantized") and hasattr(torch.ops.quantized, "linear_dynamic")


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """Pack int8 weights [out, in] with one scale per output row."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; this is their one use
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())


def _fbgemm_linear(x: torch.Tensor, packed, reduce_range: bool) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)


@functools.lru_cache(maxsize=1)
def _cpu_has_vnni() -> bool:
    """fbgemm needs a 7-bit activation range (reduce_range) unless the CPU has VNNI dot products
    (without them its u8*s8 pair sums saturate at int16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# -- weight quantizers --------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [out, in] int8, scale [out] fp32), w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def int4_groupwise(w: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """w rounded to asymmetric 4-bit groups (llama.cpp's Q4_1 layout: 16 levels min + q * d,
    q in 0..15, per 32 inputs). Each group tries level spacings (max - min) / k for
    k = 15..9 and keeps the one with the least squared error: weights that already sit on a
    4-bit grid (a dequantized Q4 GGUF) come back exactly."""
    w = w.float()
    out, inp = w.shape
    if inp % group:
        raise LmforgeError(f"int4 needs input sizes divisible by {group}, got a [{out}, {inp}] weight")
    wg = w.view(out, inp // group, group)
    lo = wg.amin(-1, keepdim=True)
    span = (wg.amax(-1, keepdim=True) - lo).clamp_min(1e-12)
    best, best_err = None, None
    for k in range(15, 8, -1):
        d = span / k
        qw = torch.clamp(torch.round((wg - lo) / d), 0, 15) * d + lo
        err = (qw - wg).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = qw, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, qw, best), torch.minimum(err, best_err)
    return best.view(out, inp)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit groupwise weights placed on their row's int8 grid: (q [out, in] int8, scale [out]).

    The second rounding moves a weight by at most half an int8 step (1/254 of the row's
    range), small next to the 4-bit step (1/15 of a group's range)."""
    return quantize_int8(int4_groupwise(w, group))


class QuantLinear(nn.Module):
    """A quantized `nn.Linear` for inference. y = ((x * inv_smooth) q^T) * scale + bias."""

    is_quantized_linear = True  # LoRA may wrap it (the shipped tool adapter on an int8 model)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                 inv_smooth: torch.Tensor | None = None, out_dtype=torch.float32):
        super().__init__()
        if scheme not in SCHEMES:
            raise LmforgeError(f"unknown quantization '{scheme}' (choose none, int8 or int4)")
        self.scheme = scheme
        self.out_features, self.in_features = q.shape
        self.out_dtype = out_dtype
        self.reduce_range = not _cpu_has_vnni()
        # int8 values (for the several-token path and for fusion) and fbgemm's packed copy
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)
        self.register_buffer("qbias", None if bias is None else bias.float().contiguous(), persistent=False)
        self.register_buffer("inv_smooth", None if inv_smooth is None else inv_smooth.float().contiguous(), persistent=False)
        self._packed = _fbgemm_pack(self.q, self.scale, self.qbias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias, scheme: str, smooth: torch.Tensor | None = None) -> "QuantLinear":
        w = weight.detach().float()
        if smooth is not None:
            w = w * smooth[None, :]
        q, scale = quantize_int8(w) if scheme == "int8" else quantize_int4(w)
        return cls(q, scale, None if bias is None else bias.detach(), scheme,
                   None if smooth is None else 1.0 / smooth, weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective float weight (a fresh tensor; for inspection and export)."""
        return self.dequantized_weight()

    def dequantized_weight(self) -> torch.Tensor:
        w = self.q.float() * self.scale[:, None]
        return w if self.inv_smooth is None else w * self.inv_smooth[None, :]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # a state dict (save_hf, checkpoints) gets the effective float weights under nn.Linear's
        # keys, so a quantized model still saves as a loadable HF model
        destination[prefix + "weight"] = self.dequantized_weight().to(self.out_dtype)
        if self.qbias is not None:
            destination[prefix + "bias"] = self.qbias.to(self.out_dtype)

    def __deepcopy__(self, memo):
        return QuantLinear(self.q.clone(), self.scale.clone(), None if self.qbias is None else self.qbias.clone(), self.scheme,
                           None if self.inv_smooth is None else self.inv_smooth.clone(), self.out_dtype)

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """[M, in] fp32 input already divided by the smoothing -> [M, out] fp32."""
        if x.shape[0] == 1:
            return _fbgemm_linear(x, self._packed, self.reduce_range)
        # per-token symmetric int8 activations (see the module docstring)
        s = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127.0
        xq = torch.round(x / s).to(torch.int8)
        y = torch._int_mm(xq, self.q.t()).float().mul_(s).mul_(self.scale)
        return y if self.qbias is None else y.add_(self.qbias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.inv_smooth is not None:
            x2 = x2 * self.inv_smooth
        return self.forward_raw(x2).view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def fuse_quant_linears(parts: list[QuantLinear], row_orders: list | None = None) -> QuantLinear:
    """One QuantLinear computing the concatenated outputs of `parts`, rows optionally reordered.

    Exact: scales are per output row, so every row keeps its int8 values and scale. The parts
    must share their input smoothing (quantize_model arranges that for q/k/v and gate/up).
    """
    s0 = parts[0].inv_smooth
    for p in parts[1:]:
        if (p.inv_smooth is None) != (s0 is None) or (s0 is not None and not torch.equal(p.inv_smooth, s0)):
            raise LmforgeError("cannot fuse quantized layers with different input smoothing")
    qs, scales, biases = [], [], []
    for i, p in enumerate(parts):
        order = None if row_orders is None else row_orders[i]
        b = p.qbias if p.qbias is not None else torch.zeros(p.out_features)
        q, s = p.q, p.scale
        if order is not None:
            q, s, b = q[order], s[order], b[order]
        qs.append(q), scales.append(s), biases.append(b)
    bias = torch.cat(biases) if any(p.qbias is not None for p in parts) else None
    return QuantLinear(torch.cat(qs), torch.cat(scales), bias, parts[0].scheme, s0, parts[0].out_dtype)


# -- choosing a scheme ----------------------------------------------------------------------
def resolve_quant(quant: str | None, device="cpu", dtype="fp32") -> str:
    """The scheme `quant` means on this device: "auto" is int8 on a CPU with fbgemm's kernels
    and fp32 weights (the fastest decoding measured there, benchmarks/results/decode.json), and
    "none" elsewhere: the int8 kernels are CPU-only (on CUDA "auto" runs bf16 weights instead, see
    `resolve_precision`), and when half-precision weights were asked for (--dtype bf16/fp16)
    those weights are what runs. Other values are checked and returned."""
    if quant in (None, ""):
        return "none"
    if quant not in CHOICES:
        raise LmforgeError(f"unknown --quant '{quant}' (choose auto, none, gguf, int8 or int4)")
    if quant != "auto":
        return quant
    on_cpu = torch.device(device).type == "cpu"
    full = dtype in ("fp32", "float32", torch.float32)
    return "int8" if on_cpu and full and _fbgemm_available() else "none"


def resolve_precision(dtype="fp32", quant: str | None = "none", device="cpu",
                      quantized_source: bool = False) -> tuple[str | torch.dtype, str]:
    """(weights dtype, runtime quantization) that `--dtype` and `--quant` mean on `device` (a
    resolved device: see `lmforge.device.resolve_device`); every loader goes through here.

        device  --dtype    --quant auto           other --quant
        cpu     fp32       fp32 weights, int8     as given
        (cpu    fp32       the file's own blocks  when the file is already quantized: a GGUF Q4/Q8/K-quant,
                           ("gguf")               run by lmforge.native's kernels; fp16 weights where
                                                  those cannot be built)
        cpu     bf16/fp16  that dtype, none       as given
        cuda    fp32       bf16 weights, none     fp32, as given
        cuda    bf16/fp16  that dtype, none       as given
        mps     any        that dtype, none       as given

    On CUDA "auto" means half precision (bf16; fp16 on a GPU without bf16) with no runtime
    quantization; int8/int4 stay CPU-only (`quantize_model` says so). A file whose weights are
    already quantized is not rounded a second time: int8 of the default Q4_1 GGUF answered the
    README's question wrongly and matched the file's own greedy replies on 20 % of 100 prompts;
    fp16 weights of the same file match on 98 % (benchmarks/results/default_fidelity.json);
    its own blocks, computed as llama.cpp computes them, are both right and the fastest."""
    full = dtype in ("fp32", "float32", torch.float32)
    on_cpu = torch.device(device).type == "cpu"
    if quant == "gguf" and not on_cpu:
        raise LmforgeError("--quant gguf runs on CPU only; use --dtype bf16/fp16 on a GPU")
    if quant == "auto" and full and quantized_source and on_cpu:
        from lmforge import native

        return ("fp32", "gguf") if native.library() is not None else ("fp16", "none")
    scheme = resolve_quant(quant, device, dtype)
    if quant == "auto" and full and torch.device(device).type == "cuda":
        dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return dtype, scheme


# -- calibration and the model-level entry point -------------------------------------------
def calibration_ids(tokenizer, vocab_size: int, max_len: int = 512) -> list[list[int]]:
    """Token ids to measure activation ranges on: the built-in text, or seeded random ids, in
    pieces of at most `max_len` (a model with learned positions has no place past its context)."""
    n = max(1, min(512, max_len))
    if tokenizer is not None and CALIBRATION_TEXT.exists():
        ids = tokenizer.encode(CALIBRATION_TEXT.read_text(), add_bos=False)
        ids = [i for i in ids if i < vocab_size]
        if tokenizer.bos_id is not None and tokenizer.bos_id < vocab_size:
            ids = [tokenizer.bos_id] + ids
        return [ids[i : i + n] for i in range(0, len(ids), n)]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (min(256, n),), generator=g).tolist()]


@torch.no_grad()
def activation_absmax(model: nn.Module, batches: list[list[int]]) -> dict[str, torch.Tensor]:
    """Largest |input| per input channel of every nn.Linear over the calibration tokens."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(m, inp, out, name=name):
                a = inp[0].detach().float().reshape(-1, inp[0].shape[-1]).abs().amax(0)
                stats[name] = torch.maximum(stats[name], a) if name in stats else a
            hooks.append(mod.register_forward_hook(hook))
    try:
        dev = next(model.parameters()).device
        for ids in batches:
            model(torch.tensor([ids], device=dev))
    finally:
        for h in hooks:
            h.remove()
    return stats


def _smoothing(weights: list[torch.Tensor], act_max: torch.Tensor | None, alpha: float = SMOOTH_ALPHA):
    if act_max is None:
        return None
    wmax = torch.cat([w.detach().float().abs() for w in weights]).amax(0)
    s = act_max.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp(1e-2, 1e4)


def quantize_model(model: nn.Module, quant: str, tokenizer=None, smooth: bool = True) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) with a QuantLinear; returns the model.
    `quant`: int8, int4, none, or auto (see `resolve_quant`).

    `tokenizer` lets calibration use the built-in text (better accuracy); without it, seeded
    random tokens are used. Module names stay the same.
    """
    if quant == "auto":
        p = next(model.parameters())
        quant = resolve_quant(quant, p.device, p.dtype)
    if quant in (None, "none"):
        return model
    if quant not in SCHEMES:
        raise LmforgeError(f"unknown --quant '{quant}' (choose auto, none, int8 or int4)")
    if not _fbgemm_available():
        raise LmforgeError(f"--quant {quant} needs PyTorch's fbgemm quantized ops, which this torch build lacks")
    if next(model.parameters()).device.type != "cpu":
        raise LmforgeError(f"--quant {quant} runs on CPU only; use --dtype bf16/fp16 on a GPU")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    act = {}
    if smooth and hasattr(model, "cfg"):
        act = activation_absmax(model, calibration_ids(tokenizer, model.cfg.vocab_size, model.cfg.max_seq_len))
    # layers reading the same input share one smoothing vector so they can be fused later
    groups: list[list[str]] = []
    done = set()
    for name in linears:
        if name in done:
            continue
        parent, _, leaf = name.rpartition(".")
        sibs = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}.get(leaf, (leaf,))
        group = [f"{parent}.{s}" if parent else s for s in sibs if (f"{parent}.{s}" if parent else s) in linears]
        if name not in group:
            group = [name]
        groups.append(group)
        done.update(group)
    for group in groups:
        mods = [linears[n] for n in group]
        # the output head stays 8-bit under int4, as llama.cpp keeps it (Q6_K/Q8_0) in its Q4
        # types: it is the largest matrix and the most sensitive, and costs the same here
        scheme = "int8" if group == ["lm_head"] else quant
        s = _smoothing([m.weight for m in mods], act.get(group[0])) if scheme == "int8" else None
        for name, lin in zip(group, mods):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, QuantLinear.from_float(lin.weight, lin.bias, scheme, s))
    model.quant = quant
    model.requires_grad_(False)
    return model
