"""Hyperspectral scenes for SClusterFormer, following the official pipeline.

Fang666666/HSIC_SClusterFormer `Loop_EMAP_train.py` and `main.py` (Fang, Sun, Zheng, Wu, IEEE TIP 34:701-716, 2025).

    cube (H, W, bands) + ground truth (H, W), 0 = unlabelled, classes 1..K
      -> PCA to 30 components with whitening, fitted on all pixels
      -> optional extra band (upstream: one EMAP band), standardised over the whole map, stacked last
      -> zero-pad by (patch - 1) / 2 and cut a patch x patch window around every labelled pixel (label = centre - 1)
      -> stratified split by a training fraction (upstream: 0.05 for PaviaU, seed 345)
    patches float32 (N, 1, C, patch, patch): the 3-D "depth" layout SClusterFormer reads.

EMAP itself is computed in MATLAB upstream (`EMAP/FE_EMAP.m`: PCA to 7 components, extended attribute profiles for
area, moment of inertia and standard deviation, PCA of the profiles to one band). It is not reimplemented here:
pass the saved band (`.mat`/`.npy`, e.g. upstream's `EMAP/EMAP_Data/PaviaU_EMAP.mat`, key `Feature_E`) or any
(H, W) array as `extra_band`.

Files: `.mat` (scipy; MATLAB v7.3/HDF5 files must be converted) or `.npy`. In a `.mat` file the array is taken from
`key` if given, else the largest array with the expected number of dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitforge.errors import DataError

PAVIA_U_CLASSES = ["Asphalt", "Meadows", "Gravel", "Trees", "Painted metal sheets", "Bare Soil", "Bitumen",
                   "Self-Blocking Bricks", "Shadows"]


@dataclass
class HSIPatches:
    """Patches around the labelled pixels of one scene and a train/test split of them.

    Attributes:
        patches: (N, 1, C, P, P) float32, bands = PCA components then the extra band (if any).
        labels: (N,) int64 in 0..K-1.
        classes: K class names.
        positions: (N, 2) int64 (row, col) of every patch centre in the scene.
        train_idx, test_idx: indices into the N patches (stratified; test = everything not in train).
    """

    patches: np.ndarray
    labels: np.ndarray
    classes: list[str]
    positions: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_train, y_train, x_test, y_test) as torch tensors (float32 patches, int64 labels)."""
        x, y = torch.from_numpy(self.patches), torch.from_numpy(self.labels)
        tr, te = torch.from_numpy(self.train_idx), torch.from_numpy(self.test_idx)
        return x[tr], y[tr], x[te], y[te]


def load_array(path: str | Path, *, ndim: int, what: str, key: str | None = None) -> np.ndarray:
    """Read an `ndim`-D array from `.npy` or `.mat`. Errors name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif path.suffix == ".mat":
        arr = _mat_array(path, ndim, what, key)
    else:
        raise DataError(f"{path}: {what} must be a .mat or .npy file")
    if ndim == 2 and arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]  # a single band stored as (H, W, 1)
    if arr.ndim != ndim:
        raise DataError(f"{path}: {what} must be {ndim}-D, got shape {arr.shape}")
    return arr


def _mat_array(path: Path, ndim: int, what: str, key: str | None) -> np.ndarray:
    import scipy.io

    try:
        data = scipy.io.loadmat(path)
    except NotImplementedError:  # scipy's message for v7.3 files
        raise DataError(f"{path}: MATLAB v7.3 (HDF5) file; re-save with -v7 or convert the array to .npy") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .mat file ({e})") from None
    arrays = {k: v for k, v in data.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
    if key is not None:
        if key not in arrays:
            raise DataError(f"{path}: no variable {key!r} (found: {', '.join(arrays) or 'none'})")
        return arrays[key]
    fitting = [v for v in arrays.values() if v.ndim == ndim or (ndim == 2 and v.ndim == 3 and v.shape[-1] == 1)]
    if not fitting:
        shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items()) or "none"
        raise DataError(f"{path}: no {ndim}-D array for the {what} (variables: {shapes})")
    return max(fitting, key=lambda v: v.size)


def pca_whiten(cube: np.ndarray, n_components: int = 30, seed: int = 0) -> np.ndarray:
    """(H, W, bands) -> (H, W, n_components) float32: PCA with whitening fitted on all pixels (unit variance,
    uncorrelated components)."""
    from sklearn.decomposition import PCA

    H, W, bands = cube.shape
    pixels = cube.reshape(-1, bands).astype(np.float64)  # (H·W, bands)
    reduced = PCA(n_components=n_components, whiten=True, random_state=seed).fit_transform(pixels)
    return reduced.reshape(H, W, n_components).astype(np.float32)


def standardize(band: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation over the whole map (upstream's treatment of the EMAP band)."""
    band = band.astype(np.float64)
    std = band.std()
    return ((band - band.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def extract_patches(image: np.ndarray, gt: np.ndarray, patch_size: int = 13) -> tuple[np.ndarray, ...]:
    """Windows around every labelled pixel of a zero-padded (H, W, C) image.

    Returns:
        patches (N, C, P, P) float32, labels (N,) int64 = gt - 1, positions (N, 2) in row-major scan order.
    """
    if patch_size % 2 != 1:
        raise DataError(f"patch_size must be odd, got {patch_size}")
    m = patch_size // 2
    padded = np.pad(image, ((m, m), (m, m), (0, 0)))  # (H + 2m, W + 2m, C)
    rows, cols = np.nonzero(gt > 0)  # row-major, as upstream's loops
    windows = np.lib.stride_tricks.sliding_window_view(padded, (patch_size, patch_size), axis=(0, 1))  # (H, W, C, P, P)
    patches = np.ascontiguousarray(windows[rows, cols], dtype=np.float32)  # (N, C, P, P)
    labels = gt[rows, cols].astype(np.int64) - 1
    return patches, labels, np.stack([rows, cols], axis=1).astype(np.int64)


def stratified_split(labels: np.ndarray, train_fraction: float, seed: int = 345) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) indices; the same partition as upstream's `train_test_split(X, y, train_size,
    random_state, stratify=y)`."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must be in (0, 1), got {train_fraction}")
    try:
        tr, te = train_test_split(np.arange(len(labels)), train_size=train_fraction, random_state=seed,
                                  stratify=labels)
    except ValueError as e:
        counts = np.bincount(labels)
        raise DataError(f"cannot split {len(labels)} labelled pixels with train_fraction={train_fraction} "
                        f"(per-class counts {counts.tolist()}): {e}") from None
    return tr.astype(np.int64), te.astype(np.int64)


def load_hyperspectral(
    cube: str | Path,
    gt: str | Path,
    *,
    extra_band: str | Path | np.ndarray | None = None,
    cube_key: str | None = None,
    gt_key: str | None = None,
    extra_key: str | None = None,
    pca_components: int = 30,
    patch_size: int = 13,
    train_fraction: float = 0.05,
    seed: int = 345,
    class_names: list[str] | None = None,
) -> HSIPatches:
    """Scene files -> `HSIPatches` of shape (N, 1, pca_components [+ 1], P, P).

    Args:
        cube: (H, W, bands) cube file (.mat or .npy).
        gt: (H, W) ground-truth file, integers, 0 = unlabelled.
        extra_band: (H, W) band stacked after the PCA components (EMAP upstream): a file or an array; None = none.
        cube_key, gt_key, extra_key: variable names inside .mat files (default: the largest fitting array).
        pca_components: PCA components kept (30 upstream).
        patch_size: window side P (13 upstream).
        train_fraction: stratified training fraction (0.05 upstream for PaviaU).
        seed: split seed (345 upstream); also seeds the PCA solver.
        class_names: K names (default "1".."K", the ground-truth values).
    """
    x = load_array(cube, ndim=3, what="hyperspectral cube", key=cube_key)
    y = load_array(gt, ndim=2, what="ground truth", key=gt_key)
    _check_gt(y, x.shape[:2], gt, cube)
    if not 0 < pca_components <= x.shape[2]:
        raise DataError(f"{cube}: cannot keep {pca_components} PCA components of {x.shape[2]} bands")
    bands = [pca_whiten(x, pca_components, seed)]
    if extra_band is not None:
        bands.append(_extra_band(extra_band, extra_key, x.shape[:2], cube)[..., None])
    patches, labels, positions = extract_patches(np.concatenate(bands, axis=2), y, patch_size)
    K = int(y.max())
    names = list(class_names) if class_names is not None else [str(k) for k in range(1, K + 1)]
    if len(names) != K:
        raise DataError(f"{gt}: {K} classes in the ground truth but {len(names)} class names given")
    train_idx, test_idx = stratified_split(labels, train_fraction, seed)
    return HSIPatches(patches[:, None], labels, names, positions, train_idx, test_idx)


def _check_gt(y: np.ndarray, hw: tuple[int, int], gt, cube) -> None:
    if y.shape != hw:
        raise DataError(f"{gt}: ground truth is {y.shape[0]}x{y.shape[1]} but the cube {cube} is {hw[0]}x{hw[1]}")
    if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
        raise DataError(f"{gt}: ground truth must hold integer class ids, got {y.dtype} with fractions")
    if y.min() < 0 or y.max() < 1:
        raise DataError(f"{gt}: ground truth needs classes 1..K (0 = unlabelled), got values {y.min()}..{y.max()}")


def _extra_band(band, key: str | None, hw: tuple[int, int], cube) -> np.ndarray:
    name = "extra band array" if isinstance(band, np.ndarray) else str(band)
    arr = band if isinstance(band, np.ndarray) else load_array(band, ndim=2, what="extra (EMAP) band", key=key)
    arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    if arr.shape != hw:
        raise DataError(f"{name}: extra band is {arr.shape} but the cube {cube} is {hw[0]}x{hw[1]}")
    return standardize(arr)
