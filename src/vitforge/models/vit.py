"""Vision Transformer, hand-written (the root of the ViT family).

Tokens = [CLS_1 .. CLS_k, patches]; positional table added to all of them; pre-norm encoder blocks; final LayerNorm;
the head reads the CLS tokens (concatenated or averaged when k > 1) or the mean of the patch tokens.
Module and parameter names follow timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.i.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}`, `norm`, `head`) so timm weights map 1:1.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitforge.models.layers import Block, PatchEmbed, drop_path_rates, sincos_2d
from vitforge.registry import register_model

POS_EMBEDS = ("learned", "sincos", "none")
POOLS = ("token", "avg")
CLS_COMBINE = ("concat", "mean")


class VisionTransformer(nn.Module):
    """ViT classifier.

    Args:
        img_size: square input size.
        patch_size: patch side (conv kernel = stride).
        in_chans: input channels.
        num_classes: classes of the head (0 = no head, `forward` returns pooled features).
        embed_dim: token width D.
        depth: encoder blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / D.
        qkv_bias, proj_bias, mlp_bias, patch_bias: bias switches.
        num_cls_tokens: k >= 0 learnable CLS tokens in front of the patches.
        cls_combine: how k > 1 CLS outputs feed the head: "concat" (head width k·D) or "mean".
        global_pool: "token" (CLS tokens) or "avg" (mean of patch tokens).
        pos_embed: "learned" (trainable, CLS rows included), "sincos" (fixed 2-D buffer, zero CLS rows) or "none".
        drop_rate: dropout after attention projection, in the MLP and after adding positions.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth, linear 0 -> rate over the blocks.
        init_values: LayerScale init (None = off).
        norm_eps: LayerNorm epsilon.
        attn_impl: "sdpa" (fused) or "manual" (explicit softmax).
        weight_init: "timm" (trunc-normal 0.02 linears, zero biases) or "torch" (PyTorch defaults, zero CLS).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mlp_bias: bool | tuple[bool, bool] = True,
        patch_bias: bool = True,
        num_cls_tokens: int = 1,
        cls_combine: str = "concat",
        global_pool: str = "token",
        pos_embed: str = "learned",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        attn_impl: str = "sdpa",
        weight_init: str = "timm",
    ) -> None:
        super().__init__()
        _check_choice("pos_embed", pos_embed, POS_EMBEDS)
        _check_choice("global_pool", global_pool, POOLS)
        _check_choice("cls_combine", cls_combine, CLS_COMBINE)
        if global_pool == "token" and num_cls_tokens < 1:
            raise ValueError("global_pool='token' needs at least one CLS token")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_cls_tokens = num_cls_tokens
        self.num_prefix_tokens = num_cls_tokens
        self.cls_combine = cls_combine
        self.global_pool = global_pool
        self.pretrained_cfg = {"input_size": (in_chans, img_size, img_size)}

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=patch_bias
        )
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, embed_dim)) if num_cls_tokens else None
        self._init_pos_embed(pos_embed, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                mlp_bias=mlp_bias, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                init_values=init_values, norm_eps=norm_eps, attn_impl=attn_impl,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_in_features, num_classes) if num_classes else nn.Identity()
        if weight_init == "timm":
            self._init_timm()
        elif weight_init != "torch":
            raise ValueError(f"weight_init must be 'timm' or 'torch', got {weight_init!r}")

    # ---- construction helpers -------------------------------------------------------------------------------------
    def _init_pos_embed(self, kind: str, dim: int) -> None:
        n_total = self.num_prefix_tokens + self.patch_embed.num_patches
        self.pos_embed_kind = kind
        if kind == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_total, dim))
        elif kind == "sincos":
            table = torch.zeros(1, n_total, dim)
            table[0, self.num_prefix_tokens :] = sincos_2d(*self.patch_embed.grid_size, dim)
            self.register_buffer("pos_embed", table, persistent=False)
        else:
            self.pos_embed = None

    def _init_timm(self) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def head_in_features(self) -> int:
        concat = self.global_pool == "token" and self.cls_combine == "concat"
        return self.embed_dim * (self.num_cls_tokens if concat else 1)

    # ---- the classifier contract ----------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_in_features, num_classes) if num_classes else nn.Identity()

    def prefix_tokens(self, B: int) -> list[torch.Tensor]:
        """Tokens placed before the patches, each (B, n_i, D)."""
        return [self.cls_token.expand(B, -1, -1)] if self.cls_token is not None else []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, k + N, D)."""
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([*self.prefix_tokens(x.shape[0]), x], dim=1)  # (B, k + N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, k + N, D) -> logits (B, classes), or the pooled features if `pre_logits`."""
        k = self.num_cls_tokens
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.cls_combine == "concat":
            x = x[:, :k].flatten(1)  # (B, k·D)
        else:
            x = x[:, :k].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _vit(defaults: dict, kwargs: dict) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **kwargs})


@register_model
def vit_demo(**kwargs) -> VisionTransformer:
    """Demo ViT for 8x8 digits (`vitforge demo`): patch 2 -> 16 tokens, D 64, 4 blocks, 4 heads, ~0.14M params."""
    return _vit(
        dict(img_size=8, patch_size=2, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
             pos_embed="learned"),
        kwargs,
    )


@register_model
def vit_tiny_patch4_32(**kwargs) -> VisionTransformer:
    """ViT-Tiny width (D 192, 12 blocks, 3 heads) on 32x32 images with 4x4 patches (64 tokens)."""
    return _vit(dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-Ti/16 at 224 (timm `vit_tiny_patch16_224` layout, 5.7M params)."""
    return _vit(dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)
