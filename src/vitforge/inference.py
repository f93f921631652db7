"""Evaluate and predict with a trained checkpoint (the library side of `vitforge eval` / `vitforge predict`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vitforge.data.pipeline import Preprocess, Split, StreamOptions, build_eval_stream, is_hyperspectral, open_hsi
from vitforge.data.sources import check_same_classes, open_source
from vitforge.errors import DataError
from vitforge.train.distributed import DistInfo, pick_device

log = logging.getLogger("vitforge")


def _device(spec: str) -> torch.device:
    return pick_device(spec, DistInfo(), option="--device")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return None


def eval_stream_for(meta: dict, data: str, *, labeled: bool, batch_size: int, device: torch.device,
                    num_workers: int = 2):
    """An evaluation stream over `data` preprocessed the way the checkpoint's model expects.

    A hyperspectral cube (.mat/.npy) is read with the checkpoint's `data.hsi` settings (ground truth, extra band,
    PCA, patch size) and every labelled pixel is evaluated.
    """
    if is_hyperspectral(data):
        return _hsi_stream(meta, data, batch_size=batch_size, device=device)
    src = open_source(data, labeled=labeled)
    if len(src) == 0:
        raise DataError(f"{data}: no images")
    classes = meta["classes"]
    if labeled:
        if not src.labeled:
            raise DataError(f"{data}: no labels to evaluate against (use `vitforge predict` for unlabeled images)")
        train_like = type("Classes", (), {"classes": classes})()
        labels = check_same_classes(train_like, src, "data")
    else:
        labels = np.full(len(src), -1, dtype=np.int64)
    split = Split(src, np.arange(len(src)), labels)
    return stream_for_split(meta, split, batch_size=batch_size, device=device, num_workers=num_workers)


def _hsi_stream(meta: dict, cube: str, *, batch_size: int, device: torch.device):
    from vitforge.config import from_dict

    cfg = from_dict(meta["config"]).data
    src, tr, te = open_hsi(cube, cfg)
    labels = check_same_classes(type("Classes", (), {"classes": meta["classes"]})(), src, "data")
    return stream_for_split(meta, Split(src, np.sort(np.concatenate([tr, te])), labels), batch_size=batch_size,
                            device=device)


def stream_for_split(meta: dict, split: Split, *, batch_size: int, device: torch.device, num_workers: int = 2,
                     cache_dir: Path | None = None):
    """An evaluation stream over a `Split` (labels already in the checkpoint's class order), preprocessed the way
    the checkpoint's model expects; e.g. a run's own held-out split rebuilt with `open_data`."""
    pre = Preprocess(**meta["preprocess"])
    opt = StreamOptions(batch_size=batch_size, device=device, num_workers=num_workers, cache_dir=cache_dir)
    return build_eval_stream(split, pre, opt)


def evaluate_checkpoint(ckpt: str | Path, data: str, *, batch_size: int = 256, device: str = "auto",
                        tta: str = "none") -> dict:
    """Every metric of a checkpoint (or run dir) on a labelled dataset: loss, top-1/top-5, per-class accuracy and
    P/R/F1, confusion matrices, calibration, most-confused pairs; with `tta`, the same again under `with_tta`.
    An ensemble of several checkpoints: `vitforge.eval.ensemble.evaluate_ensemble`."""
    from vitforge.eval.ensemble import evaluate_ensemble

    return evaluate_ensemble([ckpt], data, tta=tta, batch_size=batch_size, device=device)


def predict_images(ckpt: str | Path, images: str, *, batch_size: int = 256, device: str = "auto",
                   tta: str = "none") -> dict:
    """Class probabilities for every image under `images`: {"ids", "probs" (N, K), "classes", "unreadable", ...}.
    Several checkpoints: `vitforge.eval.ensemble.predict_ensemble`."""
    from vitforge.eval.ensemble import predict_ensemble

    return predict_ensemble([ckpt], images, tta=tta, batch_size=batch_size, device=device)


def write_predictions_csv(pred: dict, out: str | Path, *, overwrite: bool = False, fmt=None) -> Path:
    """CSV: file, predicted class, then one probability column per class (or any `CsvFormat`)."""
    from vitforge.eval.submission import CsvFormat, write_submission

    return write_submission(pred, out, fmt or CsvFormat(), overwrite=overwrite)
