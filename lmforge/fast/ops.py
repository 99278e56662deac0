"""Small tensor operations the fast decoder and its CUDA-graph step share."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def qk_norm_(qkv: torch.Tensor, norms, H: int, KV: int, D: int, eps: float) -> None:
    """RMSNorm each query and key head of a fused q|k|v output in place (Qwen3's q/k norms)."""
    T = qkv.shape[0]
    for part, n, w in ((qkv[:, : H * D], H, norms[0]), (qkv[:, H * D : (H + KV) * D], KV, norms[1])):
        heads = part.view(T, n, D)
        heads.copy_(F.rms_norm(heads.float(), (D,), w.float(), eps).to(heads.dtype))
