"""The SigLIP vision transformer as Idefics3 / SmolVLM use it.

Patch embedding (a stride-`patch_size` convolution) + a learned position per patch of the
`image_size` grid -> N x [LayerNorm -> bidirectional attention -> residual, LayerNorm -> GELU-tanh
MLP -> residual] -> LayerNorm. Module names follow transformers' `Idefics3VisionTransformer`, so
its state dict loads by dropping a prefix.

Idefics3 feeds images of several sizes in one padded batch (tiles plus a global view, padded to
the largest): padded patches are hidden from attention, and a smaller image's patches get the
positions of the full grid they would cover when stretched to it (NaViT-style fractional
positions, as transformers computes them), so one position table serves every size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 3072
    n_layers: int = 12
    n_heads: int = 16
    num_channels: int = 3
    image_size: int = 224  # the grid the position table covers: image_size // patch_size per side
    patch_size: int = 32
    norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side ** 2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixels [N, C, H, W]; patch_mask bool [N, H/p, W/p] (True = a real patch)."""
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return x + self.position_embedding(position_ids(patch_mask, self.cfg.patches_per_side))


def position_ids(patch_mask: torch.Tensor, side: int) -> torch.Tensor:
    """[N, h*w] position ids: each real patch's row and column, as fractions of the image's own
    patch count, bucketed onto the `side` x `side` table; padding patches get 0. The float32
    arithmetic and the clamp are transformers' own, so the buckets match at every edge."""
    n, h, w = patch_mask.shape
    dev = patch_mask.device
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=dev)
    rows = patch_mask[:, :, 0].sum(1)  # real patches per column / row of each image
    cols = patch_mask[:, 0, :].sum(1)
    frac_h = (torch.arange(h, device=dev, dtype=torch.float32)[None, :] * (1.0 / rows)[:, None]).clamp(max=1.0 - 1e-6)
    frac_w = (torch.arange(w, device=dev, dtype=torch.float32)[None, :] * (1.0 / cols)[:, None]).clamp(max=1.0 - 1e-6)
    bh = torch.bucketize(frac_h, boundaries, right=True)
    bw = torch.bucketize(frac_w, boundaries, right=True)
    ids = (bh[:, :, None] * side + bw[:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.n_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """pixels [N, C, H, W] (+ patch mask) -> patch features [N, (H/p)*(W/p), hidden_size]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.n_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.cfg.patch_size
        if patch_mask is None:
            patch_mask = torch.ones(pixels.shape[0], pixels.shape[2] // p, pixels.shape[3] // p,
                                    dtype=torch.bool, device=pixels.device)
        x = self.embeddings(pixels, patch_mask)
        keys = patch_mask.reshape(x.shape[0], -1)
        # padding patches are hidden as keys; no mask at all when every patch is real (the fast path)
        mask = None if bool(keys.all()) else keys[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


def patch_mask_from_pixels(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """bool [N, H/p, W/p]: a patch is real when any of its pixels is (transformers' rule)."""
    grid = pixel_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return grid.sum(dim=(-1, -2)) > 0
