"""DeiT family: ViTs with a distillation token (Touvron et al. 2021; ARCHITECTURES §3.1 and §5).

The architecture is `VisionTransformer(distilled=True)`: tokens [CLS, DIST, patches], a second head on the DIST
token, training returns (cls_logits, dist_logits) and evaluation their mean. Train them with
`vitforge.train.distill.DistillationLoss` (CE on the CLS head, KD from a teacher on the DIST head).
Token init follows the timm version DeiT was released with: CLS, DIST and positions trunc-normal(0.02).
"""

from __future__ import annotations

from vitforge.constants import CIFAR10_NORM, IMAGENET_NORM
from vitforge.models.registry import register_model
from vitforge.models.vit import VisionTransformer, _vit


@register_model
def deit_tiny_distilled_224(**kwargs) -> VisionTransformer:
    """DeiT-Ti distilled at 224 (timm `deit_tiny_distilled_patch16_224` layout, 5,910,800 params)."""
    return _vit(
        dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, distilled=True,
             token_init="trunc_normal"),
        kwargs, IMAGENET_NORM,
    )


@register_model
def deit_kd_cifar(**kwargs) -> VisionTransformer:
    """Seed 002 student (ARCHITECTURES §5), 10,603,508 params: conv stem + 4x4 unfold, [CLS, DIST, 64 patches],
    12 blocks of D 256 / 8 heads with 2-D relative position bias, the last 4 class-attention (CLS rows only),
    one LayerNorm + head per token."""
    return _vit(
        dict(img_size=32, patch_size=4, num_classes=10, embed_dim=256, depth=12, num_heads=8, embed_layer="conv_stem",
             distilled=True, rel_pos_bias=True, class_attn_depth=4, head_norm="per_head", proj_drop_rate=0.05,
             attn_drop_rate=0.05, drop_path_rate=0.15, norm_eps=1e-5, weight_init="torch", token_init="trunc_normal"),
        kwargs, CIFAR10_NORM,
    )
