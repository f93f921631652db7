"""Talking-heads attention (Shazeer et al. 2020), as used by CaiT's self-attention layers.

Heads exchange information twice: a learned h x h linear map mixes the attention logits across heads before the
softmax, and another mixes the probabilities after it. Because the post-softmax mix sits between the softmax and the
product with V, there is no fused SDPA path: the computation is always explicit.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitforge.models.layers.attention import record_attention


def _mix_heads(lin: nn.Linear, a: torch.Tensor) -> torch.Tensor:
    """Apply `lin` (h -> h) across the head axis of a (B, h, N, M) tensor."""
    return lin(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, N, M, h) -> (B, h, N, M)


class TalkingHeadAttention(nn.Module):
    """Self-attention with pre- and post-softmax head mixing (timm `TalkingHeadAttn` key names).

    With `record` set to a dict, the forward stores Q/K/V shapes, the shape of the softmax output A (before the
    post-softmax mix, the only point where rows are probability distributions) and max |row-sum(A) − 1|.

    Args:
        dim: token width D.
        num_heads: heads h.
        qkv_bias: bias on the fused q/k/v projection.
        attn_drop: dropout on the mixed attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self, dim: int, *, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj_l = nn.Linear(num_heads, num_heads)  # logits mix (pre-softmax)
        self.proj_w = nn.Linear(num_heads, num_heads)  # weights mix (post-softmax)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.record: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)
        logits = _mix_heads(self.proj_l, (q * self.scale) @ k.transpose(-2, -1))  # (B, h, N, N)
        attn = logits.softmax(dim=-1)
        if self.record is not None:
            record_attention(self.record, q, k, v, attn)
        attn = self.attn_drop(_mix_heads(self.proj_w, attn))
        o = (attn @ v).transpose(1, 2).reshape(B, N, D)  # (B, h, N, d) -> (B, N, D)
        if self.record is not None:
            self.record["O"] = tuple(o.shape)
        return self.proj_drop(self.proj(o))
