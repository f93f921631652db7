"""Ensembles of checkpoints (different architectures and input sizes), with test-time augmentation.

Each model runs over the same images through its own evaluation stream (its own input size, normalisation and
crop from the checkpoint), optionally with a TTA view set; its softmax probabilities are then averaged across
models with optional weights. The class lists must be identical (same names, same order).

Members: each path given is a checkpoint, a run directory or a CV directory (all its folds, equal shares of the
member's weight). Weights are one per member, or "auto": from each member's held-out log-loss
(`vitforge.eval.members`). Members that share preprocessing (e.g. folds) share one stream: each image is decoded once.

Stable API for other commands (K-fold CV, pseudo-labelling):

    predict_ensemble(checkpoints, images, *, tta="none", weights=None, batch_size=None, device="auto") -> {
        "ids": list[str] (N),            item names as the source gives them (paths relative to a folder)
        "probs": np.ndarray (N, K),      weighted mean over models of each model's (TTA-averaged) probabilities
        "per_model_probs": np.ndarray (M, N, K),
        "classes": list[str] (K),
        "unreadable": list[str],         items skipped because they could not be decoded (or not by every model)
        "checkpoints", "models", "weights" (per checkpoint, normalised, sum 1), "tta",
        "members": [{"source", "kind", "checkpoints", "weight", "held_out"}]  (held_out with weights="auto")
    }
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitforge.data.dataset import Split
from vitforge.errors import CheckpointError, VitforgeError
from vitforge.eval.loading import load_for_inference
from vitforge.eval.members import auto_weights, expand_members
from vitforge.eval.metrics import classification_metrics, format_metrics, topk_metrics
from vitforge.eval.predict import (
    autocast_factory,
    eval_batch_size,
    eval_stream_for,
    stream_for_split,
    tta_forward_images,
)
from vitforge.eval.tta import check_tta_name, collect_probs_many, keep_views, trained_invariances, tta_views
from vitforge.progress import Progress
from vitforge.runtime import inference_device, prepare_cpu_inference, release_memory

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
    members: list[dict] = field(default_factory=list)

    @property
    def probs(self) -> np.ndarray:
        """(N, K) ensemble of the identity views."""
        return np.tensordot(np.asarray(self.weights, dtype=np.float32), self.per_model, axes=1)

    @property
    def probs_tta(self) -> np.ndarray:
        """(N, K) ensemble of the TTA-averaged probabilities."""
        return np.tensordot(np.asarray(self.weights, dtype=np.float32), self.per_model_tta, axes=1)


MAX_SHARED = 8  # models of one shared stream held in memory together


def run_model(checkpoint: str | Path, data: str | Split, *, labeled: bool, tta: str = "none",
              batch_size: int | None = None, device: str | torch.device = "auto") -> ModelOutput:
    """Probabilities of one model over `data` (a dataset spec or a `Split`), with and without TTA; `checkpoint` is
    anything `load_for_inference` reads (checkpoint, run directory, exported folder, safetensors, ONNX)."""
    return run_models([checkpoint], data, labeled=labeled, tta=tta, batch_size=batch_size, device=device)[0]


def run_models(checkpoints, data: str | Split, *, labeled: bool, tta: str = "none", batch_size: int | None = None,
               device: str | torch.device = "auto") -> list[ModelOutput]:
    """Probabilities of several models over `data`, in the order given.

    Consecutive models with the same preprocessing (input size, normalisation, crop; e.g. the folds of a CV) share
    one evaluation stream: each image is decoded and resized once and every model of the group runs on the batch
    (up to MAX_SHARED models in memory together). `batch_size` None picks one for the device (`eval_batch_size`).

    Raises:
        CheckpointError: a model's classes differ from the first one's (named).
    """
    dev = inference_device(device) if isinstance(device, str) else device
    if dev.type == "cpu":
        prepare_cpu_inference()  # threads <= usable cores; freed activations kept for the next pass
    outputs: list[ModelOutput] = []
    group: list[tuple[torch.nn.Module, dict]] = []
    first: dict | None = None
    for c in checkpoints:
        model, meta = load_for_inference(c, device=dev)
        first = first or meta
        check_classes([(first["path"], list(first["classes"])), (meta["path"], list(meta["classes"]))])
        if group and (meta["preprocess"] != group[0][1]["preprocess"] or len(group) == MAX_SHARED):
            outputs += _run_group(group, data, labeled=labeled, tta=tta, batch_size=batch_size, device=dev)
            group = []
            release_memory()  # that group's models and stream, before more are loaded
        group.append((model, meta))
        del model
    outputs += _run_group(group, data, labeled=labeled, tta=tta, batch_size=batch_size, device=dev)
    del group
    release_memory()
    return outputs


def _run_group(loaded: list[tuple[torch.nn.Module, dict]], data: str | Split, *, labeled: bool, tta: str,
               batch_size: int | None, device: torch.device) -> list[ModelOutput]:
    meta = loaded[0][1]
    img_size = int(meta["preprocess"]["img_size"])
    bs = batch_size or eval_batch_size(device, img_size)
    if isinstance(data, Split):
        stream = stream_for_split(meta, data, batch_size=bs, device=device)
    else:
        stream = eval_stream_for(meta, data, labeled=labeled, batch_size=bs, device=device)
    views = []
    for _, m in loaded:
        # A model trained without flips (or random crops) never saw mirrored (or shifted) images: no such views.
        every = tta_views(tta, mean=stream.mean, std=stream.std)
        views.append(keep_views(every, **trained_invariances(m)))
        if len(views[-1]) < len(every):
            log.warning("%s was trained without flips or random crops: --tta %s uses %d view(s): %s", m["path"], tta,
                        len(views[-1]), ", ".join(v.name for v in views[-1]))
    names = ", ".join(dict.fromkeys(m["model_name"] for _, m in loaded))
    n_views = max(len(v) for v in views)
    desc = f"{names}{f' x{len(loaded)}' if len(loaded) > 1 else ''}" + (f" ({n_views} views)" if n_views > 1 else "")
    with Progress(desc, total=len(stream.ids), unit="img") as bar:
        probs, labels, idx = collect_probs_many([m for m, _ in loaded], views, stream,
                                                autocast=autocast_factory(device), progress=bar,
                                                max_images=tta_forward_images(device, img_size, bs))
    ids = [stream.ids[i] for i in idx.tolist()]
    return [ModelOutput(m["path"], m["model_name"], list(m["classes"]), ids, labels.cpu().numpy(), plain.cpu().numpy(),
                        avg.cpu().numpy(), stream.bad) for (_, m), (plain, avg) in zip(loaded, probs, strict=True)]


def normalize_weights(weights, n: int) -> list[float]:
    """Weights for n models, scaled to sum to 1 (None = equal). Raises VitforgeError on a bad list."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(v) for v in weights]
    if len(w) != n:
        raise VitforgeError(f"--weights: {len(w)} weight(s) for {n} checkpoint(s) or directories; give one per "
                            f"checkpoint, run or CV directory, or auto")
    if any(v < 0 or not np.isfinite(v) for v in w) or sum(w) <= 0:
        raise VitforgeError(f"--weights: must be non-negative with a positive sum, got {w}")
    return [v / sum(w) for v in w]


def check_classes(models: list[tuple[str, list[str]]]) -> list[str]:
    """The shared class list of (checkpoint, classes) pairs; one whose classes differ from the first one's is named
    in the error."""
    ref, ref_classes = models[0]
    for path, classes in models[1:]:
        if classes != ref_classes:
            raise CheckpointError(
                f"{path}: its classes {_short(classes)} differ from those of {ref} {_short(ref_classes)}; an "
                f"ensemble needs the same classes in the same order")
    return ref_classes


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
                 batch_size: int | None = None, device: str = "auto") -> EnsembleOutput:
    """Run every member's checkpoints over `data` and align their probabilities (see the module docstring)."""
    members = expand_members(checkpoints)
    check_tta_name(tta)  # before loading anything
    scores = None
    if isinstance(weights, str):
        if weights != "auto":
            raise VitforgeError(f"--weights: expected numbers or auto, got {weights!r}")
        member_w, scores = auto_weights(members)
    else:
        member_w = normalize_weights(weights, len(members))
    w = [mw / len(m.checkpoints) for m, mw in zip(members, member_w, strict=True) for _ in m.checkpoints]
    info = [{"source": m.source, "kind": m.kind, "checkpoints": [str(c) for c in m.checkpoints], "weight": mw,
             "held_out": asdict(scores[i]) if scores else None} for i, (m, mw) in enumerate(zip(members, member_w,
                                                                                               strict=True))]
    checkpoints = [c for m in members for c in m.checkpoints]
    outputs = run_models(checkpoints, data, labeled=labeled, tta=tta, batch_size=batch_size, device=device)
    ids, rows, dropped = align(outputs)
    bad = sorted(set(dropped).union(*(o.unreadable for o in outputs)))
    return EnsembleOutput(
        ids=ids, labels=outputs[0].labels[rows[0]], classes=outputs[0].classes,
        per_model=np.stack([o.plain[r] for o, r in zip(outputs, rows, strict=True)]),
        per_model_tta=np.stack([o.tta[r] for o, r in zip(outputs, rows, strict=True)]),
        weights=w, checkpoints=[o.checkpoint for o in outputs], models=[o.model for o in outputs],
        unreadable=bad, tta=tta, members=info)


def predict_ensemble(checkpoints, images: str | Split, *, tta: str = "none", weights=None,
                     batch_size: int | None = None, device: str = "auto") -> dict:
    """Class probabilities of an ensemble (or one model) for every image; see the module docstring for the dict.

    Args:
        checkpoints: checkpoint files, run directories or CV directories (one or several; a single path is
            accepted too); each is one member.
        images: a folder of images (recursive), any dataset spec `vitforge train` accepts (labels are ignored),
            or a `Split` (e.g. a held-out fold).
        tta: view set name (`vitforge.eval.tta.TTA_SETS`).
        weights: one non-negative weight per member (normalised to sum 1); None = equal weights; "auto" = from
            each member's held-out log-loss (`vitforge.eval.members`).
        batch_size: images per forward pass (per view); None = `eval_batch_size` for the device.
        device: "auto", "cpu", "cuda", "cuda:1", ...

    Raises:
        CheckpointError: a checkpoint is unreadable or its classes differ from the first one's (named).
        VitforgeError: bad weights, unknown TTA set, no images.
    """
    ens = run_ensemble(checkpoints, images, labeled=False, tta=tta, weights=weights, batch_size=batch_size,
                       device=device)
    return {"ids": ens.ids, "probs": ens.probs_tta, "per_model_probs": ens.per_model_tta, "classes": ens.classes,
            "unreadable": ens.unreadable, "checkpoints": ens.checkpoints, "models": ens.models,
            "weights": ens.weights, "tta": tta, "members": ens.members}


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


def evaluate_ensemble(checkpoints, data: str | Split, *, tta: str = "none", weights=None,
                      batch_size: int | None = None, device: str = "auto") -> dict:
    """All metrics (`classification_metrics`) of an ensemble (or one model) on a labelled dataset.

    Returns the ensemble's metrics without TTA at the top level, `with_tta` (same keys, or None for tta="none"),
    `top1_tta`, `per_model` [{checkpoint, model, loss, top1, top5, top1_tta}], and `checkpoint`, `model`, `data`,
    `tta`, `weights` (per checkpoint), `members` (as `predict_ensemble`'s), `unreadable`.
    """
    ens = run_ensemble(checkpoints, data, labeled=True, tta=tta, weights=weights, batch_size=batch_size,
                       device=device)
    m = ensemble_metrics(ens)
    one = len(ens.models) == 1
    m.update(checkpoint=ens.checkpoints[0] if one else " + ".join(ens.checkpoints),
             model=ens.models[0] if one else f"ensemble({', '.join(ens.models)})",
             data=data if isinstance(data, str) else data.source.origin, tta=tta, weights=ens.weights,
             members=ens.members, unreadable=ens.unreadable)
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
