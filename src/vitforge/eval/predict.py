"""Evaluate and predict with a trained checkpoint (the library side of `vitforge eval` / `vitforge predict`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vitforge.checkpoint import checkpoint_config
from vitforge.data.dataset import Split, is_hyperspectral, open_hsi, open_inputs
from vitforge.data.preprocess import Preprocess
from vitforge.data.sources import check_same_classes
from vitforge.data.streams import StreamOptions, build_eval_stream
from vitforge.errors import DataError
from vitforge.runtime import amp_dtype, autocast

log = logging.getLogger("vitforge")


def autocast_factory(device: torch.device):
    """A no-argument factory of the inference autocast context (the `train.amp=auto` policy) for `device`."""
    dtype = amp_dtype("auto", device)
    return lambda: autocast(device, dtype)


CPU_BATCH_PIXELS = 4 * 224 * 224  # pixels per forward pass on a CPU (see eval_batch_size)
ACCEL_BATCH = 256


def eval_batch_size(device: torch.device, img_size: int) -> int:
    """Images per forward pass when none is given: 256 on a GPU; on a CPU as many as make about four 224-px images
    (4 at 224 px, 1 at 384 px, 256 at 32 px), rounded down to a power of two.

    On a CPU a large batch is slower, not faster: the activations of 256 images at 224 px are gigabytes, which the
    allocator maps fresh from the kernel for every layer (page faults: more system than user time) and which do not
    stay in cache. `benchmarks/eval_cpu.py` measures it.
    """
    if device.type != "cpu":
        return ACCEL_BATCH
    n = max(1, CPU_BATCH_PIXELS // max(1, img_size * img_size))
    return min(ACCEL_BATCH, 1 << (n.bit_length() - 1))


CPU_PASS_PIXELS = 12 * 224 * 224  # pixels per forward pass of stacked TTA views on a CPU (see tta_forward_images)


def tta_forward_images(device: torch.device, img_size: int, batch_size: int) -> int:
    """Images per forward pass when TTA views are stacked (`vitforge.eval.tta.tta_probs`): the batch itself on an
    accelerator (one view per pass); on a CPU about twelve 224-px images (three views of the default 4-image batch).

    Measured on 2 cores, EfficientNet-Lite0 at 224 px, saccadic12 on a batch of 4 (`benchmarks/eval_cpu.py
    --passes`): user CPU 16.7 s with one view per pass, 9.7 s with twelve images per pass (48 per pass was about as
    fast but faults more memory in); twelve bounds a pass's memory at three default CPU batches.
    """
    if device.type != "cpu":
        return batch_size
    return max(batch_size, CPU_PASS_PIXELS // max(1, img_size * img_size))


def eval_stream_for(meta: dict, data: str, *, labeled: bool, batch_size: int, device: torch.device,
                    num_workers: int = 2):
    """An evaluation stream over `data` preprocessed the way the checkpoint's model expects.

    A hyperspectral cube (.mat/.npy) is read with the checkpoint's `data.hsi` settings (ground truth, extra band,
    PCA, patch size) and every labelled pixel is evaluated.
    """
    if is_hyperspectral(data):
        return _hsi_stream(meta, data, batch_size=batch_size, device=device)
    src = open_inputs(data, labeled=labeled)
    if len(src) == 0:
        raise DataError(f"{data}: no images")
    classes = meta["classes"]
    if labeled:
        if not src.labeled:
            raise DataError(f"{data}: no labels to evaluate against (use `vitforge predict` for unlabeled images)")
        labels = check_same_classes(classes, src, "data")
    else:
        labels = np.full(len(src), -1, dtype=np.int64)
    split = Split(src, np.arange(len(src)), labels)
    return stream_for_split(meta, split, batch_size=batch_size, device=device, num_workers=num_workers)


def _hsi_stream(meta: dict, cube: str, *, batch_size: int, device: torch.device):
    cfg = checkpoint_config(meta).data
    src, tr, te = open_hsi(cube, cfg)
    labels = check_same_classes(meta["classes"], src, "data")
    return stream_for_split(meta, Split(src, np.sort(np.concatenate([tr, te])), labels), batch_size=batch_size,
                            device=device)


def stream_for_split(meta: dict, split: Split, *, batch_size: int, device: torch.device, num_workers: int = 2,
                     cache_dir: Path | None = None):
    """An evaluation stream over a `Split` (labels already in the checkpoint's class order), preprocessed the way
    the checkpoint's model expects; e.g. a run's own held-out split rebuilt with `open_data`."""
    pre = Preprocess(**meta["preprocess"])
    opt = StreamOptions(batch_size=batch_size, device=device, num_workers=num_workers, cache_dir=cache_dir)
    return build_eval_stream(split, pre, opt)
