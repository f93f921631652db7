"""Compact Transformers: CCT and ViT-Lite.

Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers" (arXiv 2104.05704); official code
SHI-Labs/Compact-Transformers `src/cct.py`, `src/vit.py`, `src/utils/tokenizer.py`, `src/utils/transformers.py`.

CCT replaces patchify by a small convolutional tokenizer and the CLS token by sequence pooling (an attention-weighted
mean of the output tokens). ViT-Lite is the same encoder with a plain 4x4 patch embedding and a CLS token.
The encoder layer has an unusual norm placement, reproduced here: x = x + DropPath(Attn(LN_pre(x))); x = LN1(x);
x = x + DropPath(MLP(x)) -- the second LayerNorm normalises the residual stream itself, not a branch input.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitforge.constants import CIFAR10_NORM
from vitforge.models.layers import Attention, DropPath, Mlp, PatchEmbed, drop_path_rates
from vitforge.models.layers.checkpointing import GradCheckpointing
from vitforge.models.layers.pos_embed import sincos_1d
from vitforge.models.registry import register_model

TOKENIZERS = ("conv", "patch")
POS_EMBEDS = ("learned", "sincos", "none")


class ConvTokenizer(nn.Module):
    """n x [Conv k x k (stride max(1, k//2 − 1), pad max(1, k//2), no bias) -> ReLU -> MaxPool(3, 2, 1)].

    Channels 3 -> in_planes -> ... -> D. Input (B, C, H, W) -> tokens (B, N, D), raster order.
    """

    def __init__(
        self, *, in_chans: int = 3, embed_dim: int, kernel_size: int = 3, n_conv_layers: int = 1, in_planes: int = 64
    ) -> None:
        super().__init__()
        chs = [in_chans] + [in_planes] * (n_conv_layers - 1) + [embed_dim]
        self.stride, self.padding = max(1, kernel_size // 2 - 1), max(1, kernel_size // 2)
        self.kernel_size = kernel_size
        self.layers = nn.Sequential(*(self._stage(chs[i], chs[i + 1]) for i in range(n_conv_layers)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, c_in: int, c_out: int) -> nn.Sequential:
        conv = nn.Conv2d(c_in, c_out, self.kernel_size, stride=self.stride, padding=self.padding, bias=False)
        return nn.Sequential(conv, nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))

    def num_tokens(self, img_size: int) -> int:
        """Sequence length N for a square `img_size` input."""
        s = img_size
        for _ in self.layers:
            s = (s + 2 * self.padding - self.kernel_size) // self.stride + 1  # conv
            s = (s + 2 - 3) // 2 + 1  # max-pool 3/2/1
        return s * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, N, D)."""
        return self.layers(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class CCTBlock(nn.Module):
    """Compact-Transformers encoder layer (module names: pre_norm, attn, norm1, mlp)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float,
                 drop_path: float, norm_eps: float, attn_impl: str) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False, attn_drop=attn_drop, proj_drop=drop,
                              impl=attn_impl)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x = self.norm1(x + self.drop_path(self.attn(self.pre_norm(x))))  # LN on the residual stream itself
        return x + self.drop_path(self.mlp(x))


class SeqPool(nn.Module):
    """Sequence pooling: softmax over tokens of Linear(D, 1), then the weighted sum of the tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn_pool = nn.Linear(dim, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> pooling weights (B, N, 1), summing to 1 over N."""
        return self.attn_pool(x).softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, D)."""
        return (self.weights(x).transpose(1, 2) @ x).squeeze(1)  # (B, 1, N) @ (B, N, D)


class CompactTransformer(GradCheckpointing, nn.Module):
    """CCT (conv tokenizer + sequence pooling) or ViT-Lite (patch embedding + CLS token).

    Args:
        img_size: square input size.
        in_chans: input channels.
        num_classes: classes (0 = no head).
        embed_dim: token width D.
        depth: encoder layers.
        num_heads: attention heads.
        mlp_ratio: MLP width / D.
        tokenizer: "conv" (CCT) or "patch" (ViT-Lite: one strided conv with bias, no activation or pooling).
        kernel_size: conv-tokenizer kernel k.
        n_conv_layers: conv-tokenizer depth.
        patch_size: patch side of the "patch" tokenizer.
        seq_pool: sequence pooling (CCT) instead of a CLS token (ViT-Lite).
        pos_embed: "learned" (trunc-normal std 0.2), "sincos" (fixed 1-D table) or "none".
        drop_rate: dropout after positions, after the attention projection and in the MLP.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth, linear 0 -> rate.
        norm_eps: LayerNorm epsilon.
        attn_impl: "sdpa" or "manual".
    """

    def __init__(
        self,
        *,
        img_size: int = 32,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 256,
        depth: int = 7,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        tokenizer: str = "conv",
        kernel_size: int = 3,
        n_conv_layers: int = 1,
        patch_size: int = 4,
        seq_pool: bool = True,
        pos_embed: str = "learned",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.1,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-5,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if tokenizer not in TOKENIZERS or pos_embed not in POS_EMBEDS:
            raise ValueError(f"tokenizer must be in {TOKENIZERS} and pos_embed in {POS_EMBEDS}")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 0 if seq_pool else 1
        self.pretrained_cfg = {"input_size": (in_chans, img_size, img_size), **CIFAR10_NORM}
        self.tokenizer, n_tokens = self._tokenizer(tokenizer, img_size, in_chans, kernel_size, n_conv_layers,
                                                   patch_size)
        self.cls_token = None if seq_pool else nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_pos_embed(pos_embed, n_tokens + self.num_prefix_tokens)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            CCTBlock(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate,
                     drop_path=dpr[i], norm_eps=norm_eps, attn_impl=attn_impl)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.pool = SeqPool(embed_dim) if seq_pool else None
        self.reset_classifier(num_classes)
        self._init_linears()

    def _tokenizer(self, kind: str, img_size: int, in_chans: int, k: int, n_conv: int, patch: int):
        D = self.embed_dim
        if kind == "conv":
            tok = ConvTokenizer(in_chans=in_chans, embed_dim=D, kernel_size=k, n_conv_layers=n_conv)
            return tok, tok.num_tokens(img_size)
        tok = PatchEmbed(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=D, bias=True)
        nn.init.kaiming_normal_(tok.proj.weight)
        return tok, tok.num_patches

    def _init_pos_embed(self, kind: str, n: int) -> None:
        if kind == "learned":
            self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, n, self.embed_dim), std=0.2))
        elif kind == "sincos":
            self.register_buffer("pos_embed", sincos_1d(torch.arange(n), self.embed_dim)[None], persistent=False)
        else:
            self.pos_embed = None

    def _init_linears(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n in ("pos_embed", "cls_token")}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, [1 +] N, D)."""
        x = self.tokenizer(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (B, classes), or the pooled features (B, D) if `pre_logits`."""
        x = self.pool(x) if self.pool is not None else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def cct_7_3x1_cifar(**kwargs) -> CompactTransformer:
    """CCT-7/3x1 for 32x32 (3,760,139 params): one 3x3 conv tokenizer layer -> 256 tokens, 7 layers, seq-pool."""
    return CompactTransformer(**{**dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, kernel_size=3,
                                        n_conv_layers=1), **kwargs})


@register_model
def vit_lite_7_4_cifar(**kwargs) -> CompactTransformer:
    """ViT-Lite-7/4 for 32x32 (3,716,874 params): 4x4 patches -> 64 tokens + CLS, 7 layers."""
    return CompactTransformer(**{**dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, tokenizer="patch",
                                        patch_size=4, seq_pool=False), **kwargs})
