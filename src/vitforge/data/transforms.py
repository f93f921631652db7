"""Per-sample torchvision transforms v2 presets (worker path). They output uint8 (3, S, S); normalisation, random
erasing and mixing happen batched on the device afterwards, identically for both loader paths. The augmentations
themselves are declared in `vitforge.data.augmentations`."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from vitforge.config import AugConfig
from vitforge.data.augmentations import INTERPOLATION, Frame, worker_ops


def _to_image(x) -> tv_tensors.Image:
    return tv_tensors.Image(x) if isinstance(x, torch.Tensor) else v2.functional.to_image(x)


def train_transform(size: int, aug: AugConfig, *, small: bool, interpolation: str = "bilinear",
                    native: int | None = None) -> v2.Compose:
    """The worker path of `aug`'s pixel augmentations, in the order of `AUGMENTATIONS`.

    Small (cached) images: the augmentations at the images' own size `native` (or `aug.pre_resize`), then a resize
    to S — the same order as the device path, so a recipe augments identically on either path. Large images: their
    crop is a RandomResizedCrop straight to S (after the optional pre-resize)."""
    ops: list = [v2.Lambda(_to_image)]
    ops += worker_ops(aug, Frame(small=small, size=size, native=native, interpolation=interpolation))
    if small:
        ops.append(v2.Resize((size, size), interpolation=INTERPOLATION[interpolation], antialias=True))
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
