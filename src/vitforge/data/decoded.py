"""Small images decoded once to uint8 and kept on the training device (the airbench-style path).

Images up to `SMALL_IMAGE` pixels on a side are decoded through the on-disk cache (`vitforge.data.cache`) and moved
to the device as one uint8 tensor; batches are then cut and augmented there, so an epoch is not bound by a
DataLoader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitforge.data.cache import decode_all
from vitforge.data.dataset import ConcatSource, FeatureSource, Split
from vitforge.data.images import image_size
from vitforge.data.sources import FileListSource, Source
from vitforge.errors import DataError

SMALL_IMAGE = 64  # images up to this side take the decode-once, keep-on-device path


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


def use_device_cache(split: Split, mode: str) -> bool:
    if isinstance(split.source, FeatureSource):
        return True
    return mode == "on" or (mode == "auto" and is_small(split.source))
