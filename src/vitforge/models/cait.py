"""CaiT: Class-Attention in Image Transformers.

Touvron, Cord, Sablayrolles, Synnaeve, Jégou, "Going deeper with Image Transformers" (ICCV 2021, arXiv 2103.17239);
official code facebookresearch/deit `cait_models.py`, timm `timm/models/cait.py`.

Two stages. Stage 1: patch tokens only (no CLS) through `depth` LayerScale blocks with talking-heads attention.
Stage 2: the CLS token joins late and is refined by `depth_token_only` class-attention blocks whose query comes from
CLS alone; the patch tokens are frozen inputs there. Final LayerNorm on [CLS, patches], head on CLS.
Parameter names follow timm's `Cait` except LayerScale: timm `gamma_1`/`gamma_2` are our `ls1.gamma`/`ls2.gamma`
(see `vitforge.models.convert`). LayerScale γ starts at ε = 0.1 for depth <= 18, 1e-5 for depth 24 (XXS24/XS24/S24),
1e-6 deeper (S36/M36/M48); stage-1 drop path is uniform over the blocks, class-attention blocks have none.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitforge.constants import IMAGENET_NORM
from vitforge.models.layers import DropPath, LayerScale, Mlp, PatchEmbed
from vitforge.models.layers.checkpointing import GradCheckpointing
from vitforge.models.layers.class_attention import ClassAttentionBlock
from vitforge.models.layers.talking_heads import TalkingHeadAttention
from vitforge.models.registry import register_model


class TalkingHeadsBlock(nn.Module):
    """CaiT self-attention layer: x += DropPath(γ1·TH-Attn(LN(x))); x += DropPath(γ2·MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
        init_values: float,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = TalkingHeadAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                         proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, init_values)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Cait(GradCheckpointing, nn.Module):
    """CaiT classifier.

    Args:
        img_size: square input size.
        patch_size: patch side.
        in_chans: input channels.
        num_classes: classes of the head (0 = no head).
        embed_dim: token width D.
        depth: self-attention layers (stage 1).
        num_heads: heads in both stages.
        mlp_ratio: MLP width / D in stage 1.
        qkv_bias: bias on q/k/v projections.
        drop_rate: dropout before the head, after positions and inside stage-1 blocks.
        attn_drop_rate: dropout on stage-1 attention weights.
        drop_path_rate: stochastic depth of every stage-1 block (uniform, not linear, as in CaiT).
        init_values: LayerScale ε (CaiT: 0.1 for depth <= 18, 1e-5 for 24, 1e-6 deeper).
        depth_token_only: class-attention layers (stage 2; no dropout, no drop path).
        mlp_ratio_token_only: MLP width / D in stage 2.
        norm_eps: LayerNorm epsilon.
        attn_impl: class-attention path, "sdpa" or "manual" (talking heads are always explicit).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float = 1e-5,
        depth_token_only: int = 2,
        mlp_ratio_token_only: float = 4.0,
        norm_eps: float = 1e-6,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        self.pretrained_cfg = {"input_size": (in_chans, img_size, img_size), **IMAGENET_NORM}
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))  # patches only
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            TalkingHeadsBlock(
                embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=drop_path_rate, init_values=init_values, norm_eps=norm_eps,
            )
            for _ in range(depth)
        )
        self.blocks_token_only = nn.ModuleList(
            ClassAttentionBlock(
                embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio_token_only, qkv_bias=qkv_bias,
                init_values=init_values, norm_eps=norm_eps, attn_impl=attn_impl,
            )
            for _ in range(depth_token_only)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, 1 + N, D), CLS first."""
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)  # (B, N, D)
        for blk in self.blocks:
            x = self.run_block(blk, x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D): CLS joins late
        for blk in self.blocks_token_only:
            x = self.run_block(blk, x)  # updates x[:, 0] only
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 1 + N, D) -> logits (B, classes), or the CLS features if `pre_logits`."""
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def cait_xxs24_224(**kwargs) -> Cait:
    """CaiT-XXS24 at 224 (timm `cait_xxs24_224` layout, 11,956,264 params): D 192, 24 SA + 2 CA layers, 4 heads."""
    return Cait(**{**dict(img_size=224, patch_size=16, embed_dim=192, depth=24, num_heads=4, init_values=1e-5),
                   **kwargs})
