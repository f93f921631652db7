"""Fixed positional tables."""

from __future__ import annotations

import torch


def sincos_1d(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(P,) positions -> (P, dim) with even dims sin, odd dims cos, frequency temperature^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    k = torch.arange(dim // 2, dtype=torch.float64)
    freq = temperature ** (-2.0 * k / dim)  # (dim/2,)
    ang = pos.double()[:, None] * freq[None, :]  # (P, dim/2)
    out = torch.empty(pos.numel(), dim, dtype=torch.float64)
    out[:, 0::2] = ang.sin()
    out[:, 1::2] = ang.cos()
    return out.float()


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """2-D sin-cos table (grid_h·grid_w, dim), token order h·grid_w + w (raster).

    The first dim/2 channels encode the column index w, the last dim/2 the row index h, each with the 1-D layout.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos width must be divisible by 4, got {dim}")
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (gh, gw) each
    emb_w = sincos_1d(ww.flatten(), dim // 2)
    emb_h = sincos_1d(hh.flatten(), dim // 2)
    return torch.cat([emb_w, emb_h], dim=1)
