"""`BlockLinear`: an `nn.Linear` whose weight is a GGUF file's own quantized blocks.

The weight is never re-rounded: the native kernels (`lmforge.native`, qmatmul.c) compute with
the blocks as the file holds them and with float activations, so lmforge computes what the
file says (the dequantized model's numbers, to fp32 summation order). Where the kernels cannot be built,
the same module dequantizes its weight once (gguf's reference dequantizer) and runs `F.linear`.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import native
from lmforge.errors import LmforgeError


def dequantize(blocks: torch.Tensor, qtype: int, cols: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [rows, cols] of quantized rows [rows, row_bytes] (into `out` when given): the native
    kernels where they run (equal to gguf's, tested), else gguf's reference dequantizer."""
    if runs_natively(qtype):
        out = torch.empty(blocks.shape[0], cols, dtype=torch.float32) if out is None else out
        blocks = blocks.contiguous()
        rc = native.library().lmf_dequant(qtype, blocks.data_ptr(), blocks.shape[0], blocks.shape[1], cols, out.data_ptr(), torch.get_num_threads())
        if rc == 0:
            return out
    ref = reference_dequantize(blocks, qtype, cols)
    return ref if out is None else out.copy_(ref)


# From this many activation rows on, unpacking the blocks once into a scratch matrix and running
# PyTorch's sgemm beats the kernels, which unpack each group once per 16 rows (measured on 2
# cores: kernels 1.4x faster at 32 rows, sgemm 1.6x faster at 128 and 3x at 512: prompt prefill).
DENSE_FROM_ROWS = 64
SCRATCH_FLOATS = 1 << 22  # 16 MiB per thread: every layer of a small model at once, an output head in slices
_scratch = threading.local()


def _dense_matmul(blocks: torch.Tensor, qtype: int, cols: int, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T through a per-thread scratch copy of W (`dequantize`d a slice of rows at a time)."""
    rows = blocks.shape[0]
    step = max(1, min(rows, SCRATCH_FLOATS // cols))
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < step * cols:
        buf = _scratch.buf = torch.empty(step * cols, dtype=torch.float32)
    x = x.float()
    y = torch.empty(x.shape[0], rows, dtype=torch.float32) if step < rows else None
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        w = buf[: n * cols].view(n, cols)
        dequantize(blocks[r0 : r0 + n], qtype, cols, out=w)
        if y is None:
            return F.linear(x, w)
        y[:, r0 : r0 + n] = F.linear(x, w)
    return y


def reference_dequantize(blocks: torch.Tensor, qtype: int, cols: int) -> torch.Tensor:
    """gguf's own (numpy) dequantizer: the reference every native path is tested against."""
    import gguf

    with np.errstate(all="ignore"):
        w = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(blocks.shape[0], cols)


def matmul(blocks: torch.Tensor, qtype: int, cols: int, x: torch.Tensor, scalar: bool = False, lib=None) -> torch.Tensor:
    """x [M, cols] @ W^T -> fp32 [M, rows] with the native kernels (`scalar`: their plain-C
    path, which the SIMD path must equal; `lib`: another build of them)."""
    lib = lib or native.library()
    x = x.detach().float().contiguous()
    y = torch.empty(x.shape[0], blocks.shape[0], dtype=torch.float32)
    rc = lib.lmf_matmul(qtype, blocks.data_ptr(), blocks.shape[0], blocks.shape[1], cols, x.data_ptr(),
                        x.shape[0], y.data_ptr(), torch.get_num_threads(), int(scalar))
    if rc != 0:
        raise LmforgeError(f"native matmul refused a [{blocks.shape[0]}, {cols}] weight of ggml type {qtype} (code {rc})")
    return y


def runs_natively(qtype: int) -> bool:
    return qtype in native.TYPES.values() and native.library() is not None


class BlockLinear(nn.Module):
    """y = x W^T + b with W held as `blocks` (uint8 [out, row_bytes]) of ggml type `qtype`."""

    scheme = "gguf"
    inv_smooth = None  # the fast decoder's QuantLinear interface: no input smoothing
    is_quantized_linear = True  # LoRA wraps it as it wraps any linear layer (lmforge.finetune.lora)

    def __init__(self, blocks: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None = None,
                 out_dtype=torch.float32):
        super().__init__()
        self.register_buffer("blocks", blocks, persistent=False)
        self.register_buffer("qbias", None if bias is None else bias.float().contiguous(), persistent=False)
        self.qtype, self.in_features, self.out_features = int(qtype), int(in_features), int(blocks.shape[0])
        self.out_dtype = out_dtype
        self._dense = None  # the dequantized weight, made once where the kernels cannot run

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight (a fresh tensor; for inspection and export)."""
        return dequantize(self.blocks.cpu(), self.qtype, self.in_features).to(self.blocks.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # a state dict (save_hf, convert) holds the dequantized weights under nn.Linear's keys
        destination[prefix + "weight"] = self.weight.to(self.out_dtype)
        if self.qbias is not None:
            destination[prefix + "bias"] = self.qbias.to(self.out_dtype)

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """[M, in] fp32 -> [M, out] fp32."""
        if self.blocks.device.type == "cpu" and runs_natively(self.qtype):
            dense = x.shape[0] >= DENSE_FROM_ROWS
            y = (_dense_matmul if dense else matmul)(self.blocks, self.qtype, self.in_features, x)
        else:  # no kernels here, or the layer was moved to a GPU: its dequantized weight, once
            if self._dense is None or self._dense.device != self.blocks.device:
                self._dense = dequantize(self.blocks.cpu(), self.qtype, self.in_features).to(self.blocks.device)
            y = F.linear(x.float(), self._dense)
        return y if self.qbias is None else y.add_(self.qbias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.forward_raw(x.reshape(-1, shape[-1]))
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        import gguf

        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={gguf.GGMLQuantizationType(self.qtype).name}"


def fuse_block_linears(parts: list[BlockLinear], row_orders: list | None = None) -> BlockLinear | None:
    """One BlockLinear computing the concatenated outputs of `parts` (rows optionally reordered),
    exact since blocks never span rows; None when the parts hold different block types."""
    if len({(p.qtype, p.in_features) for p in parts}) != 1:
        return None
    rows, biases = [], []
    for i, p in enumerate(parts):
        order = None if row_orders is None else row_orders[i]
        b = p.qbias if p.qbias is not None else torch.zeros(p.out_features)
        rows.append(p.blocks if order is None else p.blocks[order])
        biases.append(b if order is None else b[order])
    bias = torch.cat(biases) if any(p.qbias is not None for p in parts) else None
    return BlockLinear(torch.cat(rows), parts[0].qtype, parts[0].in_features, bias, parts[0].out_dtype)
