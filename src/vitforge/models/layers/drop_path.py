"""Stochastic depth (drop a whole residual branch per sample)."""

from __future__ import annotations

import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Zero the residual branch for a random subset of samples; rescale survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linear schedule 0 -> `rate` over `depth` blocks (DeiT/timm convention)."""
    if depth <= 1:
        return [rate] * depth
    return [rate * i / (depth - 1) for i in range(depth)]
