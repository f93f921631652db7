"""2-D relative position bias with special-token biases.

As in the CIFAR-10 KD ViT of kiki101robo/AIRL_VIT-and-SAM2 (`q1.ipynb`); the patch->patch table is the one of Swin
(Liu et al., "Swin Transformer", ICCV 2021, arXiv 2103.14030). Per block and head for an 8x8 grid with 2 special tokens:
225 table entries + 2·64 + 64·2 + 2·2 = 485, i.e. 3,880 parameters with 8 heads.

Attention logits over [special tokens (CLS, DIST, ...), patches] get an additive per-head bias, block by block:
patch->patch from a Swin-style table indexed by the 2-D offset (Δrow, Δcol) with (2·gh−1)(2·gw−1) entries, and free
learned biases for special->patch, patch->special and special<->special. Everything starts at zero, so a fresh model
attends exactly as one without the bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def relative_position_index(grid_h: int, grid_w: int) -> torch.Tensor:
    """(P, P) long table: entry (i, j) indexes the offset of patch i relative to patch j, P = grid_h·grid_w.

    idx = (Δrow + gh − 1)·(2·gw − 1) + (Δcol + gw − 1), so idx(i, j) + idx(j, i) = 2·idx(i, i) (the centre entry).
    """
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    coords = torch.stack([hh.flatten(), ww.flatten()])  # (2, P), raster order
    rel = coords[:, :, None] - coords[:, None, :]  # (2, P, P): (Δrow, Δcol) of i relative to j
    return (rel[0] + grid_h - 1) * (2 * grid_w - 1) + (rel[1] + grid_w - 1)


class RelPosBias2d(nn.Module):
    """Per-head additive attention bias for [special tokens, patches].

    Args:
        grid_size: patch grid (gh, gw).
        num_heads: attention heads h.
        num_special: tokens s placed before the patches (2 for [CLS, DIST]).
    """

    def __init__(self, *, grid_size: tuple[int, int], num_heads: int, num_special: int = 0) -> None:
        super().__init__()
        gh, gw = grid_size
        P, s = gh * gw, num_special
        self.num_special = s
        self.table = nn.Parameter(torch.zeros(num_heads, (2 * gh - 1) * (2 * gw - 1)))
        self.special_to_patch = nn.Parameter(torch.zeros(num_heads, s, P))
        self.patch_to_special = nn.Parameter(torch.zeros(num_heads, P, s))
        self.special_to_special = nn.Parameter(torch.zeros(num_heads, s, s))
        self.register_buffer("index", relative_position_index(gh, gw), persistent=False)

    def forward(self) -> torch.Tensor:
        """Returns the bias (h, s + P, s + P); rows are queries, columns keys."""
        pp = self.table[:, self.index]  # (h, P, P)
        if self.num_special == 0:
            return pp
        top = torch.cat([self.special_to_special, self.special_to_patch], dim=-1)  # (h, s, s + P)
        bottom = torch.cat([self.patch_to_special, pp], dim=-1)  # (h, P, s + P)
        return torch.cat([top, bottom], dim=-2)


def stacked_biases(modules: Sequence[RelPosBias2d]) -> torch.Tensor:
    """The biases of several blocks at once, (L, h, s + P, s + P), equal to `torch.stack([m() for m in modules])`:
    one gather over the stacked tables instead of a gather and three concatenations per block."""
    first = modules[0]
    pp = torch.stack([m.table for m in modules])[:, :, first.index]  # (L, h, P, P)
    if first.num_special == 0:
        return pp
    top = torch.cat([_stack(modules, "special_to_special"), _stack(modules, "special_to_patch")], dim=-1)
    bottom = torch.cat([_stack(modules, "patch_to_special"), pp], dim=-1)  # (L, h, P, s + P)
    return torch.cat([top, bottom], dim=-2)  # top: (L, h, s, s + P)


def _stack(modules: Sequence[RelPosBias2d], name: str) -> torch.Tensor:
    return torch.stack([getattr(m, name) for m in modules])
