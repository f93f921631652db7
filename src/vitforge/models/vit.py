"""Vision Transformer, hand-written (the root of the ViT family).

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale" (ICLR 2021, arXiv
2010.11929); reference implementation huggingface/pytorch-image-models `timm/models/vision_transformer.py`.

Tokens = [CLS_1 .. CLS_k, (DIST), patches]; positional table added to all of them; pre-norm encoder blocks; final
LayerNorm; the head reads the CLS tokens (concatenated or averaged when k > 1) or the mean of the patch tokens.
Options cover the CIFAR models below (`minivit_cifar`, `deit_kd_cifar`): a conv-stem patch embedding, a 2-D
relative position bias in every block, a tail of
class-attention blocks that only update the CLS token(s), a DeiT distillation token with its own head, and one
LayerNorm per head instead of the shared final norm.
Module and parameter names follow timm's `VisionTransformer` / `VisionTransformerDistilled` (`patch_embed.proj`,
`cls_token`, `dist_token`, `pos_embed`, `blocks.i.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}`, `norm`,
`head`, `head_dist`) so timm weights map 1:1.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitforge.constants import CIFAR10_NORM
from vitforge.models.layers import Block, PatchEmbed, drop_path_rates, sincos_2d
from vitforge.models.layers.checkpointing import GradCheckpointing
from vitforge.models.layers.class_attention import ClassTokenBlock
from vitforge.models.layers.conv_stem import ConvStemPatchEmbed
from vitforge.models.layers.rel_pos_bias import RelPosBias2d, stacked_biases
from vitforge.models.registry import register_model

POS_EMBEDS = ("learned", "sincos", "none")
POOLS = ("token", "avg")
CLS_COMBINE = ("concat", "mean")
EMBED_LAYERS = ("conv", "conv_stem")
HEAD_NORMS = ("shared", "per_head")
WEIGHT_INITS = ("timm", "torch")
TOKEN_INITS = ("timm", "trunc_normal", "zeros")



class VisionTransformer(GradCheckpointing, nn.Module):
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
        embed_layer: "conv" (one strided conv) or "conv_stem" (Conv3x3+BN+GELU, unfold, Linear; `deit_kd_cifar`).
        num_cls_tokens: k >= 0 learnable CLS tokens in front of the patches.
        cls_combine: how k > 1 CLS outputs feed the head: "concat" (head width k·D) or "mean".
        distilled: add a DeiT distillation token (after the CLS tokens) with its own head `head_dist`. In training
            mode `forward` returns (cls_logits, dist_logits); in eval mode their mean.
        global_pool: "token" (CLS tokens) or "avg" (mean of patch tokens).
        pos_embed: "learned" (trainable, CLS rows included), "sincos" (fixed 2-D buffer, zero CLS rows) or "none".
        rel_pos_bias: add a 2-D relative position bias (plus special-token biases) to every block's attention.
        class_attn_depth: the last n blocks only update the CLS token(s) (`deit_kd_cifar`'s class attention: full
            attention, CLS rows kept); DIST and patch tokens pass through them unchanged.
        head_norm: "shared" (one final LayerNorm on all tokens) or "per_head" (no final norm; each head has its
            own LayerNorm on the tokens it reads, as in `deit_kd_cifar`).
        drop_rate: dropout after adding positions and before the head; also in the blocks unless `proj_drop_rate`.
        proj_drop_rate: dropout after the attention projection and in the MLP (None = `drop_rate`).
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth, linear 0 -> rate over the blocks.
        init_values: LayerScale init (None = off).
        norm_eps: LayerNorm epsilon.
        attn_impl: "sdpa" (fused) or "manual" (explicit softmax).
        weight_init: "timm" (trunc-normal 0.02 linears, zero biases) or "torch" (PyTorch default layer init).
        token_init: "timm" (CLS normal 1e-6), "trunc_normal" (CLS trunc-normal 0.02, DeiT's release) or "zeros"
            (CLS zeros); DIST and a learned position table are always trunc-normal 0.02. None = "timm" with
            timm weights, "zeros" with torch weights.
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
        embed_layer: str = "conv",
        num_cls_tokens: int = 1,
        cls_combine: str = "concat",
        distilled: bool = False,
        global_pool: str = "token",
        pos_embed: str = "learned",
        rel_pos_bias: bool = False,
        class_attn_depth: int = 0,
        head_norm: str = "shared",
        drop_rate: float = 0.0,
        proj_drop_rate: float | None = None,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        attn_impl: str = "sdpa",
        weight_init: str = "timm",
        token_init: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("pos_embed", pos_embed, POS_EMBEDS), ("global_pool", global_pool, POOLS),
            ("cls_combine", cls_combine, CLS_COMBINE), ("embed_layer", embed_layer, EMBED_LAYERS),
            ("head_norm", head_norm, HEAD_NORMS), ("weight_init", weight_init, WEIGHT_INITS),
        ):
            _check_choice(name, value, choices)
        _check_tokens(num_cls_tokens, global_pool, distilled, cls_combine, class_attn_depth, depth)
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_cls_tokens = num_cls_tokens
        self.distilled = distilled
        self.num_prefix_tokens = num_cls_tokens + int(distilled)
        self.cls_combine = cls_combine
        self.global_pool = global_pool
        self.pretrained_cfg = {"input_size": (in_chans, img_size, img_size)}

        self.patch_embed = _patch_embed(embed_layer, img_size, patch_size, in_chans, embed_dim, patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, embed_dim)) if num_cls_tokens else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self._init_pos_embed(pos_embed, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        self.rel_pos = self._rel_pos_biases(depth, num_heads) if rel_pos_bias else None
        block_args = dict(
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, mlp_bias=mlp_bias,
            drop=drop_rate if proj_drop_rate is None else proj_drop_rate, attn_drop=attn_drop_rate,
            init_values=init_values, norm_eps=norm_eps, attn_impl=attn_impl,
        )
        self.blocks = self._build_blocks(depth, class_attn_depth, drop_path_rate, block_args)
        self._init_norms(head_norm, norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)
        self._init_weights(weight_init, token_init or ("timm" if weight_init == "timm" else "zeros"))

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

    def _rel_pos_biases(self, depth: int, num_heads: int) -> nn.ModuleList:
        grid = self.patch_embed.grid_size
        return nn.ModuleList(
            RelPosBias2d(grid_size=grid, num_heads=num_heads, num_special=self.num_prefix_tokens) for _ in range(depth)
        )

    def _build_blocks(self, depth: int, ca_depth: int, dpr_max: float, block_args: dict) -> nn.ModuleList:
        dpr = drop_path_rates(dpr_max, depth)
        blocks = [Block(self.embed_dim, drop_path=dpr[i], **block_args) for i in range(depth - ca_depth)]
        blocks += [
            ClassTokenBlock(self.embed_dim, num_cls=self.num_cls_tokens, drop_path=dpr[i], **block_args)
            for i in range(depth - ca_depth, depth)
        ]
        return nn.ModuleList(blocks)

    def _init_norms(self, kind: str, eps: float) -> None:
        shared = kind == "shared"
        self.norm = nn.LayerNorm(self.embed_dim, eps=eps) if shared else nn.Identity()
        self.head_norm = nn.Identity() if shared else nn.LayerNorm(self.embed_dim, eps=eps)
        if self.distilled:
            self.head_dist_norm = nn.Identity() if shared else nn.LayerNorm(self.embed_dim, eps=eps)

    def _init_weights(self, weight_init: str, token_init: str) -> None:
        _check_choice("token_init", token_init, TOKEN_INITS)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if self.cls_token is not None and token_init == "timm":
            nn.init.normal_(self.cls_token, std=1e-6)
        elif self.cls_token is not None and token_init == "trunc_normal":
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if weight_init == "timm":
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
        """Tokens, the learned position table and the relative-position biases."""
        names = {"pos_embed", "cls_token", "dist_token"}
        return {n for n, _ in self.named_parameters() if n in names or n.startswith("rel_pos.")}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_in_features, num_classes) if num_classes else nn.Identity()
        if self.distilled:
            self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def prefix_tokens(self, B: int) -> list[torch.Tensor]:
        """Tokens placed before the patches, each (B, n_i, D): CLS tokens, then the DIST token."""
        tokens = [self.cls_token] if self.cls_token is not None else []
        tokens += [self.dist_token] if self.dist_token is not None else []
        return [t.expand(B, -1, -1) for t in tokens]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, k + N, D), normalised unless `head_norm="per_head"`."""
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([*self.prefix_tokens(x.shape[0]), x], dim=1)  # (B, k + N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        biases = stacked_biases(self.rel_pos) if self.rel_pos is not None else [None] * len(self.blocks)
        for blk, bias in zip(self.blocks, biases, strict=True):
            x = self.run_block(blk, x, bias)  # bias (h, k + N, k + N)
        return self.norm(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, k + N, D) -> features read by `head` (B, head_in_features)."""
        k = self.num_cls_tokens
        if self.global_pool == "avg":
            return self.head_norm(x[:, self.num_prefix_tokens :].mean(dim=1))
        cls = self.head_norm(x[:, :k])  # (B, k, D)
        return cls.flatten(1) if self.cls_combine == "concat" else cls.mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Tokens (B, k + N, D) -> logits (B, classes), or the pooled features if `pre_logits`.

        A distilled model in training mode returns (cls_logits, dist_logits); otherwise their mean (DeiT).
        """
        feat = self.head_drop(self._pool(x))
        if not self.distilled:
            return feat if pre_logits else self.head(feat)
        dist = self.head_drop(self.head_dist_norm(x[:, self.num_cls_tokens]))  # (B, D)
        if pre_logits:
            return (feat + dist) / 2
        logits, logits_dist = self.head(feat), self.head_dist(dist)
        return (logits, logits_dist) if self.training else (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor):
        """(B, C, H, W) -> logits (B, classes); a distilled model in training mode returns a pair."""
        return self.forward_head(self.forward_features(x))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_tokens(k: int, pool: str, distilled: bool, combine: str, ca_depth: int, depth: int) -> None:
    if pool == "token" and k < 1:
        raise ValueError("global_pool='token' needs at least one CLS token")
    if distilled and (pool != "token" or (k > 1 and combine != "mean")):
        raise ValueError("a distilled ViT needs global_pool='token', and cls_combine='mean' if num_cls_tokens > 1")
    if not 0 <= ca_depth <= depth or (ca_depth and k < 1):
        raise ValueError(f"class_attn_depth must be in [0, depth={depth}] and needs a CLS token, got {ca_depth}")


def _patch_embed(kind: str, img_size: int, patch_size: int, in_chans: int, dim: int, bias: bool) -> nn.Module:
    if kind == "conv_stem":
        return ConvStemPatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, stem_chs=dim,
                                  embed_dim=dim)
    return PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim, bias=bias)


def _vit(defaults: dict, kwargs: dict, cfg: dict | None = None) -> VisionTransformer:
    model = VisionTransformer(**{**defaults, **kwargs})
    model.pretrained_cfg.update(cfg or {})
    return model


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


@register_model
def minivit_cifar(**kwargs) -> VisionTransformer:
    """The Mini-ViT of AnanasClassic/ViT_SE_project (`src/models/mini_vit.py`; its training log prints 674,890
    trainable parameters), 93.5 % CIFAR-10 test top-1 there.

    Conv 4x4/4 patch embedding with bias (64 tokens); 2 zero-initialised CLS tokens, concatenated for the head
    (Linear(192, 10)); fixed 2-D sin-cos buffer (1, 66, 96) with zero CLS rows; 9 pre-norm blocks of D 96 / 12
    heads of width 8 / MLP 192; no bias on qkv, fc1 and fc2 (bias on proj); dropout 0.1; final LayerNorm; PyTorch
    default init. Count: 4,704 + 192 + 9 x 74,208 + 192 + 1,930 = 674,890. The multi-CLS design follows "Powerful
    Design of Small Vision Transformer on CIFAR10" (arXiv 2501.06220).
    """
    return _vit(
        dict(img_size=32, patch_size=4, num_classes=10, embed_dim=96, depth=9, num_heads=12, mlp_ratio=2.0,
             qkv_bias=False, mlp_bias=False, num_cls_tokens=2, pos_embed="sincos", proj_drop_rate=0.1,
             attn_drop_rate=0.1, norm_eps=1e-5, weight_init="torch"),
        kwargs, CIFAR10_NORM,
    )
