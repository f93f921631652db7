"""Consensus pseudo-labels (`vitforge pseudo-label`) for a second training round on unlabeled images.

The fold (and architecture) ensemble predicts every image of an unlabeled folder, optionally with TTA. An image
becomes a training example only when BOTH hold:

    max_k mean_m p_m(k | x) >= threshold          the averaged confidence passes the threshold
    argmax_k p_m(k | x) is the same for every m   every model votes for that class

The CSV (file, label, score, min_model_score, models) is what `data.extra=` reads: `file` is relative to the CSV's
folder, `label` a class name; the scores are kept so a later round can raise the bar without predicting again.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from vitforge.errors import VitforgeError
from vitforge.eval.ensemble import predict_ensemble
from vitforge.eval.members import expand_sources
from vitforge.outputs import check_output


def select_pseudo_labels(probs: np.ndarray, per_model_probs: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask over images: averaged confidence >= threshold and every model's argmax equals the average's.

    Args:
        probs: (N, K) ensemble probabilities.
        per_model_probs: (M, N, K) each model's probabilities.
        threshold: minimum of max_k probs.
    """
    pred = probs.argmax(axis=1)
    agree = (per_model_probs.argmax(axis=2) == pred[None, :]).all(axis=0)
    return (probs.max(axis=1) >= threshold) & agree


def pseudo_label(sources, images: str | Path, *, out: str | Path, threshold: float = 0.98, tta: str = "none",
                 overwrite: bool = False, batch_size: int | None = None, device: str = "auto") -> dict:
    """Predict `images` with the ensemble of `sources` and write the confident, agreed images to `out` (CSV).

    Returns:
        {"out", "images", "selected", "per_class", "threshold", "tta", "checkpoints", "unreadable"}.
    """
    if not 0 < threshold <= 1:
        raise VitforgeError(f"--threshold must be in (0, 1], got {threshold}")
    folder, out = Path(images).expanduser(), Path(out).expanduser()
    if not folder.is_dir():
        raise VitforgeError(f"--images {folder}: not a folder of images")
    check_output(out, overwrite=overwrite)  # before the ensemble runs
    pred = predict_ensemble(expand_sources(sources), str(folder), tta=tta, batch_size=batch_size, device=device)
    probs, per_model, classes = pred["probs"], pred["per_model_probs"], pred["classes"]
    keep = np.flatnonzero(select_pseudo_labels(probs, per_model, threshold))
    labels = probs.argmax(axis=1)
    base, here = folder.resolve(), out.parent.resolve()
    rows = [{"file": os.path.relpath(base / pred["ids"][i], here), "label": classes[labels[i]],
             "score": f"{probs[i, labels[i]]:.6f}", "min_model_score": f"{per_model[:, i, labels[i]].min():.6f}",
             "models": per_model.shape[0]} for i in keep]
    _write_csv(out, sorted(rows, key=lambda r: r["file"]))
    per_class = {c: int((labels[keep] == k).sum()) for k, c in enumerate(classes)}
    return {"out": str(out), "images": len(pred["ids"]), "selected": len(rows), "per_class": per_class,
            "threshold": threshold, "tta": tta, "checkpoints": pred["checkpoints"], "unreadable": pred["unreadable"]}


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "label", "score", "min_model_score", "models"])
        w.writeheader()
        w.writerows(rows)


def format_result(r: dict) -> str:
    """The lines `vitforge pseudo-label` prints."""
    counts = ", ".join(f"{c} {n}" for c, n in r["per_class"].items())
    line = (f"{r['selected']} of {r['images']} images pass threshold {r['threshold']} with all "
            f"{len(r['checkpoints'])} models agreeing (tta {r['tta']}): {counts} -> {r['out']}")
    if r["selected"]:
        line += f"\nnext round: vitforge cv RECIPE --folds K data.extra={r['out']}"
    else:
        line += "\nno image qualifies; lower --threshold or train better models"
    if r["unreadable"]:
        line += f"\n({len(r['unreadable'])} unreadable image(s) skipped, e.g. {r['unreadable'][0]})"
    return line
