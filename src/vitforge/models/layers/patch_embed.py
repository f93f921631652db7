"""Image -> token embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches through one strided conv (timm's `patch_embed.proj` key).

    Input (B, C, H, W) -> tokens (B, N, D) with N = (H/p)·(W/p), raster order (row-major).
    """

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int, bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if (H, W) != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} input, got {H}x{W}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
