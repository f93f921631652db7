"""Stratified splits with fixed seeds (scikit-learn does the work)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from vitforge.errors import DataError


def _check_stratifiable(labels: np.ndarray, classes: list[str], need: int, what: str) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    small = [classes[k] if k < len(classes) else str(k) for k in np.flatnonzero((counts > 0) & (counts < need))]
    if small:
        raise DataError(f"{what}: class(es) {', '.join(small[:10])} have fewer than {need} images")


def stratified_split(labels: np.ndarray, val: float, seed: int, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `val` is a fraction in (0, 1) or a count of images; every class keeps its proportion."""
    n = len(labels)
    n_val = int(round(val * n)) if val < 1 else int(val)
    if n_val == 0:
        return np.arange(n), np.arange(0)
    if n_val >= n:
        raise DataError(f"data.val_split={val} leaves no training images out of {n}")
    _check_stratifiable(labels, classes, 2, "data.val_split")
    if n_val < len(np.unique(labels)):
        raise DataError(f"data.val_split={val} gives {n_val} validation images, fewer than the "
                        f"{len(np.unique(labels))} classes; use a larger split")
    tr, va = train_test_split(np.arange(n), test_size=n_val, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(va)


def stratified_subset(indices: np.ndarray, labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A stratified subset of `indices` of about `size` items (all of them if size >= len)."""
    if size >= len(indices):
        return indices
    sub, _ = train_test_split(indices, train_size=size, stratify=labels[indices], random_state=seed)
    return np.sort(sub)


def stratified_folds(labels: np.ndarray, k: int, seed: int, classes: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, val) index pairs; each image is in exactly one validation fold."""
    if k < 2:
        raise DataError(f"--folds must be >= 2, got {k}")
    _check_stratifiable(labels, classes, k, f"{k}-fold split")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(va)) for tr, va in skf.split(np.zeros(len(labels)), labels)]
