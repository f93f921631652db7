"""Every training augmentation, declared once: the `AugConfig` fields it reads, its op on the worker path
(torchvision.transforms.v2 per sample in DataLoader workers), its op on the device path (batched on the training
device, `vitforge.data.augment` / `vitforge.data.gpu_policies`), and what it teaches a model to ignore (read by
test-time augmentation to leave out views the model never saw).

    AUGMENTATIONS          the declarations, in the order both paths apply them
    worker_ops             the worker path's per-sample transforms of a config
    device_ops             the device path's batched ops of a config
    normalised_ops         ops on the normalised float batch (both paths, on the device)
    invariances            {"mirror", "shift"} for `vitforge.eval.tta.keep_views`

A new augmentation is one `AugConfig` field (or a few) and one `Augmentation` entry here. Stage "pixels" ops see
uint8 images before normalisation (one op per path, the two of them equal in distribution; tests check each against
torchvision); stage "normalised" ops see the normalised float batch on the device, for both paths. Randomness: the
worker ops draw from the per-sample seeded global generator (`vitforge.data.loader.SampleDataset`), the device ops
from the batch's (seed, epoch, batch) generator, so both paths are exactly reproducible on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torchvision.transforms import InterpolationMode, v2

from vitforge.config import AugConfig
from vitforge.data import augment as A
from vitforge.data import gpu_policies as G
from vitforge.errors import ConfigError

INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                 "nearest": InterpolationMode.NEAREST}
DeviceOp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (batch, generator) -> batch
INVARIANCES = ("mirror", "shift")


@dataclass(frozen=True)
class Frame:
    """What an op needs to know about the images besides the config.

    Attributes:
        small: images of at most 64 px kept decoded (the device-cache path); False: larger images decoded per sample.
        size: the model's input size S.
        native: the small images' own side (their working size before the final resize to S).
        interpolation: `data.interpolation` (resizes and crops use it; rotation and affine use nearest for
            "nearest" and bilinear otherwise, torchvision's tensor kernels having no bicubic warp).
    """

    small: bool = True
    size: int = 32
    native: int | None = None
    interpolation: str = "bilinear"

    def work_size(self, aug: AugConfig) -> int:
        """The side the pixel ops work at: the pre-resize, else the small images' own size, else S (the crop)."""
        return aug.pre_resize or (self.native or self.size if self.small else self.size)

    @property
    def warp_mode(self) -> str:
        return "nearest" if self.interpolation == "nearest" else "bilinear"


@dataclass(frozen=True)
class Augmentation:
    """One augmentation.

    Attributes:
        name: short name (README, errors).
        fields: the `AugConfig` fields it reads.
        active: whether the config switches it on for images of this frame.
        worker: its torchvision v2 transforms (worker path), built for an active config.
        device: its batched op `(batch, generator) -> batch` (device path), built for an active config.
        stage: "pixels" (uint8 images, before normalisation: `worker` on one path, `device` on the other) or
            "normalised" (the normalised float batch on the device: `device` on both paths, `worker` unused).
        policy: a per-sample random image policy: on a CPU with `backend=auto` the worker processes run it
            (alongside the training step) instead of the main process.
        invariances: what training with it teaches the model to ignore (subset of INVARIANCES).
    """

    name: str
    fields: tuple[str, ...]
    active: Callable[[AugConfig, Frame], bool]
    worker: Callable[[AugConfig, Frame], list]
    device: Callable[[AugConfig, Frame], DeviceOp]
    stage: str = "pixels"
    policy: bool = False
    invariances: Callable[[AugConfig, Frame], frozenset[str]] = lambda aug, frame: frozenset()


def crop_mode(aug: AugConfig, frame: Frame) -> str:
    """`data.aug.crop` resolved: pad or rrc (auto: pad for images of at most 64 px, rrc for larger ones)."""
    return ("pad" if frame.small else "rrc") if aug.crop == "auto" else aug.crop


def _crop_active(aug: AugConfig, frame: Frame) -> bool:
    return crop_mode(aug, frame) == "rrc" or aug.crop_padding > 0


def _padded_crop(aug: AugConfig, frame: Frame) -> bool:
    """crop_mode is pad; a ConfigError for images larger than 64 px, whose only crop is the random resized crop."""
    if crop_mode(aug, frame) != "pad":
        return False
    if not frame.small:
        raise ConfigError("data.aug.crop=pad: the padded random crop is for images of at most 64 px (kept on the "
                          "device); these images are larger: use rrc (or auto)")
    return True


def _crop_worker(aug: AugConfig, frame: Frame) -> list:
    if _padded_crop(aug, frame):
        return [v2.RandomCrop(frame.work_size(aug), padding=aug.crop_padding)]
    size = frame.work_size(aug) if frame.small else frame.size  # large images are cropped straight to S
    return [v2.RandomResizedCrop(size, scale=tuple(aug.rrc_scale), ratio=tuple(aug.rrc_ratio),
                                 interpolation=INTERPOLATION[frame.interpolation], antialias=True)]


def _crop_device(aug: AugConfig, frame: Frame) -> DeviceOp:
    if _padded_crop(aug, frame):
        return lambda x, gen: A.batch_crop(x, aug.crop_padding, gen)
    return partial(_rrc, scale=tuple(aug.rrc_scale), ratio=tuple(aug.rrc_ratio), mode=frame.interpolation)


def _rrc(x: torch.Tensor, gen: torch.Generator, *, scale, ratio, mode: str) -> torch.Tensor:
    return A.batch_random_resized_crop(x, gen, scale, ratio, mode)


def _color_jitter_args(aug: AugConfig) -> dict[str, float]:
    cj = aug.color_jitter
    return {"brightness": cj, "contrast": cj, "saturation": cj, "hue": aug.hue}


def _flag(name: str) -> Callable[[AugConfig, Frame], bool]:
    return lambda aug, frame: bool(getattr(aug, name))


def _affine_active(aug: AugConfig, frame: Frame) -> bool:
    return aug.affine_translate > 0 or aug.affine_scale != [1.0, 1.0] or aug.affine_shear > 0


def _affine_args(aug: AugConfig) -> dict:
    return {"translate": aug.affine_translate, "scale": tuple(aug.affine_scale), "shear": aug.affine_shear}


def _affine_worker(aug: AugConfig, frame: Frame) -> list:
    t, scale, shear = aug.affine_translate, tuple(aug.affine_scale), aug.affine_shear
    return [v2.RandomAffine(degrees=0, translate=(t, t) if t > 0 else None, scale=scale if scale != (1, 1) else None,
                            shear=(-shear, shear) if shear > 0 else None,
                            interpolation=INTERPOLATION[frame.warp_mode], fill=0)]


AUGMENTATIONS: tuple[Augmentation, ...] = (
    Augmentation(
        "pre_resize", ("pre_resize",), active=lambda aug, frame: aug.pre_resize is not None,
        worker=lambda aug, frame: [v2.Resize((aug.pre_resize, aug.pre_resize),
                                             interpolation=INTERPOLATION[frame.interpolation], antialias=True)],
        device=lambda aug, frame: lambda x, gen: A.resize_image(x, aug.pre_resize, frame.interpolation)),
    Augmentation(
        "crop", ("crop", "crop_padding", "rrc_scale", "rrc_ratio"), active=_crop_active, worker=_crop_worker,
        device=_crop_device, invariances=lambda aug, frame: frozenset({"shift"})),
    Augmentation(
        "hflip", ("hflip",), active=_flag("hflip"), worker=lambda aug, frame: [v2.RandomHorizontalFlip()],
        device=lambda aug, frame: A.batch_flip, invariances=lambda aug, frame: frozenset({"mirror"})),
    Augmentation(
        "rotate", ("rotate",), active=_flag("rotate"), policy=True,
        worker=lambda aug, frame: [v2.RandomRotation(aug.rotate, interpolation=INTERPOLATION[frame.warp_mode],
                                                     fill=0)],
        device=lambda aug, frame: G.RandomRotation(aug.rotate, frame.warp_mode)),
    Augmentation(
        "affine", ("affine_translate", "affine_scale", "affine_shear"), active=_affine_active, policy=True,
        worker=_affine_worker, device=lambda aug, frame: G.RandomAffine(**_affine_args(aug),
                                                                       interpolation=frame.warp_mode),
        invariances=lambda aug, frame: frozenset({"shift"} if aug.affine_translate > 0 else ())),
    Augmentation(
        "auto_augment", ("auto_augment",), active=_flag("auto_augment"), policy=True,
        worker=lambda aug, frame: [v2.AutoAugment(G.AA_POLICIES[aug.auto_augment])],
        device=lambda aug, frame: G.AutoAugment(aug.auto_augment)),
    Augmentation(
        "trivial_augment", ("trivial_augment",), active=_flag("trivial_augment"), policy=True,
        worker=lambda aug, frame: [v2.TrivialAugmentWide()], device=lambda aug, frame: G.TrivialAugmentWide()),
    Augmentation(
        "rand_augment", ("rand_augment",), active=_flag("rand_augment"), policy=True,
        worker=lambda aug, frame: [v2.RandAugment(*aug.rand_augment_args)],
        device=lambda aug, frame: G.RandAugment(*aug.rand_augment_args)),
    Augmentation(
        "color_jitter", ("color_jitter", "hue"), active=lambda aug, frame: aug.color_jitter > 0 or aug.hue > 0,
        policy=True, worker=lambda aug, frame: [v2.ColorJitter(**_color_jitter_args(aug))],
        device=lambda aug, frame: G.ColorJitter(**_color_jitter_args(aug))),
    Augmentation(
        "random_erasing", ("random_erasing", "erasing_scale"), active=lambda aug, frame: aug.random_erasing > 0,
        stage="normalised", worker=lambda aug, frame: [],
        device=lambda aug, frame: partial(_erase, p=aug.random_erasing, scale=tuple(aug.erasing_scale))),
)


def _erase(x: torch.Tensor, gen: torch.Generator, *, p: float, scale) -> torch.Tensor:
    return A.batch_erase(x, p, gen, scale=scale)


def active(aug: AugConfig, frame: Frame, stage: str = "pixels") -> list[Augmentation]:
    """The declarations `aug` switches on for `frame`, in application order."""
    return [a for a in AUGMENTATIONS if a.stage == stage and a.active(aug, frame)]


def worker_ops(aug: AugConfig, frame: Frame) -> list:
    """The worker path's per-sample transforms v2 of the pixel stage, in order."""
    return [t for a in active(aug, frame) for t in a.worker(aug, frame)]


def device_ops(aug: AugConfig, frame: Frame) -> list[tuple[Augmentation, DeviceOp]]:
    """The device path's batched ops of the pixel stage, in order, each with its declaration."""
    return [(a, a.device(aug, frame)) for a in active(aug, frame)]


def normalised_ops(aug: AugConfig, frame: Frame) -> list[DeviceOp]:
    """Ops on the normalised float batch (both paths, on the device), in order."""
    return [a.device(aug, frame) for a in active(aug, frame, "normalised")]


def has_policies(aug: AugConfig, frame: Frame = Frame()) -> bool:
    """Whether `aug` has a per-sample random policy (which `backend=auto` runs in CPU workers on a CPU)."""
    return any(a.policy for a in active(aug, frame))


def compose_policies(ops: list[tuple[Augmentation, DeviceOp]]) -> G.BatchPolicy | None:
    """The policies among `device_ops` composed in order (one policy alone as it is), or None."""
    policies = [op for a, op in ops if a.policy]
    if not policies:
        return None
    return policies[0] if len(policies) == 1 else G.Compose(policies)


def build_device_policy(aug: AugConfig, frame: Frame = Frame()) -> G.BatchPolicy | None:
    """The device path's per-sample policies of `aug` composed in order (one policy alone as it is), or None."""
    return compose_policies(device_ops(aug, frame))


def invariances(aug: AugConfig, frame: Frame) -> dict[str, bool]:
    """{"mirror": ..., "shift": ...}: whether training with `aug` made the model indifferent to mirroring
    (horizontal flips) and to small shifts (a random crop, or an affine translation)."""
    learned = set().union(*(a.invariances(aug, frame) for a in AUGMENTATIONS if a.active(aug, frame)))
    return {k: k in learned for k in INVARIANCES}
