"""Cluster attention of SClusterFormer (lineage: Context Clusters, Ma et al., "Image as Set of Points", ICLR 2023).

Official code: Fang666666/HSIC_SClusterFormer `models/SClusterFormer.py` (Cluster3D / Cluster2D); paper: Fang, Sun,
Zheng, Wu, IEEE TIP 34:701-716, 2025. Widths there: 8 heads of d = 24 and a 4x4 centre grid (M = 16) in every stage.

Per head, tokens are projected to features f_n and values v_n (width d); M centres c_m (and centre values v^c_m) are
the adaptive average pool of the feature map to a fixed grid. Every token is assigned to its most similar centre
m*(n) (hard assignment after LeakyReLU and dropout, so training assignments are stochastic), centres aggregate their
members, g_m = (v^c_m + sum_n S~_mn v_n) / (1 + |members of m|), and each token receives S_{m*(n), n} · g_{m*(n)}.

Two similarities: "cos" (Cluster3D, the spectral angle of the upper branch) and "euclidean" (Cluster2D, the lower
branch: exp(-||c^ - f^||) of L2-normalised vectors, in [exp(-2), 1]).

Two interchangeable implementations with the same parameters:
* `impl="broadcast"`: the official formulation. It materialises (B·h, M, N, d) tensors (centre-token differences,
  weighted aggregation and dispatch): with one token per pixel (64² or 96² tokens) that is gigabytes per tensor
  (32·8·16·9,216·24 fp32 values ≈ 3.6 GB), the out-of-memory problem reported for the RGB adaptation in
  rajanikant04/plant_disease_classification (`OPTIMIZATION_SUMMARY.md`).
* `impl="matmul"` (default): the same sums as (B·h, M, N) x (B·h, N, d) products and ||a - b||² = 2 - 2 a·b for
  unit vectors; memory O(B·h·M·N). The Euclidean distance then differs by float rounding (about 1e-4 for nearly
  identical vectors in fp32), so near-ties may be assigned differently from the broadcast path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitforge.models.layers.drop_path import DropPath
from vitforge.models.layers.mlp import Mlp

SIMILARITIES = ("cos", "euclidean")
IMPLS = ("matmul", "broadcast")


def cos_similarity(centres: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (b, M, d) x (b, N, d) -> (b, M, N)."""
    return F.normalize(centres, dim=-1) @ F.normalize(tokens, dim=-1).transpose(-2, -1)


def euclidean_similarity(centres: torch.Tensor, tokens: torch.Tensor, impl: str = "matmul") -> torch.Tensor:
    """exp(-||c^_m - f^_n||₂) of L2-normalised vectors, (b, M, d) x (b, N, d) -> (b, M, N), values in [e^-2, 1]."""
    c, t = F.normalize(centres, dim=-1), F.normalize(tokens, dim=-1)
    if impl == "broadcast":
        dist = torch.linalg.vector_norm(c.unsqueeze(-2) - t.unsqueeze(-3), dim=-1)  # via (b, M, N, d)
    else:
        # Clamped below at 1e-12: zero gradient at distance 0, as torch.norm's backward gives there.
        dist = (2 - 2 * (c @ t.transpose(-2, -1))).clamp_min(1e-12).sqrt()
    return torch.exp(-dist)


def cluster_dispatch(
    sim: torch.Tensor, value: torch.Tensor, value_centres: torch.Tensor, impl: str = "matmul"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard-assign tokens to centres, aggregate per centre, dispatch back.

    Args:
        sim: similarities S (b, M, N) after the activation (and dropout).
        value: token values v (b, N, d).
        value_centres: centre values v^c (b, M, d).
        impl: "matmul" or "broadcast" (see the module docstring).

    Returns:
        out (b, N, d) with out_n = S_{m*(n), n} g_{m*(n)}; mask (b, M, N), one 1 per column at m*(n) (the first
        maximal index on ties); g (b, M, d) the aggregated centre values.
    """
    idx = sim.argmax(dim=1, keepdim=True)  # (b, 1, N)
    mask = torch.zeros_like(sim).scatter_(1, idx, 1.0)  # (b, M, N)
    sim = sim * mask  # S~
    count = mask.sum(dim=-1, keepdim=True)  # (b, M, 1)
    if impl == "broadcast":
        g = ((value.unsqueeze(1) * sim.unsqueeze(-1)).sum(dim=2) + value_centres) / (count + 1)  # via (b, M, N, d)
        out = (g.unsqueeze(2) * sim.unsqueeze(-1)).sum(dim=1)  # via (b, M, N, d)
    else:
        g = (sim @ value + value_centres) / (count + 1)  # (b, M, d)
        out = sim.transpose(1, 2) @ g  # (b, N, d)
    return out, mask, g


class ClusterAttention(nn.Module):
    """Multi-head cluster attention over a token map (Cluster3D with "cos", Cluster2D with "euclidean").

    Args:
        dim: token width C (input and output).
        heads: heads E (folded into the batch).
        head_dim: width d per head (24 in SClusterFormer at every stage, independent of C).
        centres: (rows, cols) of the centre grid (4 x 4 -> M = 16).
        similarity: "cos" or "euclidean".
        sim_drop: dropout on the similarities before the assignment (0.4 upstream).
        impl: "matmul" or "broadcast".
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        head_dim: int = 24,
        centres: tuple[int, int] = (4, 4),
        similarity: str = "cos",
        sim_drop: float = 0.4,
        impl: str = "matmul",
    ) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if impl not in IMPLS:
            raise ValueError(f"cluster impl must be one of {IMPLS}, got {impl!r}")
        self.heads, self.head_dim, self.centres = heads, head_dim, tuple(centres)
        self.similarity, self.impl = similarity, impl
        # 1x1 convolutions upstream; Linear on tokens has the same parameters (weights reshaped).
        self.f = nn.Linear(dim, heads * head_dim)
        self.v = nn.Linear(dim, heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))
        self.sim_drop = nn.Dropout(sim_drop)

    def cluster_inputs(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """Tokens (B, N, C) on an H x W grid -> similarities S (B·E, M, N), values (B·E, N, d), centre values
        (B·E, M, d)."""
        B, N, _ = x.shape
        H, W = hw
        if H * W != N:
            raise ValueError(f"cluster attention got {N} tokens for a {H}x{W} grid")
        E, d = self.heads, self.head_dim
        feat = self.f(x).view(B, N, E, d).permute(0, 2, 1, 3).reshape(B * E, N, d)  # (B·E, N, d)
        value = self.v(x).view(B, N, E, d).permute(0, 2, 1, 3).reshape(B * E, N, d)
        centres, value_centres = (self._pool(t, H, W) for t in (feat, value))  # (B·E, M, d)
        if self.similarity == "cos":
            s = cos_similarity(centres, feat)
        else:
            s = euclidean_similarity(centres, feat, self.impl)
        sim = self.sim_drop(F.leaky_relu(self.sim_beta + self.sim_alpha * s, 0.2))  # (B·E, M, N)
        return sim, value, value_centres

    def _pool(self, t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(b, N, d) tokens -> (b, M, d) centres by adaptive average pooling of the H x W map."""
        grid = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], H, W)  # (b, d, H, W)
        return F.adaptive_avg_pool2d(grid, self.centres).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) tokens of an H x W map (token index = row·W + col), hw = (H, W). Returns (B, N, C)."""
        B, N, _ = x.shape
        out, _, _ = cluster_dispatch(*self.cluster_inputs(x, hw), impl=self.impl)  # (B·E, N, d)
        out = out.view(B, self.heads, N, self.head_dim).transpose(1, 2).reshape(B, N, -1)  # heads merged as (E d)
        return self.proj(out)


class ClusterBlock(nn.Module):
    """Pre-norm block: x + Cluster(LN(x)), x + MLP(LN(x)) (SClusterFormer `Block` / `Block2D`; no layer scale).

    Args:
        dim: token width C.
        heads, head_dim, centres, similarity, sim_drop, impl: see `ClusterAttention`.
        mlp_ratio: MLP hidden width / C (1 upstream).
        drop: dropout inside the MLP (0 upstream).
        drop_path: stochastic depth rate (0 upstream).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        head_dim: int = 24,
        centres: tuple[int, int] = (4, 4),
        similarity: str = "cos",
        sim_drop: float = 0.4,
        impl: str = "matmul",
        mlp_ratio: float = 1.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClusterAttention(dim, heads=heads, head_dim=head_dim, centres=centres, similarity=similarity,
                                     sim_drop=sim_drop, impl=impl)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def set_cluster_impl(model: nn.Module, impl: str) -> int:
    """Switch every `ClusterAttention` in `model` to `impl`; returns how many were switched."""
    if impl not in IMPLS:
        raise ValueError(f"cluster impl must be one of {IMPLS}, got {impl!r}")
    mods = [m for m in model.modules() if isinstance(m, ClusterAttention)]
    for m in mods:
        m.impl = impl
    return len(mods)
