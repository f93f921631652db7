"""Decode a source once into a uint8 tensor (N, 3, H, W), cached on disk.

Small images (CIFAR-size) are decoded once; later runs load the tensor in well under a second and keep it on the
training device, so an epoch is never bound by JPEG decoding or a DataLoader.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitforge.data.images import ImageError
from vitforge.data.sources import Source

log = logging.getLogger("vitforge.data")
CACHE_VERSION = 2


@dataclass
class Decoded:
    images: torch.Tensor  # (N_ok, 3, H, W) uint8
    keep: np.ndarray  # (N_ok,) indices into the source
    bad: list[str]  # "<id>: <reason>" for every undecodable item


def decode_all(source: Source, size: int | None, cache_dir: Path | None,
               indices: np.ndarray | None = None) -> Decoded:
    """Decode the items `indices` (default: all) of `source` at `size` x `size` (None = the images' own size).

    Corrupt images are skipped and reported by name. File-based sources are cached under `cache_dir`, keyed by the
    source's fingerprint and the item set, so a changed dataset is decoded again; in-memory sources need no cache.
    """
    arr = source.array()
    if arr is not None:
        return _from_array(arr if indices is None else arr[indices], size, indices)
    idx = np.arange(len(source)) if indices is None else np.unique(np.asarray(indices, dtype=np.int64))
    path = None
    if cache_dir is not None:
        items = "all" if len(idx) == len(source) else hashlib.sha1(idx.tobytes()).hexdigest()
        key = hashlib.sha1(f"{CACHE_VERSION}|{source.fingerprint()}|{size}|{items}".encode()).hexdigest()[:20]
        path = cache_dir / "decoded" / f"{key}.pt"
        if path.exists():
            try:
                d = torch.load(path, weights_only=False)
                return Decoded(d["images"], d["keep"], d["bad"])
            except Exception:  # a half-written or stale cache file is simply rebuilt
                log.warning("ignoring unreadable cache file %s", path)
    decoded = _decode_files(source, size, idx)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": decoded.images, "keep": decoded.keep, "bad": decoded.bad}, tmp)
        os.replace(tmp, path)
    return decoded


def _from_array(arr: np.ndarray, size: int | None, indices: np.ndarray | None) -> Decoded:
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = _resize_uint8(x, size)
    keep = np.arange(len(arr)) if indices is None else np.asarray(indices, dtype=np.int64)
    return Decoded(x, keep, [])


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    out = []
    for chunk in x.split(4096):
        y = torch.nn.functional.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _decode_files(source: Source, size: int | None, indices: np.ndarray) -> Decoded:
    def work(i: int):
        try:
            img = source.load(i)
        except ImageError as e:
            return i, None, str(e)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return i, np.asarray(img, dtype=np.uint8), None

    threads = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(work, indices.tolist(), chunksize=256))
    good = [(i, a) for i, a, err in results if a is not None]
    bad = [err for _, a, err in results if a is None]
    if not good:
        return Decoded(torch.zeros(0, 3, size or 1, size or 1, dtype=torch.uint8), np.zeros(0, dtype=np.int64), bad)
    shapes = {a.shape for _, a in good}
    if len(shapes) > 1:
        # Mixed sizes without an explicit size: bring everything to the most common size.
        common = max(shapes, key=lambda s: sum(a.shape == s for _, a in good))
        good = [(i, a if a.shape == common else np.asarray(Image.fromarray(a).resize(common[1::-1], Image.BILINEAR)))
                for i, a in good]
    stack = np.stack([a for _, a in good])  # (N, H, W, 3)
    images = torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()
    return Decoded(images, np.array([i for i, _ in good], dtype=np.int64), bad)
