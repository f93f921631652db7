"""DeiT family: ViTs with a distillation token.

Touvron et al., "Training data-efficient image transformers & distillation through attention" (ICML 2021, arXiv
2012.12877); official code facebookresearch/deit `models.py` (`DistilledVisionTransformer`), timm `timm/models/deit.py`.
ImageNet-1K top-1 (deit README): DeiT-Ti 72.2 -> 74.5 distilled, DeiT-S 79.9 -> 81.2, DeiT-B 81.8 -> 83.4.

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
    """The CIFAR-10 KD student of kiki101robo/AIRL_VIT-and-SAM2 (`q1.ipynb`, which prints 10,603,508 params).

    Conv stem (Conv3x3 3->256 no bias, BN, GELU at 32 px) + 4x4 unfold + Linear(4096, 256); [CLS, DIST, 64 patches]
    with a learned absolute position embedding; 12 pre-norm blocks of D 256 / 8 heads / MLP 1024 with 2-D relative
    position bias (3,880 params per block), the last 4 class-attention (CLS rows only); one LayerNorm + head per
    token, evaluation = mean of the two heads. Count: patch 1,056,256 + tokens 17,408 + 12 x 793,640 + heads 6,164.
    """
    return _vit(
        dict(img_size=32, patch_size=4, num_classes=10, embed_dim=256, depth=12, num_heads=8, embed_layer="conv_stem",
             distilled=True, rel_pos_bias=True, class_attn_depth=4, head_norm="per_head", proj_drop_rate=0.05,
             attn_drop_rate=0.05, drop_path_rate=0.15, norm_eps=1e-5, weight_init="torch", token_init="trunc_normal"),
        kwargs, CIFAR10_NORM,
    )
