"""Multi-head self-attention, hand-written, with two interchangeable paths.

`impl="manual"` computes softmax(Q K^T / sqrt(d)) V explicitly (the attention matrix exists and can be inspected);
`impl="sdpa"` calls `torch.nn.functional.scaled_dot_product_attention`, which picks a fused flash/efficient kernel
where one exists. Both read the same `qkv`/`proj` weights (timm's key layout), so a model can switch paths at any time.

Training on a CPU with attention dropout, `sdpa` takes the manual path: PyTorch has no fused CPU kernel with dropout
and runs its unfused math form there (`_scaled_dot_product_attention_math`: the same products, softmax and one
`dropout` call on the probabilities, drawing the same random numbers), plus passes that guard fully masked rows
(`isneginf`, `all`, `where`), which our unmasked softmax does not need. Same function, same dropout draws; the
outputs agree to float rounding (tests/models/layers/test_attention_cpu_dropout.py). `benchmarks/cpu_levers.py`
measures the step (`attn_cpu_dropout`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("manual", "sdpa")
# `sdpa` training on a CPU with attention dropout runs the manual path (see the module docstring); False restores
# PyTorch's math fallback (benchmarks/cpu_levers.py compares the two).
MANUAL_FOR_CPU_DROPOUT = True


class Attention(nn.Module):
    """Multi-head self-attention over tokens.

    Args:
        dim: token width D.
        num_heads: number of heads h (D must be divisible by h).
        qkv_bias: bias on the fused q/k/v projection.
        proj_bias: bias on the output projection.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after the output projection.
        impl: "manual" or "sdpa".
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
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
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # When set to a dict, the next forward takes the manual path and records shapes and the softmax check there.
        self.record: dict | None = None

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                num_queries: int | None = None) -> torch.Tensor:
        """x: (B, N, D); attn_bias: additive logits bias broadcastable to (B, h, N, N). Returns (B, N, D).

        With `num_queries=n` only the first n tokens ask (class attention): the same rows of the full attention's
        output, (B, n, D), for 1/N of the attention cost (their q alone is projected; the bias rows are sliced).
        """
        B, N, D = x.shape
        q, k, v = self._qkv(x, num_queries)  # (B, h, Nq, d), (B, h, N, d), (B, h, N, d)
        if num_queries is not None and attn_bias is not None:
            attn_bias = attn_bias[..., :num_queries, :]
        p = self.attn_drop.p if self.training else 0.0
        cpu_dropout = MANUAL_FOR_CPU_DROPOUT and p > 0 and q.device.type == "cpu"
        if self.impl == "manual" or self.record is not None or cpu_dropout:
            o = self._manual(q, k, v, attn_bias)
        else:
            if attn_bias is not None:
                attn_bias = attn_bias.to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p)
        o = o.transpose(1, 2).reshape(B, q.shape[2], D)  # (B, h, Nq, d) -> (B, Nq, D)
        return self.proj_drop(self.proj(o))

    def _qkv(self, x: torch.Tensor, num_queries: int | None):
        """q (B, h, Nq, d), k and v (B, h, N, d) from the fused projection (rows of `qkv.weight`: q, k, v)."""
        B, N, D = x.shape
        h, d = self.num_heads, self.head_dim
        if num_queries is None:
            qkv = self.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
            return qkv.unbind(0)
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :num_queries], w[:D], None if b is None else b[:D])  # (B, Nq, D)
        kv = F.linear(x, w[D:], None if b is None else b[D:]).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4)
        return q.reshape(B, num_queries, h, d).transpose(1, 2), kv[0], kv[1]

    def _manual(self, q, k, v, attn_bias):
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, Nq, N) logits
        if attn_bias is not None:
            attn = attn + attn_bias
        attn = attn.softmax(dim=-1)
        if self.record is not None:
            record_attention(self.record, q, k, v, attn)
        o = self.attn_drop(attn) @ v  # (B, h, N, d)
        if self.record is not None:
            self.record["O"] = tuple(o.transpose(1, 2).flatten(2).shape)
        return o


def record_attention(record: dict, q, k, v, attn) -> None:
    """Write the attention checks into `record`: Q/K/V/A shapes and max |row-sum(A) - 1| (softmax rows sum to 1)."""
    record["Q"], record["K"], record["V"], record["A"] = (tuple(t.shape) for t in (q, k, v, attn))
    record["softmax_max_err"] = (attn.detach().float().sum(-1) - 1).abs().max().item()


def set_attention_impl(model: nn.Module, impl: str) -> int:
    """Switch every attention module of `model` to `impl`; returns how many were switched."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    n = 0
    for m in model.modules():
        if hasattr(m, "impl") and hasattr(m, "record"):
            m.impl = impl
            n += 1
    return n
