"""Per-sample torchvision transforms v2 presets (worker path). They output uint8 (3, S, S); normalisation, random
erasing and mixing happen batched on the device afterwards, identically for both loader paths."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from vitforge.config import AugConfig

INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                 "nearest": InterpolationMode.NEAREST}
AA_POLICIES = {"cifar10": v2.AutoAugmentPolicy.CIFAR10, "imagenet": v2.AutoAugmentPolicy.IMAGENET,
               "svhn": v2.AutoAugmentPolicy.SVHN}


def _to_image(x) -> tv_tensors.Image:
    return tv_tensors.Image(x) if isinstance(x, torch.Tensor) else v2.functional.to_image(x)


def policy_ops(aug: AugConfig) -> list:
    """The per-sample random policies of `aug` (AutoAugment, TrivialAugmentWide, RandAugment, colour jitter)."""
    ops = []
    if aug.auto_augment:
        ops.append(v2.AutoAugment(AA_POLICIES[aug.auto_augment]))
    if aug.trivial_augment:
        ops.append(v2.TrivialAugmentWide())
    if aug.rand_augment:
        n, m = aug.rand_augment[1:].split("m")
        ops.append(v2.RandAugment(num_ops=int(n), magnitude=int(m)))
    if aug.color_jitter > 0:
        cj = aug.color_jitter
        ops.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    return ops


def has_policies(aug: AugConfig) -> bool:
    return bool(policy_ops(aug))


def train_transform(size: int, aug: AugConfig, *, small: bool, interpolation: str = "bilinear",
                    native: int | None = None) -> v2.Compose:
    """Small (cached) images: random crop with padding + flip + policies at the images' own size `native`, then
    resize to S — the same order as the device path, so a recipe augments identically on either path.
    Large images: RandomResizedCrop(S, scale) + flip + policies."""
    interp = INTERPOLATION[interpolation]
    ops: list = [v2.Lambda(_to_image)]
    if small:
        if aug.crop_padding:
            ops.append(v2.RandomCrop(native or size, padding=aug.crop_padding))
    else:
        ops.append(v2.RandomResizedCrop(size, scale=tuple(aug.rrc_scale), interpolation=interp, antialias=True))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += policy_ops(aug)
    if small:
        ops.append(v2.Resize((size, size), interpolation=interp, antialias=True))
    ops.append(v2.ToDtype(torch.uint8, scale=True))
    return v2.Compose(ops)


def eval_transform(size: int, *, crop_pct: float = 1.0, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the shorter side to S / crop_pct, centre-crop S (timm/torchvision evaluation convention)."""
    interp = INTERPOLATION[interpolation]
    resize = int(round(size / crop_pct))
    return v2.Compose([
        v2.Lambda(_to_image),
        v2.Resize(resize, interpolation=interp, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.uint8, scale=True),
    ])
