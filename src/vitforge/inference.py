"""Evaluate and predict with a trained checkpoint (the library side of `vitforge eval` / `vitforge predict`)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from vitforge.checkpoint import load_model
from vitforge.data.pipeline import Preprocess, Split, StreamOptions, build_eval_stream
from vitforge.data.sources import check_same_classes, open_source
from vitforge.errors import DataError, VitforgeError
from vitforge.eval.evaluate import collect_logits, topk_metrics
from vitforge.train.distributed import DistInfo, pick_device

log = logging.getLogger("vitforge")


def _device(spec: str) -> torch.device:
    return pick_device(spec, DistInfo())


def _autocast(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return None


def eval_stream_for(meta: dict, data: str, *, labeled: bool, batch_size: int, device: torch.device,
                    num_workers: int = 2):
    """An evaluation stream over `data` preprocessed the way the checkpoint's model expects."""
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
    pre = Preprocess(**meta["preprocess"])
    opt = StreamOptions(batch_size=batch_size, device=device, num_workers=num_workers)
    return build_eval_stream(Split(src, np.arange(len(src)), labels), pre, opt)


def evaluate_checkpoint(ckpt: str | Path, data: str, *, batch_size: int = 256, device: str = "auto") -> dict:
    """Loss, top-1/top-5 and per-class accuracy of a checkpoint (or run dir) on a labelled dataset."""
    dev = _device(device)
    model, meta = load_model(ckpt, device=dev)
    stream = eval_stream_for(meta, data, labeled=True, batch_size=batch_size, device=dev)
    logits, labels, _ = collect_logits(model, stream, autocast=_autocast(dev))
    m = topk_metrics(logits, labels, len(meta["classes"]))
    m["per_class_top1"] = dict(zip(meta["classes"], m.pop("per_class_top1"), strict=True))
    m.update(checkpoint=meta["path"], model=meta["model_name"], data=data, unreadable=stream.bad or
             getattr(stream, "decode_bad", []))
    return m


def predict_images(ckpt: str | Path, images: str, *, batch_size: int = 256, device: str = "auto") -> dict:
    """Class probabilities for every image under `images`: {"ids", "probs" (N, K), "classes", "unreadable"}."""
    dev = _device(device)
    model, meta = load_model(ckpt, device=dev)
    stream = eval_stream_for(meta, images, labeled=False, batch_size=batch_size, device=dev)
    logits, _, idx = collect_logits(model, stream, autocast=_autocast(dev))
    probs = logits.softmax(dim=1).cpu().numpy()
    ids = [stream.ids[i] for i in idx.tolist()]
    return {"ids": ids, "probs": probs, "classes": meta["classes"],
            "unreadable": stream.bad or getattr(stream, "decode_bad", [])}


def write_predictions_csv(pred: dict, out: str | Path, *, overwrite: bool = False) -> Path:
    """CSV: file, predicted class, then one probability column per class."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise VitforgeError(f"--out {path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = pred["classes"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "pred", *[f"prob_{c}" for c in classes]])
        for name, p in zip(pred["ids"], pred["probs"], strict=True):
            w.writerow([name, classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    return path
