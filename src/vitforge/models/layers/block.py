"""Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), x + DropPath(LS(MLP(LN(x))))."""

from __future__ import annotations

import torch
import torch.nn as nn

from vitforge.models.layers.attention import Attention
from vitforge.models.layers.drop_path import DropPath
from vitforge.models.layers.mlp import Mlp


class LayerScale(nn.Module):
    """Per-channel learnable residual scale diag(gamma), gamma initialised to `init_values` (CaiT)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """ViT encoder block with timm's key names (norm1, attn, ls1, norm2, mlp, ls2).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias, proj_bias, mlp_bias: bias switches (`minivit_cifar` has qkv and MLP biases off, proj bias on).
        drop: dropout after attention projection and inside the MLP.
        attn_drop: dropout on attention probabilities.
        drop_path: stochastic-depth rate of this block.
        init_values: LayerScale init; None disables LayerScale.
        norm_eps: LayerNorm epsilon.
        attn_impl: "manual" or "sdpa".
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mlp_bias: bool | tuple[bool, bool] = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=drop,
            impl=attn_impl,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), bias=mlp_bias, drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_bias)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
