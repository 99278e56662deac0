"""Idefics3's connector: pixel shuffle, then one linear projection into the text model's width.

Pixel shuffle trades sequence length for width: each `scale` x `scale` block of neighbouring
patch features becomes one vector of scale^2 x the width, so a 32x32 patch grid reaches the
language model as 16x16 = 256 tokens (scale 2). The reshapes below follow transformers'
`Idefics3Connector.pixel_shuffle` exactly: the order of the concatenated features is what the
projection's weights were trained on.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[N, S, D] with S a square number of patches -> [N, S / scale^2, D * scale^2]."""
    n, seq, d = x.shape
    side = int(seq ** 0.5)
    x = x.view(n, side, side // scale, d * scale)  # neighbours along a row side by side
    x = x.permute(0, 2, 1, 3).reshape(n, side // scale, side // scale, d * scale * scale)  # then along a column
    return x.permute(0, 2, 1, 3).reshape(n, seq // (scale * scale), d * scale * scale)


class Connector(nn.Module):
    def __init__(self, vision_width: int, text_width: int, scale: int):
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(vision_width * scale * scale, text_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.scale))
