"""Dataset sources, chosen by what the path is.

| spec | source |
|---|---|
| `x.parquet` | Hugging Face image parquet: an image column (struct{bytes, path}) + an int label column |
| `dir/` with class sub-folders | ImageFolder (`dir/<class>/*.jpg`) |
| `dir/` with `data_batch_*` or `train`+`meta` | CIFAR-10/100 python batches (`dir:test` for the test batch) |
| `x.csv` | CSV with a file column (relative to the CSV) and a label column |
| `dir/` with images only | unlabeled folder (for predict) |
| `digits` | scikit-learn's bundled 8x8 digits (1,797 images) |
| `cifar10`, `cifar100` (`:test`) | torchvision's CIFAR download into the cache (only with `data.download=true`) |

Every source exposes `classes`, `labels` (int64, -1 = unlabeled), `ids` (a name per item for logs and CSVs),
`load(i)` (an RGB PIL image) and, when the data is already decoded, `array()` (N, H, W, 3) uint8.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from vitforge.data.images import ImageError, is_image_file, open_image
from vitforge.errors import DataError, first_line

CIFAR_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
NAMED_SOURCES = ("digits", *CIFAR_NAMES)  # data specs that are names, not paths


class Source:
    """Base class: subclasses fill `classes`, `labels`, `ids`, `origin` and implement `load`."""

    classes: list[str]
    labels: np.ndarray
    ids: list[str]
    origin: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labeled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def array(self) -> np.ndarray | None:
        """Already-decoded images (N, H, W, 3) uint8, or None."""
        return None

    def fingerprint(self) -> str:
        """Changes whenever the underlying data changes (used as the decode-cache key)."""
        p = Path(self.origin)
        st = p.stat() if p.exists() else None
        size, mtime = (st.st_size, st.st_mtime_ns) if st else (0, 0)
        return f"{type(self).__name__}|{self.origin}|{size}|{mtime}|{len(self)}"

    def describe(self) -> str:
        return f"{self.origin} ({len(self)} images, {len(self.classes)} classes)"


class ArraySource(Source):
    """Images already decoded in memory (N, H, W, 3) uint8."""

    def __init__(self, images: np.ndarray, labels, classes: list[str], origin: str, ids: list[str] | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"{origin}: expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.origin = origin
        self.ids = ids or [f"{i:06d}" for i in range(len(images))]

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def array(self) -> np.ndarray:
        return self.images


class ParquetSource(Source):
    """Hugging Face image parquet (`img`/`image` struct{bytes, path} + `label`); class names from schema metadata."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable parquet file ({first_line(e)})") from None
        img_col = _pick_column(table.column_names, ("img", "image", "images"), path, "image")
        self.origin = str(path)
        col = table.column(img_col).combine_chunks()
        self._bytes = col.field("bytes").to_pylist() if hasattr(col, "field") else col.to_pylist()
        paths = col.field("path").to_pylist() if hasattr(col, "field") else [None] * len(self._bytes)
        self.ids = [p or f"{i:06d}" for i, p in enumerate(paths)]
        label_col = next((c for c in ("label", "labels", "fine_label") if c in table.column_names), None)
        meta_names = _hf_class_names(table.schema.metadata, label_col)
        if label_col is None:
            self.labels = np.full(len(self._bytes), -1, dtype=np.int64)
            self.classes = meta_names or []
        else:
            self.labels = np.asarray(table.column(label_col).to_numpy(zero_copy_only=False), dtype=np.int64)
            n = int(self.labels.max()) + 1 if len(self.labels) else 0
            self.classes = meta_names or [str(i) for i in range(n)]
            if n > len(self.classes):
                raise DataError(f"{path}: label {n - 1} is out of range for {len(self.classes)} class names")

    def load(self, i: int) -> Image.Image:
        data = self._bytes[i]
        if data is None:
            raise ImageError(f"{self.ids[i]}: no image bytes in {self.origin}")
        return open_image(data, name=f"{self.origin}[{i}] {self.ids[i]}")


def _pick_column(columns: list[str], candidates: tuple[str, ...], path: Path, what: str) -> str:
    for c in candidates:
        if c in columns:
            return c
    raise DataError(f"{path}: no {what} column (looked for {', '.join(candidates)}; found {', '.join(columns)})")


def _hf_class_names(metadata: dict | None, label_col: str | None) -> list[str] | None:
    if not metadata or b"huggingface" not in metadata or label_col is None:
        return None
    try:
        info = json.loads(metadata[b"huggingface"])
        return list(info["info"]["features"][label_col]["names"])
    except (KeyError, TypeError, ValueError):
        return None


class FileListSource(Source):
    """Images on disk given as (path, label) lists."""

    def __init__(self, files: list[str], labels, classes: list[str], origin: str, root: str | None = None):
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.origin = origin
        base = root or origin
        self.ids = [os.path.relpath(f, base) for f in files]

    def load(self, i: int) -> Image.Image:
        return open_image(self.files[i], name=self.files[i])

    def fingerprint(self) -> str:
        """Stable across processes (hashlib, not Python's salted hash): paths, sizes and modification times."""
        h = hashlib.sha1()
        for f in self.files:
            try:
                st = os.stat(f)
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{f}|missing\n".encode())
        return f"{type(self).__name__}|{self.origin}|{len(self)}|{h.hexdigest()}"


def image_folder(root: Path) -> FileListSource:
    """`root/<class>/**/<image>`; classes sorted by name. Empty class folders are an error naming the folder."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for k, d in enumerate(class_dirs):
        found = sorted(str(p) for p in d.rglob("*") if p.is_file() and is_image_file(p.name))
        if not found:
            raise DataError(f"class folder {d} contains no images ({', '.join(e for e in ('.jpg', '.png'))}, ...)")
        files += found
        labels += [k] * len(found)
    return FileListSource(files, labels, [d.name for d in class_dirs], str(root))


def flat_folder(root: Path) -> FileListSource:
    """Every image under `root` (recursively), unlabeled, sorted by path."""
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        raise DataError(f"{root}: no image files found")
    return FileListSource(files, [-1] * len(files), [], str(root))


def csv_source(path: Path) -> FileListSource:
    """CSV with a header: a file column (file/filename/image/path/id) and a label column (label/class/target)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{path}: CSV has no rows")
    cols = list(rows[0].keys())
    fcol = _pick_column(cols, ("file", "filename", "image", "path", "id"), path, "file")
    lcol = next((c for c in ("label", "class", "target", "class_name") if c in cols), None)
    root = path.parent
    files = [str(root / r[fcol]) for r in rows]
    if lcol is None:
        return FileListSource(files, [-1] * len(files), [], str(path), root=str(root))
    raw = [(r[lcol] or "").strip() for r in rows]
    empty = next((i for i, v in enumerate(raw) if not v), None)
    if empty is not None:
        raise DataError(f"{path}: row {empty + 2} ({rows[empty][fcol]}) has an empty {lcol!r}")
    if all(v.lstrip("-").isdigit() for v in raw):
        labels = [int(v) for v in raw]
        bad = next((i for i, v in enumerate(labels) if v < 0), None)
        if bad is not None:
            raise DataError(f"{path}: row {bad + 2} ({rows[bad][fcol]}) has label {labels[bad]}; class indices "
                            f"are >= 0")
        classes = [str(i) for i in range(max(labels) + 1)]
    else:
        classes = sorted(set(raw))
        labels = [classes.index(v) for v in raw]
    return FileListSource(files, labels, classes, str(path), root=str(root))


def cifar_batches(root: Path, split: str) -> ArraySource:
    """torchvision's CIFAR python format: `data_batch_1..5`/`test_batch` (10) or `train`/`test` (100)."""
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    elif (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    if (root / "data_batch_1").exists():
        names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        meta, key, label_key = root / "batches.meta", "label_names", "labels"
    else:
        names, meta, key, label_key = [split], root / "meta", "fine_label_names", "fine_labels"
    images, labels = [], []
    for n in names:
        d = _unpickle(root / n)
        images.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(d[label_key])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _unpickle(meta)[key]]  # py3 pickles: bytes
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), labels, classes, f"{root}:{split}")


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DataError(f"{path}: missing CIFAR batch file")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def digits() -> ArraySource:
    """scikit-learn's bundled 8x8 handwritten digits (16 grey levels -> 0-255, replicated to RGB)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    rgb = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    return ArraySource(rgb, d.target, [str(i) for i in range(10)], "digits")


def named_cifar(name: str, split: str, *, download: bool, cache_dir: Path) -> ArraySource:
    """torchvision CIFAR in `cache_dir/datasets`; downloads only when `download` is true."""
    import torchvision.datasets as tvd

    root = cache_dir / "datasets"
    cls = getattr(tvd, CIFAR_NAMES[name])
    try:
        ds = cls(str(root), train=(split != "test"), download=download)
    except RuntimeError as e:
        if download:
            raise DataError(f"{name}: download failed ({first_line(e)}); are you offline? Point "
                            f"data.train at an extracted CIFAR batches directory instead") from None
        raise DataError(f"{name}: not found in {root}; set data.download=true (needs internet) or point data.train "
                        f"at an extracted cifar-10-batches-py directory") from None
    except OSError as e:
        raise DataError(f"{name}: download failed ({e}); point data.train at a local copy instead") from None
    return ArraySource(np.ascontiguousarray(ds.data), ds.targets, list(ds.classes), f"{name}:{split}")


def open_source(spec: str, *, download: bool = False, cache_dir: Path | None = None, labeled: bool = True) -> Source:
    """Open a dataset given as a path or a name (see the module table).

    Args:
        spec: path or name; `:test` after a CIFAR directory or name selects its test split.
        download: allow a named dataset to be downloaded.
        cache_dir: where named datasets live.
        labeled: a folder of images without class sub-folders is only accepted when False.

    Raises:
        DataError: missing path, unknown format, empty class folder, unreadable file (message names it).
    """
    cache_dir = cache_dir or default_cache_dir()
    base, _, given = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    if given and given not in SPLITS:
        raise DataError(f"{spec}: unknown split {given!r}; CIFAR batches and names take :{' or :'.join(SPLITS)}")
    split = given or "train"
    if base == "digits":
        if given:
            raise DataError(f"{spec}: digits has no {given} split (hold one out with data.val_split)")
        return digits()
    if base in CIFAR_NAMES:
        return named_cifar(base, split, download=download, cache_dir=cache_dir)
    path = Path(base).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {base}")
    if given and not (path.is_dir() and _is_cifar_dir(path)):
        raise DataError(f"{spec}: a :{given} split only applies to CIFAR batch folders and names; give the path of "
                        f"the {given} data itself")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return ParquetSource(path)
        if suffix == ".csv":
            return csv_source(path)
        if suffix in (".mat", ".npy"):
            raise DataError(f"{path}: hyperspectral cubes need a hyperspectral recipe (see recipes/hsi)")
        raise DataError(f"{path}: unsupported file type {suffix!r} (expected .parquet, .csv or a directory)")
    return _open_dir(path, split, labeled)


SPLITS = ("train", "test")


def _is_cifar_dir(path: Path) -> bool:
    names = {e.name for e in path.iterdir() if not e.name.startswith(".")}
    return bool({"data_batch_1", "batches.meta"} <= names or {"train", "meta"} <= names or names & {
        "cifar-10-batches-py", "cifar-100-python"})


def _open_dir(path: Path, split: str, labeled: bool) -> Source:
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if _is_cifar_dir(path):
        return cifar_batches(path, split)
    subdirs = [e for e in entries if e.is_dir()]
    loose = [e for e in entries if e.is_file() and is_image_file(e.name)]
    if subdirs and not loose:
        src = image_folder(path)
        return src if labeled else FileListSource(src.files, src.labels, src.classes, src.origin)
    if not labeled:
        return flat_folder(path)
    if loose:
        raise DataError(f"{path}: images without class sub-folders; training needs {path}/<class>/<image> "
                        f"(a flat folder is only for `vitforge predict`)")
    raise DataError(f"{path}: empty directory (no class folders, no images)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("VITFORGE_CACHE", Path.home() / ".cache" / "vitforge"))


def check_same_classes(classes: list[str], other: Source, what: str) -> np.ndarray:
    """Map `other`'s labels onto the training `classes` by name; a class unknown to them (or no labels) is an
    error."""
    if not other.labeled:
        raise DataError(f"{what} {other.origin} has no labels (class folders, a label column or a CSV label column)")
    if other.classes == classes:
        return other.labels
    unknown = [c for c in other.classes if c not in classes]
    if unknown:
        raise DataError(f"{what} {other.origin} has classes not in the training set: {', '.join(unknown[:10])} "
                        f"(training classes: {', '.join(classes[:20])})")
    remap = np.array([classes.index(c) for c in other.classes], dtype=np.int64)
    return remap[other.labels]


__all__ = ["ImageError", "Source", "ArraySource", "FileListSource", "ParquetSource", "open_source",
           "check_same_classes", "default_cache_dir"]
