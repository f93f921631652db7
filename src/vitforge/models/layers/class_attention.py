"""Class attention: only the class token(s) are updated; DIST and patch tokens pass through bit-identical.

Two formulations that compute the same function (tested):

* `ClassAttentionBlock` (CaiT: Touvron et al., "Going deeper with Image Transformers", arXiv 2103.17239, Sec. 3;
  facebookresearch/deit `cait_models.py`): the query comes from the class token(s) only, keys and values from all
  tokens, separate q/k/v projections (timm `timm/models/cait.py` `ClassAttn` key names), LayerScale on both residual
  branches.
* `ClassTokenBlock` (the last 4 blocks of the CIFAR-10 KD ViT in kiki101robo/AIRL_VIT-and-SAM2 `q1.ipynb`): an
  ordinary `Block` of which only the class-token rows are kept. That notebook computes the
  full N x N attention and slices; here only the class tokens' queries are computed (`Attention(num_queries=k)`),
  which gives the same rows for 1/N of the attention cost. The parameters are still those of `Block`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitforge.models.layers.attention import IMPLS, record_attention
from vitforge.models.layers.block import Block, LayerScale
from vitforge.models.layers.drop_path import DropPath
from vitforge.models.layers.mlp import Mlp


class ClassAttention(nn.Module):
    """Multi-head attention with queries from the first `num_cls` tokens only.

    Args:
        dim: token width D.
        num_heads: heads h.
        qkv_bias: bias on the q, k and v projections.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after the output projection.
        num_cls: number of leading class tokens that form the queries.
        impl: "manual" (explicit softmax, inspectable) or "sdpa" (fused kernel).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_cls: int = 1,
        impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if impl not in IMPLS:
            raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.num_cls = num_cls
        self.impl = impl
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.record: dict | None = None  # see `Attention.record`

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, D) -> (B, h, N, d)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D); attn_bias broadcastable to (B, h, k, N), k = num_cls. Returns the CLS update (B, k, D)."""
        B, N, D = x.shape
        q = self._heads(self.q(x[:, : self.num_cls]))  # (B, h, k, d)
        k, v = self._heads(self.k(x)), self._heads(self.v(x))  # (B, h, N, d) each
        if self.impl == "manual" or self.record is not None:
            o = self._manual(q, k, v, attn_bias)
        else:
            bias = attn_bias.to(q.dtype) if attn_bias is not None else None
            p = self.attn_drop.p if self.training else 0.0
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        o = o.transpose(1, 2).reshape(B, self.num_cls, D)  # (B, h, k, d) -> (B, k, D)
        return self.proj_drop(self.proj(o))

    def _manual(self, q, k, v, attn_bias):
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, k, N) logits
        if attn_bias is not None:
            attn = attn + attn_bias
        attn = attn.softmax(dim=-1)
        if self.record is not None:
            record_attention(self.record, q, k, v, attn)
        o = self.attn_drop(attn) @ v  # (B, h, k, d)
        if self.record is not None:
            self.record["O"] = tuple(o.transpose(1, 2).flatten(2).shape)
        return o


class ClassAttentionBlock(nn.Module):
    """CaiT class-attention block: x_cls += γ1·CA(LN([cls, rest])); x_cls += γ2·MLP(LN(x_cls)).

    Takes and returns the whole sequence (B, N, D); tokens after the first `num_cls` are returned unchanged.

    Args:
        dim: token width D.
        num_heads: heads h.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on q/k/v.
        drop: dropout after the projection and inside the MLP (CaiT uses 0).
        attn_drop: dropout on the attention probabilities (CaiT uses 0).
        drop_path: stochastic-depth rate (CaiT uses 0 in class-attention layers).
        init_values: LayerScale init ε; None disables LayerScale.
        norm_eps: LayerNorm epsilon.
        num_cls: number of leading class tokens.
        attn_impl: "manual" or "sdpa".
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = 1e-5,
        norm_eps: float = 1e-6,
        num_cls: int = 1,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        self.num_cls = num_cls
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ClassAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, num_cls=num_cls,
            impl=attn_impl,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D) with only x[:, :num_cls] changed; attn_bias: rows of the class tokens."""
        cls, rest = x[:, : self.num_cls], x[:, self.num_cls :]
        cls = cls + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_bias)))
        cls = cls + self.drop_path2(self.ls2(self.mlp(self.norm2(cls))))
        return torch.cat([cls, rest], dim=1)


class ClassTokenBlock(Block):
    """Class-attention block of the AIRL_VIT-and-SAM2 KD ViT: the class-token rows of full self-attention over all
    tokens (computed from the class-token queries only). Unlike CaiT: no late CLS insertion, no LayerScale.

    Same parameters and key names as `Block`; x[:, num_cls:] (DIST and patches) passes through unchanged.
    `attn_bias` is the full (h, N, N) bias, as for `Block`.
    """

    def __init__(self, dim: int, *, num_cls: int = 1, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.num_cls = num_cls

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D) with only x[:, :num_cls] changed."""
        k = self.num_cls
        cls, rest = x[:, :k], x[:, k:]
        upd = self.attn(self.norm1(x), attn_bias, num_queries=k)  # (B, k, D): CLS rows of the full attention
        cls = cls + self.drop_path1(self.ls1(upd))
        cls = cls + self.drop_path2(self.ls2(self.mlp(self.norm2(cls))))
        return torch.cat([cls, rest], dim=1)
