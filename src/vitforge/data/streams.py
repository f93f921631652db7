"""Batches on the device for training and evaluation, from a `Split` and its `Preprocess`.

    build_train_stream / build_eval_stream -> iterables of normalised float batches on the device

Two paths: small images decoded once and augmented in batches on the device (`vitforge.data.decoded`, the device
ops of `vitforge.data.augmentations`), or DataLoader workers running torchvision transforms v2 per sample
(`vitforge.data.transforms`, `vitforge.data.loader`). Which augmentations run, and in which order, is read from the
declarations in `vitforge.data.augmentations`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitforge.config import AugConfig, DataConfig, MixConfig
from vitforge.data import augment as A
from vitforge.data.augmentations import Frame, compose_policies, device_ops, has_policies, normalised_ops
from vitforge.data.dataset import FeatureSource, Split, readable_items
from vitforge.data.decoded import SMALL_IMAGE, decode_split, use_device_cache
from vitforge.data.loader import DeviceLoader, SampleDataset, WorkerLoader
from vitforge.data.preprocess import Preprocess
from vitforge.data.sources import Source
from vitforge.data.transforms import eval_transform, train_transform
from vitforge.errors import ConfigError, DataError

log = logging.getLogger("vitforge.data")


class TrainStream:
    """Training batches on the device: (x normalised float (B, 3, S, S), target, idx).

    `target` is class indices, or soft targets when the batch was mixed (Mixup/CutMix with label smoothing).
    Device path: the pixel augmentations (`augmentations.device_ops`: crop, flip, ..., then the per-sample policies
    composed as `policy`) happen here on uint8; worker path: they already happened per sample. Both paths: the
    normalised-batch ops (random erasing), then mixing in the epochs `MixConfig.active` selects (of `epochs`).
    """

    def __init__(self, loader, pre: Preprocess, *, aug: AugConfig, mix: MixConfig, num_classes: int, seed: int,
                 device: torch.device, on_device_aug: bool, skipped: list[str], epochs: int | None = None):
        self.loader, self.pre, self.aug, self.mix = loader, pre, aug, mix
        self.skipped = skipped  # items left out before training because they could not be decoded
        self.num_classes, self.seed, self.device, self.epochs = num_classes, seed, device, epochs
        self.on_device_aug = on_device_aug
        frame = Frame(small=True, size=pre.img_size, interpolation=pre.interpolation)  # device ops read the size
        pixel_ops = device_ops(aug, frame) if on_device_aug else []
        self.ops = [op for a, op in pixel_ops if not a.policy]  # pre-resize, crop, flip: declared before the policies
        self.policy = compose_policies(pixel_ops)  # the per-sample policies, in order; None if none
        self.after_normalise = normalised_ops(aug, frame)
        if mix.enabled and epochs is None and (0 < mix.on_epoch < 1 or 0 < (mix.off_epoch or 0) < 1):
            raise ConfigError("data.mix.on_epoch/off_epoch: a fraction of the run needs its number of epochs "
                              "(StreamOptions.epochs)")
        self.mean = torch.tensor(pre.mean, device=device)
        self.std = torch.tensor(pre.std, device=device)
        self.epoch, self.start_batch, self.smoothing = 0, 0, 0.0

    def set_epoch(self, epoch: int, start_batch: int = 0, smoothing: float = 0.0) -> None:
        self.epoch, self.start_batch, self.smoothing = epoch, start_batch, smoothing
        self.loader.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def bad(self) -> list[str]:
        """Every item named undecodable: before the stream was built, or by a worker while iterating."""
        return sorted(set(self.skipped) | self.loader.bad)

    def mixing(self) -> bool:
        """Whether this epoch's batches are mixed (`MixConfig.active`: enabled, on_epoch <= epoch < off_epoch)."""
        return self.mix.active(self.epoch, self.epochs or 0)

    def __iter__(self):
        for b, (x, y, idx) in enumerate(self.loader, start=self.start_batch):
            gen = A.step_generator(self.device, self.seed, self.epoch, b)
            if self.pre.kind == "features":
                yield (*self._mix(x, y, b), idx)
                continue
            for op in self.ops:
                x = op(x, gen)
            if self.policy is not None:
                x = self.policy(x, gen)
            x = A.batch_resize(A.normalize(x, self.mean, self.std), self.pre.img_size)
            for op in self.after_normalise:
                x = op(x, gen)
            yield (*self._mix(x, y, b), idx)

    def _mix(self, x: torch.Tensor, y: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.mixing():
            return x, y
        rng = np.random.default_rng([self.seed, self.epoch, b, 31])
        return A.mix_batch(x, y, num_classes=self.num_classes, smoothing=self.smoothing,
                           mixup_alpha=self.mix.mixup_alpha, cutmix_alpha=self.mix.cutmix_alpha, prob=self.mix.prob,
                           switch_prob=self.mix.switch_prob, rng=rng)


class EvalStream:
    """Evaluation batches on the device: (x normalised float, labels, idx); idx indexes the stream's `ids`."""

    def __init__(self, loader, pre: Preprocess, ids: list[str], device: torch.device, skipped: list[str]):
        self.loader, self.pre, self.ids = loader, pre, ids
        self.skipped = skipped  # items left out before evaluation because they could not be decoded
        self.mean = torch.tensor(pre.mean, device=device)
        self.std = torch.tensor(pre.std, device=device)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def bad(self) -> list[str]:
        """Every item named undecodable: before the stream was built, or by a worker while iterating."""
        return sorted(set(self.skipped) | self.loader.bad)

    def __iter__(self):
        for x, y, idx in self.loader:
            if self.pre.kind == "features":
                yield x, y, idx
            else:
                yield finish_eval_batch(x, self.pre, self.mean, self.std), y, idx


def finish_eval_batch(x: torch.Tensor, pre: Preprocess, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The last evaluation step, on the device: uint8 (B, 3, H, W) -> normalised float (B, 3, S, S) (resized when
    H, W != S, i.e. for small images kept at their own size)."""
    return A.batch_resize(A.normalize(x, mean, std), pre.img_size)


class ImageInputs:
    """Model inputs for single decoded images, made exactly as the evaluation stream makes them (`vitforge predict`
    on a folder holding the image): a server feeds images one by one through this, never a second preprocessing
    path.

    An image of at most `SMALL_IMAGE` px a side takes the decode-once path (kept at its own size, normalised, then
    resized on the float tensor); a larger one the worker path (`eval_transform`: shorter side to S / crop_pct,
    centre crop S).
    """

    def __init__(self, pre: Preprocess, device: torch.device | str = "cpu"):
        if pre.kind != "image":
            raise DataError(f"the model takes {pre.kind} tensors (e.g. hyperspectral patches), not images")
        self.pre = pre
        self.transform = eval_transform(pre.img_size, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
        self.mean = torch.tensor(pre.mean, device=device)
        self.std = torch.tensor(pre.std, device=device)

    def uint8(self, img) -> torch.Tensor:
        """An RGB PIL image -> uint8 (3, H, W) as a loader delivers it."""
        if max(img.size) <= SMALL_IMAGE:
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        return self.transform(img)

    def __call__(self, img) -> torch.Tensor:
        """An RGB PIL image -> normalised float (3, S, S) on the device."""
        x = self.uint8(img).to(self.mean.device)
        return finish_eval_batch(x[None], self.pre, self.mean, self.std)[0]


@dataclass
class StreamOptions:
    batch_size: int
    device: torch.device
    seed: int = 0
    rank: int = 0
    world: int = 1
    num_workers: int = 2
    device_cache: str = "auto"
    cache_dir: Path | None = None
    epochs: int | None = None  # the run's train.epochs (resolves a mixing window given as fractions of the run)


def build_eval_stream(split: Split, pre: Preprocess, opt: StreamOptions) -> EvalStream:
    """Evaluation stream over a split (every item once; rank r takes items r, r+world, ...)."""
    if use_device_cache(split, opt.device_cache):
        c = decode_split(split, size=None, device=opt.device, cache_dir=opt.cache_dir)
        if c.bad:
            log.warning("%d unreadable image(s) skipped, e.g. %s", len(c.bad), c.bad[0])
        loader = DeviceLoader(c.images, c.labels, opt.batch_size, train=False, rank=opt.rank, world=opt.world)
        return EvalStream(loader, pre, c.ids, opt.device, skipped=c.bad)
    split, bad = readable_items(split)
    src = split.source
    ds = SampleDataset(LoadItems(src, split.indices), split.labels[split.indices],
                       eval_transform(pre.img_size, crop_pct=pre.crop_pct, interpolation=pre.interpolation),
                       [src.ids[i] for i in split.indices], size=pre.img_size, replace_bad=False)
    loader = WorkerLoader(ds, opt.batch_size, train=False, num_workers=opt.num_workers, device=opt.device,
                          rank=opt.rank, world=opt.world)
    return EvalStream(loader, pre, ds.ids, opt.device, skipped=bad)


class LoadItems:
    """`load(i)` of a split's i-th item; a picklable class (not a lambda) so DataLoader workers can be spawned."""

    def __init__(self, source: Source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __call__(self, i: int):
        return self.source.load(int(self.indices[i]))


class TensorRows:
    """Row i of a decoded uint8 tensor (picklable, for spawned workers)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __call__(self, i: int) -> torch.Tensor:
        return self.images[i]


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights 1/count(class): every class is drawn equally often."""
    counts = np.bincount(labels)
    return 1.0 / counts[labels]


def build_train_stream(split: Split, pre: Preprocess, cfg: DataConfig, opt: StreamOptions, *, num_classes: int,
                       balanced: bool = False) -> TrainStream:
    """Training stream: device path when images are small and no per-sample policy needs CPU workers.

    `balanced` draws samples with probability 1/count(class) (imbalanced folders) instead of a permutation.
    """
    aug = cfg.aug
    small = use_device_cache(split, opt.device_cache)
    features = isinstance(split.source, FeatureSource)  # e.g. hyperspectral patches: no image augmentation
    policies_on_cpu = has_policies(aug) and not policies_on_device(aug, opt.device) and not features
    common = dict(train=True, seed=opt.seed, repeats=aug.repeats, rank=opt.rank, world=opt.world)
    if small:
        c = decode_split(split, size=None, device=opt.device if not policies_on_cpu else torch.device("cpu"),
                         cache_dir=opt.cache_dir)
        if c.bad:
            log.warning("%d unreadable image(s) skipped, e.g. %s", len(c.bad), c.bad[0])
        common["weights"] = balanced_weights(c.labels.cpu().numpy()) if balanced else None
        if not policies_on_cpu:
            loader = DeviceLoader(c.images, c.labels, opt.batch_size, **common)
            return TrainStream(loader, pre, aug=aug, mix=cfg.mix, num_classes=num_classes, seed=opt.seed,
                               device=opt.device, on_device_aug=True, skipped=c.bad, epochs=opt.epochs)
        images, labels = c.images, c.labels.numpy()
        native = int(images.shape[-1])
        ds = SampleDataset(TensorRows(images), labels, train_transform(pre.img_size, aug, small=True,
                           interpolation=pre.interpolation, native=native), c.ids, size=pre.img_size,
                           replace_bad=True)
        bad = c.bad
    else:
        split, bad = readable_items(split)
        src = split.source
        ds = SampleDataset(LoadItems(src, split.indices), split.labels[split.indices],
                           train_transform(pre.img_size, aug, small=False, interpolation=pre.interpolation),
                           [src.ids[i] for i in split.indices], size=pre.img_size, replace_bad=True)
    if not small:
        common["weights"] = balanced_weights(ds.labels) if balanced else None
    loader = WorkerLoader(ds, opt.batch_size, num_workers=opt.num_workers, device=opt.device, **common)
    return TrainStream(loader, pre, aug=aug, mix=cfg.mix, num_classes=num_classes, seed=opt.seed,
                       device=opt.device, on_device_aug=False, skipped=bad, epochs=opt.epochs)


def policies_on_device(aug: AugConfig, device: torch.device) -> bool:
    """Per-sample policies of small images run batched on the device for backend=device, and for backend=auto on
    CUDA (on a CPU the worker processes run them in parallel with the training step)."""
    return aug.backend == "device" or (aug.backend == "auto" and device.type == "cuda")
