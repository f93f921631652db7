"""What a `DataConfig` opens: the training classes and the train / held-out `Split`s of one or more sources.

    open_data(cfg) -> OpenedData(classes, train Split, val Split | None)

A `Split` is a source plus the item indices that form one split, with labels already mapped to the training
classes. Hyperspectral scenes (.mat/.npy) come in as a `FeatureSource` of patches with their own train/test split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitforge.config import DataConfig
from vitforge.data.hyperspectral import load_hyperspectral
from vitforge.data.images import ImageError, image_header
from vitforge.data.inputs import AUTO, resolve_auto
from vitforge.data.sources import (
    FileListSource,
    Source,
    SyntheticSource,
    check_same_classes,
    default_cache_dir,
    open_source,
)
from vitforge.data.split import stratified_folds, stratified_split, stratified_subset
from vitforge.errors import DataError


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


def model_inputs(source: Source) -> Source:
    """`source`, or a `FeatureSource` of its tensors when its items are not RGB images (synthetic with C != 3)."""
    if isinstance(source, SyntheticSource) and source.channels != 3:
        return FeatureSource(torch.from_numpy(source.features()), source.labels, source.classes, source.ids,
                             source.origin)
    return source


def open_inputs(spec: str, **kwargs) -> Source:
    """`open_source` followed by `model_inputs`."""
    return model_inputs(open_source(spec, **kwargs))


HSI_SUFFIXES = (".mat", ".npy")


def is_hyperspectral(path: str) -> bool:
    return Path(path).suffix.lower() in HSI_SUFFIXES


def open_hsi(cube: str, cfg: DataConfig) -> tuple[FeatureSource, np.ndarray, np.ndarray]:
    """A hyperspectral scene as a `FeatureSource` of patches, with its (train, held-out) split (`data.hsi`)."""
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
    if cfg.train == AUTO:  # the training data under the platform's input directory (`vitforge.data.inputs`)
        cfg = dataclasses.replace(cfg, train=resolve_auto(cfg.train, "train"))
    if is_hyperspectral(cfg.train):
        src, tr_idx, te_idx = open_hsi(cfg.train, cfg)
        if cfg.limit:
            tr_idx = stratified_subset(tr_idx, src.labels, cfg.limit, cfg.split_seed)
        return OpenedData(src.classes, Split(src, tr_idx, src.labels), Split(src, te_idx, src.labels))
    train = open_inputs(cfg.train, download=cfg.download, cache_dir=cache_dir, max_pixels=cfg.max_image_pixels)
    if len(train) == 0:
        raise DataError(f"{cfg.train}: no images")
    if not train.labeled:
        raise DataError(f"{cfg.train}: training data needs labels (class folders, a parquet label column, or a CSV "
                        f"column named label, class, target or class_name)")
    own = len(train)  # items of data.train itself (folds never hold data.extra items)
    if cfg.extra:
        extra = open_inputs(cfg.extra, cache_dir=cache_dir, max_pixels=cfg.max_image_pixels)
        train = ConcatSource([train, extra], [train.labels, check_same_classes(train.classes, extra, "data.extra")])
    labels = train.labels
    if cfg.val:
        val_src = open_inputs(cfg.val, download=cfg.download, cache_dir=cache_dir, max_pixels=cfg.max_image_pixels)
        val = Split(val_src, np.arange(len(val_src)), check_same_classes(train.classes, val_src, "data.val"))
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


def readable_items(split: Split) -> tuple[Split, list[str]]:
    """Drop files whose header cannot be read or that are over the source's pixel limit (named in the returned
    list, with the reason); sources in memory pass unchanged."""
    src = split.source
    if not isinstance(src, FileListSource):
        return split, []
    problems = [_header_problem(src.files[i], src.max_pixels) for i in split.indices]
    ok = np.array([p is None for p in problems], dtype=bool)
    bad = [p for p in problems if p is not None]
    if not ok.any():
        raise DataError(f"{src.origin}: no decodable images ({len(bad)} unreadable, e.g. {bad[0]})")
    return Split(src, split.indices[ok], split.labels), bad


def _header_problem(path: str, max_pixels: int | None) -> str | None:
    """None when the header reads and the image is within `max_pixels`, else '<path>: <reason>'."""
    try:
        with image_header(path, path, max_pixels=max_pixels):
            return None
    except ImageError as e:
        return str(e)
