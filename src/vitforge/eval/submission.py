"""Prediction CSVs shaped like a competition submission.

The default layout is vitforge's own (`file,pred,prob_<class>...`); `KAGGLE` gives the common `id,label` layout.
Every part is configurable: the id column's name and whether the id is the relative path, the file name, or the
file name without its extension; the label column's name (or none), the label as a class name or index; and the
probability columns (on/off, name prefix; with an empty prefix they are named by the classes).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vitforge.errors import VitforgeError
from vitforge.outputs import check_output

ID_FROM = ("path", "name", "stem")
LABEL_AS = ("name", "index")


@dataclass(frozen=True)
class CsvFormat:
    """How predictions become CSV columns."""

    id_column: str = "file"
    """Header of the id column."""
    id_from: str = "path"
    """path (relative to the images folder), name (file name), stem (file name without extension)."""
    label_column: str | None = "pred"
    """Header of the predicted-class column; None or "" leaves the column out."""
    label_as: str = "name"
    """name (class name) or index (class number in the checkpoint's class order)."""
    probs: bool = True
    """One probability column per class."""
    prob_prefix: str = "prob_"
    """Probability columns are named prefix + class name."""
    decimals: int = 6
    """Digits after the decimal point of probabilities."""

    def __post_init__(self) -> None:
        if self.id_from not in ID_FROM:
            raise VitforgeError(f"--id-from: must be one of {', '.join(ID_FROM)}, got {self.id_from!r}")
        if self.label_as not in LABEL_AS:
            raise VitforgeError(f"--label-as: must be one of {', '.join(LABEL_AS)}, got {self.label_as!r}")
        if not self.id_column:
            raise VitforgeError("--id-column: must not be empty")
        if not self.label_column and not self.probs:
            raise VitforgeError("the CSV would hold ids only: keep a label column or the probability columns")


KAGGLE = CsvFormat(id_column="id", id_from="stem", label_column="label", probs=False)


def make_id(item: str, id_from: str) -> str:
    """The id of an item name (a path relative to the images folder, with / separators)."""
    item = item.replace(os.sep, "/")
    if id_from == "path":
        return item
    name = item.rsplit("/", 1)[-1]
    return name if id_from == "name" else Path(name).stem


def header(classes: list[str], fmt: CsvFormat) -> list[str]:
    """Column names; duplicates (e.g. a class called like the id column) are an error naming them."""
    cols = [fmt.id_column]
    if fmt.label_column:
        cols.append(fmt.label_column)
    if fmt.probs:
        cols += [f"{fmt.prob_prefix}{c}" for c in classes]
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise VitforgeError(f"CSV columns would repeat {', '.join(dup)}; change --id-column/--label-column/"
                            f"--prob-prefix")
    return cols


def rows(pred: dict, fmt: CsvFormat) -> list[list[str]]:
    """One row per item of `pred` ({"ids", "probs" (N, K), "classes"}); ids must stay unique."""
    ids = [make_id(i, fmt.id_from) for i in pred["ids"]]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise VitforgeError(f"--id-from {fmt.id_from}: two images get the id {dup!r}; use --id-from path")
    probs = np.asarray(pred["probs"])
    top = probs.argmax(axis=1)
    out = []
    for i, p, k in zip(ids, probs, top, strict=True):
        row = [i]
        if fmt.label_column:
            row.append(pred["classes"][k] if fmt.label_as == "name" else str(int(k)))
        if fmt.probs:
            row += [f"{v:.{fmt.decimals}f}" for v in p]
        out.append(row)
    return out


def write_submission(pred: dict, out: str | Path, fmt: CsvFormat = CsvFormat(), *, overwrite: bool = False) -> Path:
    """Write `pred` as CSV; an existing file is only replaced with `overwrite` (the write is atomic)."""
    path = check_output(out, overwrite=overwrite)
    cols, body = header(pred["classes"], fmt), rows(pred, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(body)
    os.replace(tmp, path)
    return path


def class_distribution(pred: dict, top: int = 20) -> tuple[str, str | None]:
    """(lines "class: count (share)" for the predicted classes, most frequent first (up to `top`), a warning or None).

    The warning names the class when every image is predicted as one class of several: the symptom of a model that
    collapsed (or a TTA/normalisation mismatch), worth seeing before a submission is uploaded.
    """
    classes = pred["classes"]
    pred_idx = np.asarray(pred["probs"]).argmax(axis=1)
    counts = np.bincount(pred_idx, minlength=len(classes))
    n = int(counts.sum())
    order = np.argsort(-counts, kind="stable")
    shown = [k for k in order if counts[k]][:top]
    lines = ["predicted classes:"] + [f"  {classes[k]}: {counts[k]} images ({100 * counts[k] / n:.1f}%)" for k in shown]
    rest = int(np.count_nonzero(counts)) - len(shown)
    if rest:
        lines.append(f"  ... and {rest} more classes ({n - int(counts[shown].sum())} images)")
    unused = len(classes) - int(np.count_nonzero(counts))
    lines.append(f"  total: {n} images" + (f"; {unused} of {len(classes)} classes never predicted" if unused else ""))
    warning = None
    if n > 1 and len(classes) > 1 and counts.max() == n:
        warning = (f"every one of the {n} images is predicted as {classes[int(counts.argmax())]!r}; check the model "
                   f"(a collapsed or untrained model predicts one class) before using these predictions")
    return "\n".join(lines), warning


def format_from_args(*, kaggle: bool = False, **options) -> CsvFormat:
    """A CsvFormat from the default (or KAGGLE) with the options that were given (None = keep)."""
    base = KAGGLE if kaggle else CsvFormat()
    return replace(base, **{k: v for k, v in options.items() if v is not None})
