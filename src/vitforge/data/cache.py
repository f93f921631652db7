"""Decode a source once into a uint8 tensor (N, 3, H, W), cached on disk.

Small images (CIFAR-size) are decoded once; later runs load the tensor in well under a second and keep it on the
training device, so an epoch is never bound by JPEG decoding or a DataLoader.

A cache file is safetensors (raw tensors and a JSON header: it cannot hold code) and is checked before use: its key,
dtypes, shapes and item indices must match what was asked for. A file that fails any check is decoded again and
replaced, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vitforge.data.images import ImageError
from vitforge.data.sources import Source

log = logging.getLogger("vitforge.data")
CACHE_VERSION = 3  # 3: safetensors with a checked header (2: torch.save pickles)
CACHE_FORMAT = "vitforge-decode-cache"


@dataclass
class Decoded:
    images: torch.Tensor  # (N_ok, 3, H, W) uint8
    keep: np.ndarray  # (N_ok,) indices into the source
    bad: list[str]  # "<id>: <reason>" for every undecodable item


class CacheMismatch(Exception):
    """A cache file that is not what its name promises (the message says why)."""


def decode_all(source: Source, size: int | None, cache_dir: Path | None,
               indices: np.ndarray | None = None) -> Decoded:
    """Decode the items `indices` (default: all) of `source` at `size` x `size` (None = the images' own size).

    Corrupt images are skipped and reported by name. File-based sources are cached under `cache_dir`, keyed by the
    source's fingerprint, its pixel limit and the item set, so a changed dataset is decoded again; in-memory sources
    need no cache.
    """
    arr = source.array()
    if arr is not None:
        return _from_array(arr if indices is None else arr[indices], size, indices)
    idx = np.arange(len(source)) if indices is None else np.unique(np.asarray(indices, dtype=np.int64))
    path = key = None
    if cache_dir is not None:
        items = "all" if len(idx) == len(source) else hashlib.sha1(idx.tobytes()).hexdigest()
        limits = ",".join(str(p.max_pixels) for p in getattr(source, "parts", [source]))
        key = hashlib.sha1(f"{CACHE_VERSION}|{source.fingerprint()}|{limits}|{size}|{items}".encode()).hexdigest()
        path = cache_dir / "decoded" / f"{key[:20]}.safetensors"
        if path.exists():
            try:
                return read_cache(path, key, size, idx)
            except CacheMismatch as e:  # half-written, stale, damaged or planted: decode again and replace it
                log.warning("decode cache %s failed its check (%s); decoding again", path, e)
    decoded = _decode_files(source, size, idx)
    if path is not None:
        write_cache(path, key, decoded)
    return decoded


def write_cache(path: Path, key: str, decoded: Decoded) -> None:
    """Write `decoded` to `path` atomically (temporary file + rename) as safetensors; `key` goes into the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"images": decoded.images.contiguous(), "keep": torch.from_numpy(np.ascontiguousarray(decoded.keep))},
              str(tmp), metadata={"format": CACHE_FORMAT, "key": key, "bad": json.dumps(decoded.bad)})
    os.replace(tmp, path)


def read_cache(path: Path, key: str, size: int | None, idx: np.ndarray) -> Decoded:
    """A cache file, if it is exactly what `key` names: the decoded `idx` items (sorted, unique) at `size`.

    Raises:
        CacheMismatch: unreadable, another key, or tensors of the wrong dtype, shape or item set.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key or names != {"images", "keep"}:
                raise CacheMismatch("not the cache file of this data")
            images, keep = f.get_tensor("images"), f.get_tensor("keep")
        bad = json.loads(meta.get("bad", ""))
    except (SafetensorError, OSError, ValueError) as e:  # a broken header, truncated data, bad JSON
        raise CacheMismatch(f"unreadable: {str(e)[:120]}") from None
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise CacheMismatch(f"images are {images.dtype} {tuple(images.shape)}, not uint8 (N, 3, H, W)")
    if size is not None and tuple(images.shape[2:]) != (size, size):
        raise CacheMismatch(f"images are {tuple(images.shape[2:])}, not {size} x {size}")
    if keep.dtype != torch.int64 or keep.ndim != 1 or len(keep) != len(images):
        raise CacheMismatch(f"item indices are {keep.dtype} {tuple(keep.shape)} for {len(images)} images")
    if not isinstance(bad, list) or not all(isinstance(b, str) for b in bad) or len(keep) + len(bad) != len(idx):
        raise CacheMismatch(f"{len(keep)} decoded + {len(bad) if isinstance(bad, list) else '?'} unreadable items "
                            f"for {len(idx)} asked")
    k = keep.numpy()
    if len(k) and (np.any(np.diff(k) <= 0) or not np.isin(k, idx).all()):
        raise CacheMismatch("item indices are not a sorted subset of the items asked for")
    return Decoded(images, k, bad)


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
