"""Ensembles of checkpoints (different architectures and input sizes), with test-time augmentation.

Each checkpoint runs over the same images through its own evaluation stream (its own input size, normalisation and
crop from the checkpoint), optionally with a TTA view set; its softmax probabilities are then averaged across
models with optional weights. The class lists must be identical (same names, same order).

Stable API for other commands (K-fold CV, pseudo-labelling):

    predict_ensemble(checkpoints, images, *, tta="none", weights=None, batch_size=256, device="auto") -> {
        "ids": list[str] (N),            item names as the source gives them (paths relative to a folder)
        "probs": np.ndarray (N, K),      weighted mean over models of each model's (TTA-averaged) probabilities
        "per_model_probs": np.ndarray (M, N, K),
        "classes": list[str] (K),
        "unreadable": list[str],         items skipped because they could not be decoded (or not by every model)
        "checkpoints", "models", "weights" (normalised, sum 1), "tta"
    }
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitforge.data.dataset import Split
from vitforge.errors import CheckpointError, VitforgeError
from vitforge.eval.evaluate import topk_metrics
from vitforge.eval.loading import load_for_inference
from vitforge.eval.metrics import classification_metrics, format_metrics
from vitforge.eval.predict import autocast_factory, eval_stream_for, stream_for_split
from vitforge.eval.tta import check_tta_name, collect_probs, keep_views, trained_invariances, tta_views
from vitforge.runtime import inference_device

log = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    """One checkpoint's probabilities over a dataset, rows in `ids` order."""

    checkpoint: str
    model: str
    classes: list[str]
    ids: list[str]
    labels: np.ndarray  # (N,) int64, -1 when unlabeled
    plain: np.ndarray  # (N, K) float32, identity view only
    tta: np.ndarray  # (N, K) float32, weighted view average (== plain for tta="none")
    unreadable: list[str]


@dataclass
class EnsembleOutput:
    """Aligned outputs of M models over N items and their weighted averages."""

    ids: list[str]
    labels: np.ndarray  # (N,)
    classes: list[str]
    per_model: np.ndarray  # (M, N, K) identity view
    per_model_tta: np.ndarray  # (M, N, K)
    weights: list[float]
    checkpoints: list[str]
    models: list[str]
    unreadable: list[str]
    tta: str

    @property
    def probs(self) -> np.ndarray:
        """(N, K) ensemble of the identity views."""
        return np.tensordot(np.asarray(self.weights, dtype=np.float32), self.per_model, axes=1)

    @property
    def probs_tta(self) -> np.ndarray:
        """(N, K) ensemble of the TTA-averaged probabilities."""
        return np.tensordot(np.asarray(self.weights, dtype=np.float32), self.per_model_tta, axes=1)


def run_model(checkpoint: str | Path, data: str | Split, *, labeled: bool, tta: str = "none", batch_size: int = 256,
              device: str | torch.device = "auto") -> ModelOutput:
    """Probabilities of one model over `data` (a dataset spec or a `Split`), with and without TTA; `checkpoint` is
    anything `load_for_inference` reads (checkpoint, run directory, exported folder, safetensors, ONNX)."""
    dev = inference_device(device) if isinstance(device, str) else device
    model, meta = load_for_inference(checkpoint, device=dev)
    if isinstance(data, Split):
        stream = stream_for_split(meta, data, batch_size=batch_size, device=dev)
    else:
        stream = eval_stream_for(meta, data, labeled=labeled, batch_size=batch_size, device=dev)
    # A model trained without flips (or random crops) never saw mirrored (or shifted) images: no such views.
    every = tta_views(tta, mean=stream.mean, std=stream.std)
    views = keep_views(every, **trained_invariances(meta))
    if len(views) < len(every):
        log.warning("%s was trained without flips or random crops: --tta %s uses %d view(s): %s", meta["path"], tta,
                    len(views), ", ".join(v.name for v in views))
    plain, avg, labels, idx = collect_probs(model, stream, views, autocast=autocast_factory(dev))
    ids = [stream.ids[i] for i in idx.tolist()]
    return ModelOutput(meta["path"], meta["model_name"], list(meta["classes"]), ids, labels.cpu().numpy(),
                       plain.cpu().numpy(), avg.cpu().numpy(), stream.bad)


def normalize_weights(weights, n: int) -> list[float]:
    """Weights for n models, scaled to sum to 1 (None = equal). Raises VitforgeError on a bad list."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(v) for v in weights]
    if len(w) != n:
        raise VitforgeError(f"--weights: {len(w)} weight(s) for {n} checkpoint(s); give one per checkpoint")
    if any(v < 0 or not np.isfinite(v) for v in w) or sum(w) <= 0:
        raise VitforgeError(f"--weights: must be non-negative with a positive sum, got {w}")
    return [v / sum(w) for v in w]


def check_classes(outputs: list[ModelOutput]) -> list[str]:
    """The shared class list; a checkpoint whose classes differ from the first one's is named in the error."""
    ref = outputs[0]
    for o in outputs[1:]:
        if o.classes != ref.classes:
            raise CheckpointError(
                f"{o.checkpoint}: its classes {_short(o.classes)} differ from those of {ref.checkpoint} "
                f"{_short(ref.classes)}; an ensemble needs the same classes in the same order")
    return ref.classes


def _short(names: list[str], n: int = 8) -> str:
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} classes)" if len(names) > n else "") + "]"


def align(outputs: list[ModelOutput]) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Items every model saw, in the first model's order: (ids, row indices per model, ids dropped)."""
    if all(o.ids == outputs[0].ids for o in outputs):
        rows = np.arange(len(outputs[0].ids))
        return outputs[0].ids, [rows] * len(outputs), []
    pos = []
    for o in outputs:
        if len(set(o.ids)) != len(o.ids):
            raise VitforgeError(f"{o.checkpoint}: item names are not unique, cannot match its predictions with the "
                                "other models' (were different images unreadable for different models?)")
        pos.append({name: r for r, name in enumerate(o.ids)})
    ids = [i for i in outputs[0].ids if all(i in p for p in pos)]
    dropped = sorted(set().union(*(set(o.ids) for o in outputs)) - set(ids))
    return ids, [np.array([p[i] for i in ids], dtype=np.int64) for p in pos], dropped


def run_ensemble(checkpoints, data: str | Split, *, labeled: bool, tta: str = "none", weights=None,
                 batch_size: int = 256, device: str = "auto") -> EnsembleOutput:
    """Run every checkpoint over `data` and align their probabilities (see the module docstring)."""
    checkpoints = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not checkpoints:
        raise VitforgeError("give at least one checkpoint or run directory")
    w = normalize_weights(weights, len(checkpoints))
    check_tta_name(tta)  # before loading anything
    outputs = []
    for ckpt in checkpoints:
        outputs.append(run_model(ckpt, data, labeled=labeled, tta=tta, batch_size=batch_size, device=device))
        check_classes(outputs)
    ids, rows, dropped = align(outputs)
    bad = sorted(set(dropped).union(*(o.unreadable for o in outputs)))
    return EnsembleOutput(
        ids=ids, labels=outputs[0].labels[rows[0]], classes=outputs[0].classes,
        per_model=np.stack([o.plain[r] for o, r in zip(outputs, rows, strict=True)]),
        per_model_tta=np.stack([o.tta[r] for o, r in zip(outputs, rows, strict=True)]),
        weights=w, checkpoints=[o.checkpoint for o in outputs], models=[o.model for o in outputs],
        unreadable=bad, tta=tta)


def predict_ensemble(checkpoints, images: str | Split, *, tta: str = "none", weights=None, batch_size: int = 256,
                     device: str = "auto") -> dict:
    """Class probabilities of an ensemble (or one model) for every image; see the module docstring for the dict.

    Args:
        checkpoints: checkpoint files or run directories (one or several; a single path is accepted too).
        images: a folder of images (recursive), any dataset spec `vitforge train` accepts (labels are ignored),
            or a `Split` (e.g. a held-out fold).
        tta: view set name (`vitforge.eval.tta.TTA_SETS`).
        weights: one non-negative weight per checkpoint (normalised to sum 1); None = equal weights.
        batch_size: images per forward pass (per view).
        device: "auto", "cpu", "cuda", "cuda:1", ...

    Raises:
        CheckpointError: a checkpoint is unreadable or its classes differ from the first one's (named).
        VitforgeError: bad weights, unknown TTA set, no images.
    """
    ens = run_ensemble(checkpoints, images, labeled=False, tta=tta, weights=weights, batch_size=batch_size,
                       device=device)
    return {"ids": ens.ids, "probs": ens.probs_tta, "per_model_probs": ens.per_model_tta, "classes": ens.classes,
            "unreadable": ens.unreadable, "checkpoints": ens.checkpoints, "models": ens.models,
            "weights": ens.weights, "tta": tta}


def ensemble_metrics(ens: EnsembleOutput) -> dict:
    """Metrics of the ensemble without and with TTA, plus headline numbers per model."""
    labels = torch.from_numpy(ens.labels)
    m = classification_metrics(torch.from_numpy(ens.probs), labels, ens.classes)
    m["with_tta"] = classification_metrics(torch.from_numpy(ens.probs_tta), labels, ens.classes) \
        if ens.tta != "none" else None
    m["top1_tta"] = (m["with_tta"] or m)["top1"]
    m["per_model"] = [_model_summary(ck, name, p, pt, labels, len(ens.classes))
                      for ck, name, p, pt in zip(ens.checkpoints, ens.models, ens.per_model, ens.per_model_tta,
                                                 strict=True)]
    return m


def _model_summary(ckpt: str, name: str, plain: np.ndarray, tta: np.ndarray, labels: torch.Tensor, k: int) -> dict:
    a = topk_metrics(torch.from_numpy(plain).clamp_min(1e-12).log(), labels, k)
    b = topk_metrics(torch.from_numpy(tta).clamp_min(1e-12).log(), labels, k)
    return {"checkpoint": ckpt, "model": name, "loss": a["loss"], "top1": a["top1"], "top5": a["top5"],
            "top1_tta": b["top1"]}


def evaluate_ensemble(checkpoints, data: str | Split, *, tta: str = "none", weights=None, batch_size: int = 256,
                      device: str = "auto") -> dict:
    """All metrics (`classification_metrics`) of an ensemble (or one model) on a labelled dataset.

    Returns the ensemble's metrics without TTA at the top level, `with_tta` (same keys, or None for tta="none"),
    `top1_tta`, `per_model` [{checkpoint, model, loss, top1, top5, top1_tta}], and `checkpoint`, `model`, `data`,
    `tta`, `weights`, `unreadable`.
    """
    ens = run_ensemble(checkpoints, data, labeled=True, tta=tta, weights=weights, batch_size=batch_size,
                       device=device)
    m = ensemble_metrics(ens)
    one = len(ens.models) == 1
    m.update(checkpoint=ens.checkpoints[0] if one else " + ".join(ens.checkpoints),
             model=ens.models[0] if one else f"ensemble({', '.join(ens.models)})",
             data=data if isinstance(data, str) else data.source.origin, tta=tta, weights=ens.weights,
             unreadable=ens.unreadable)
    return m


def format_eval(m: dict) -> str:
    """The text `vitforge eval` prints: per-model lines for an ensemble, the TTA comparison, the metrics table."""
    lines = []
    if len(m["per_model"]) > 1:
        for pm, w in zip(m["per_model"], m["weights"], strict=True):
            tta = f"  with TTA {pm['top1_tta']:.2f}%" if m["with_tta"] else ""
            lines.append(f"  model {pm['model']} (weight {w:.3f}, {pm['checkpoint']}): top-1 {pm['top1']:.2f}%{tta}")
    lines.insert(0, format_metrics(m, title=f"{m['model']} on {m['data']}"))
    if m["with_tta"]:
        t = m["with_tta"]
        lines.append(f"top-1 without TTA {m['top1']:.2f}%  with TTA ({m['tta']}) {t['top1']:.2f}%  "
                     f"({t['top1'] - m['top1']:+.2f} points; loss {m['loss']:.4f} -> {t['loss']:.4f}, "
                     f"ECE {m['ece']:.4f} -> {t['ece']:.4f})")
    if m["unreadable"]:
        lines.append(f"({len(m['unreadable'])} unreadable image(s) skipped, e.g. {m['unreadable'][0]})")
    return "\n".join(lines)
