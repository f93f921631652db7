"""From a `DataConfig` to device batches: open sources, split, choose the loader path, finish batches on the device.

    open_data(cfg)  -> OpenedData (sources, split indices, classes, unreadable-image report)
    Preprocess      -> what a checkpoint needs to feed its model (size, mean, std, interpolation, crop)
    build_train_stream / build_eval_stream -> iterables of normalised float batches on the device
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitforge.config import AugConfig, DataConfig, MixConfig
from vitforge.data import augment as A
from vitforge.data.cache import decode_all
from vitforge.data.gpu_policies import build_device_policy
from vitforge.data.images import image_size
from vitforge.data.loader import DeviceLoader, SampleDataset, WorkerLoader
from vitforge.data.sources import FileListSource, Source, check_same_classes, default_cache_dir, open_source
from vitforge.data.split import stratified_folds, stratified_split, stratified_subset
from vitforge.data.transforms import eval_transform, has_policies, train_transform
from vitforge.errors import DataError

log = logging.getLogger("vitforge.data")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SMALL_IMAGE = 64  # images up to this side take the decode-once, keep-on-device path


@dataclass
class Preprocess:
    """How a model's inputs are made; stored in every checkpoint."""

    img_size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    kind: str = "image"  # "image": uint8 RGB normalised here; "features": float tensors used as they are (HSI)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    """A source and the items of it that form one split (labels already mapped to the training classes)."""

    source: Source
    indices: np.ndarray
    labels: np.ndarray  # (len(source),) int64 in the training class space

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class OpenedData:
    classes: list[str]
    train: Split
    val: Split | None
    notes: list[str] = field(default_factory=list)


class ConcatSource(Source):
    """Several sources with the same class list, one after the other (training data + `data.extra`)."""

    def __init__(self, parts: list[Source], labels: list[np.ndarray]):
        self.parts = parts
        self.classes = parts[0].classes
        self.labels = np.concatenate(labels)
        self.ids = [i for p in parts for i in p.ids]
        self.origin = " + ".join(p.origin for p in parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def load(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k].load(i - int(self.offsets[k]))

    def fingerprint(self) -> str:
        return " + ".join(p.fingerprint() for p in self.parts)


class FeatureSource(Source):
    """Items that are already model inputs (float tensors), e.g. hyperspectral patches (N, 1, C, P, P)."""

    def __init__(self, features: torch.Tensor, labels, classes: list[str], ids: list[str], origin: str):
        self.features, self.labels = features, np.asarray(labels, dtype=np.int64)
        self.classes, self.ids, self.origin = classes, ids, origin

    def load(self, i: int):
        raise DataError(f"{self.origin}: items are feature tensors, not images")


HSI_SUFFIXES = (".mat", ".npy")


def is_hyperspectral(path: str) -> bool:
    return Path(path).suffix.lower() in HSI_SUFFIXES


def open_hsi(cube: str, cfg: DataConfig) -> tuple[FeatureSource, np.ndarray, np.ndarray]:
    """A hyperspectral scene as a `FeatureSource` of patches, with its (train, held-out) split (`data.hsi`)."""
    from vitforge.data.hyperspectral import load_hyperspectral

    h = cfg.hsi
    if not h.gt:
        raise DataError(f"{cube}: a hyperspectral cube needs its ground truth: set data.hsi.gt=<file>")
    if not h.extra_band:
        raise DataError(f"{cube}: SClusterFormer's morphological branch needs the extra (EMAP) band: set "
                        f"data.hsi.extra_band=<file> (upstream: PaviaU_EMAP.mat, data.hsi.extra_key=Feature_E)")
    p = load_hyperspectral(cube, h.gt, extra_band=h.extra_band, cube_key=h.cube_key, gt_key=h.gt_key,
                           extra_key=h.extra_key, pca_components=h.pca_components, patch_size=h.patch_size,
                           train_fraction=h.train_fraction, seed=h.seed, class_names=h.class_names)
    ids = [f"r{r}c{c}" for r, c in p.positions.tolist()]
    src = FeatureSource(torch.from_numpy(p.patches), p.labels, p.classes, ids, str(cube))
    return src, p.train_idx, p.test_idx


def open_data(cfg: DataConfig, *, cache_dir: Path | None = None) -> OpenedData:
    """Open the training (and validation) sources and split them. All path and class problems surface here."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir or default_cache_dir()
    if is_hyperspectral(cfg.train):
        src, tr_idx, te_idx = open_hsi(cfg.train, cfg)
        if cfg.limit:
            tr_idx = stratified_subset(tr_idx, src.labels, cfg.limit, cfg.split_seed)
        return OpenedData(src.classes, Split(src, tr_idx, src.labels), Split(src, te_idx, src.labels))
    train = open_source(cfg.train, download=cfg.download, cache_dir=cache_dir)
    if len(train) == 0:
        raise DataError(f"{cfg.train}: no images")
    if not train.labeled:
        raise DataError(f"{cfg.train}: training data needs labels (class folders, a parquet label column, or a CSV "
                        f"column named label, class, target or class_name)")
    own = len(train)  # items of data.train itself (folds never hold data.extra items)
    if cfg.extra:
        extra = open_source(cfg.extra, cache_dir=cache_dir)
        train = ConcatSource([train, extra], [train.labels, check_same_classes(train, extra, "data.extra")])
    labels = train.labels
    if cfg.val:
        val_src = open_source(cfg.val, download=cfg.download, cache_dir=cache_dir)
        val = Split(val_src, np.arange(len(val_src)), check_same_classes(train, val_src, "data.val"))
        tr_idx = np.arange(len(train))
    elif cfg.folds:
        tr_idx, va_idx = stratified_folds(labels[:own], cfg.folds, cfg.split_seed, train.classes)[cfg.fold]
        tr_idx = np.concatenate([tr_idx, np.arange(own, len(train))])
        val = Split(train, va_idx, labels)
    else:  # the held-out split comes from data.train alone; data.extra items only ever train
        tr_idx, va_idx = stratified_split(labels[:own], cfg.val_split, cfg.split_seed, train.classes)
        tr_idx = np.concatenate([tr_idx, np.arange(own, len(train))])
        val = Split(train, va_idx, labels) if len(va_idx) else None
    if cfg.limit:
        tr_idx = stratified_subset(tr_idx, labels, cfg.limit, cfg.split_seed)
    return OpenedData(train.classes, Split(train, tr_idx, labels), val)


def is_small(source: Source, probe: int = 16) -> bool:
    """True when the images are at most SMALL_IMAGE pixels on a side (checked on up to `probe` items per part)."""
    if isinstance(source, ConcatSource):
        return all(is_small(p, probe) for p in source.parts)
    arr = source.array()
    if arr is not None:
        return max(arr.shape[1:3]) <= SMALL_IMAGE
    if isinstance(source, FileListSource):
        step = max(1, len(source) // probe)
        sizes = [image_size(f) for f in source.files[::step][:probe]]
        sizes = [s for s in sizes if s]
        return bool(sizes) and max(max(s) for s in sizes) <= SMALL_IMAGE
    return max(source.load(0).size) <= SMALL_IMAGE


def native_size(source: Source) -> int | None:
    arr = source.array()
    if arr is not None:
        return int(max(arr.shape[1:3]))
    try:
        return int(max(source.load(0).size))
    except Exception:
        return None


def channel_stats(images: torch.Tensor, limit: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-1 scale) of up to `limit` uint8 images (N, 3, H, W), spread over the whole set
    (sources are often sorted by class)."""
    x = images[:: max(1, -(-len(images) // limit))].float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


@dataclass
class Cached:
    """A split decoded to uint8 on a device."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    ids: list[str]
    bad: list[str]


def decode_split(split: Split, *, size: int | None, device: torch.device, cache_dir: Path | None) -> Cached:
    """Decode the split's items (via the on-disk cache) and move them to `device`. Corrupt images are dropped."""
    if isinstance(split.source, FeatureSource):
        idx = torch.from_numpy(split.indices)
        return Cached(split.source.features[idx].to(device), torch.from_numpy(split.labels[split.indices]).to(device),
                      [split.source.ids[i] for i in split.indices], [])
    dec = decode_all(split.source, size, cache_dir, split.indices)
    pos = np.full(len(split.source), -1, dtype=np.int64)
    pos[dec.keep] = np.arange(len(dec.keep))
    rows = pos[split.indices]
    rows = rows[rows >= 0]
    keep_src = dec.keep[rows]
    if len(rows) == 0:
        raise DataError(f"{split.source.origin}: no decodable images ({len(dec.bad)} unreadable, e.g. "
                        f"{dec.bad[0] if dec.bad else 'none'})")
    images = dec.images[torch.from_numpy(rows)].to(device)
    labels = torch.from_numpy(split.labels[keep_src]).to(device)
    bad_here = [b for b in dec.bad if b]  # names of every undecodable item of the source
    return Cached(images, labels, [split.source.ids[i] for i in keep_src], bad_here)


class TrainStream:
    """Training batches on the device: (x normalised float (B, 3, S, S), target, idx).

    `target` is class indices, or soft targets when the batch was mixed (Mixup/CutMix with label smoothing).
    Device path: crop + flip + per-sample policies (AutoAugment, ...; `gpu_policies`) happen here on uint8;
    worker path: they already happened per sample.
    """

    def __init__(self, loader, pre: Preprocess, *, aug: AugConfig, mix: MixConfig, num_classes: int, seed: int,
                 device: torch.device, on_device_aug: bool):
        self.loader, self.pre, self.aug, self.mix = loader, pre, aug, mix
        self.num_classes, self.seed, self.device = num_classes, seed, device
        self.on_device_aug = on_device_aug
        self.policy = build_device_policy(aug) if on_device_aug else None
        self.mean = torch.tensor(pre.mean, device=device)
        self.std = torch.tensor(pre.std, device=device)
        self.epoch, self.start_batch, self.smoothing = 0, 0, 0.0

    def set_epoch(self, epoch: int, start_batch: int = 0, smoothing: float = 0.0) -> None:
        self.epoch, self.start_batch, self.smoothing = epoch, start_batch, smoothing
        self.loader.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.loader)

    def mixing(self) -> bool:
        return self.mix.enabled and (self.mix.off_epoch is None or self.epoch < self.mix.off_epoch)

    def __iter__(self):
        for b, (x, y, idx) in enumerate(self.loader, start=self.start_batch):
            gen = A.step_generator(self.device, self.seed, self.epoch, b)
            if self.pre.kind == "features":
                yield (*self._mix(x, y, b), idx)
                continue
            if self.on_device_aug:
                x = A.batch_crop(x, self.aug.crop_padding, gen)
                if self.aug.hflip:
                    x = A.batch_flip(x, gen)
                if self.policy is not None:
                    x = self.policy(x, gen)
            x = A.batch_resize(A.normalize(x, self.mean, self.std), self.pre.img_size)
            x = A.batch_erase(x, self.aug.random_erasing, gen)
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

    def __init__(self, loader, pre: Preprocess, ids: list[str], device: torch.device):
        self.loader, self.pre, self.ids = loader, pre, ids
        self.mean = torch.tensor(pre.mean, device=device)
        self.std = torch.tensor(pre.std, device=device)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def bad(self) -> list[str]:
        return sorted(getattr(self.loader, "bad", ()))

    def __iter__(self):
        for x, y, idx in self.loader:
            if self.pre.kind == "features":
                yield x, y, idx
            else:
                yield A.batch_resize(A.normalize(x, self.mean, self.std), self.pre.img_size), y, idx


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


def readable_items(split: Split) -> tuple[Split, list[str]]:
    """Drop files whose header cannot be read (named in the returned list); sources in memory pass unchanged."""
    src = split.source
    if not isinstance(src, FileListSource):
        return split, []
    ok = np.array([image_size(src.files[i]) is not None for i in split.indices], dtype=bool)
    bad = [f"{src.ids[i]}: cannot decode image" for i in split.indices[~ok]]
    if not ok.any():
        raise DataError(f"{src.origin}: no decodable images ({len(bad)} unreadable, e.g. {bad[0]})")
    return Split(src, split.indices[ok], split.labels), bad


def use_device_cache(split: Split, mode: str) -> bool:
    if isinstance(split.source, FeatureSource):
        return True
    return mode == "on" or (mode == "auto" and is_small(split.source))


def build_eval_stream(split: Split, pre: Preprocess, opt: StreamOptions) -> EvalStream:
    """Evaluation stream over a split (every item once; rank r takes items r, r+world, ...)."""
    if use_device_cache(split, opt.device_cache):
        c = decode_split(split, size=None, device=opt.device, cache_dir=opt.cache_dir)
        if c.bad:
            log.warning("%d unreadable image(s) skipped, e.g. %s", len(c.bad), c.bad[0])
        loader = DeviceLoader(c.images, c.labels, opt.batch_size, train=False, rank=opt.rank, world=opt.world)
        stream = EvalStream(loader, pre, c.ids, opt.device)
        stream.decode_bad = c.bad
        return stream
    split, bad = readable_items(split)
    src = split.source
    ds = SampleDataset(LoadItems(src, split.indices), split.labels[split.indices],
                       eval_transform(pre.img_size, crop_pct=pre.crop_pct, interpolation=pre.interpolation),
                       [src.ids[i] for i in split.indices], size=pre.img_size, replace_bad=False)
    loader = WorkerLoader(ds, opt.batch_size, train=False, num_workers=opt.num_workers, device=opt.device,
                          rank=opt.rank, world=opt.world)
    stream = EvalStream(loader, pre, ds.ids, opt.device)
    stream.decode_bad = bad
    return stream


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
            stream = TrainStream(loader, pre, aug=aug, mix=cfg.mix, num_classes=num_classes, seed=opt.seed,
                                 device=opt.device, on_device_aug=True)
            stream.decode_bad = c.bad
            return stream
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
    stream = TrainStream(loader, pre, aug=aug, mix=cfg.mix, num_classes=num_classes, seed=opt.seed,
                         device=opt.device, on_device_aug=False)
    stream.decode_bad = bad
    return stream


def policies_on_device(aug: AugConfig, device: torch.device) -> bool:
    """Per-sample policies of small images run batched on the device for backend=device, and for backend=auto on
    CUDA (on a CPU the worker processes run them in parallel with the training step)."""
    return aug.backend == "device" or (aug.backend == "auto" and device.type == "cuda")


def resolve_preprocess(cfg: DataConfig, split: Split, model_cfg: dict, *, pretrained: bool,
                       device_cache: bool, cache_dir: Path | None) -> Preprocess:
    """Input size and normalisation: explicit config > the model's pretrained config > training-set statistics
    (small images) > ImageNet's. Feature tensors (hyperspectral patches) are used as they are."""
    if isinstance(split.source, FeatureSource):
        return Preprocess(int(split.source.features.shape[-1]), [0.0] * 3, [1.0] * 3, kind="features")
    size = cfg.img_size or int(model_cfg.get("input_size", (3, 0, 0))[-1]) or native_size(split.source) or 224
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:
        if pretrained and "mean" in model_cfg:
            m, s = list(model_cfg["mean"]), list(model_cfg["std"])
        elif device_cache:
            c = decode_split(split, size=None, device=torch.device("cpu"), cache_dir=cache_dir)
            m, s = channel_stats(c.images)
        else:
            m, s = IMAGENET_MEAN, IMAGENET_STD
        mean, std = mean or m, std or s
    interp = model_cfg.get("interpolation", cfg.interpolation) if pretrained else cfg.interpolation
    crop = model_cfg.get("crop_pct", cfg.crop_pct) if pretrained and cfg.crop_pct == 1.0 else cfg.crop_pct
    return Preprocess(int(size), [float(v) for v in mean], [float(v) for v in std], interp, float(crop))
