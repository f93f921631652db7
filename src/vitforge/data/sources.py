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
| `synthetic:N[,classes=K][,size=S][,channels=C][,seed=X]` | N generated images with class-dependent patterns |

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

from vitforge.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, is_image_file, open_image
from vitforge.errors import DataError, first_line

CIFAR_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
NAMED_SOURCES = ("digits", *CIFAR_NAMES, "synthetic")  # data specs that are names, not paths


class Source:
    """Base class: subclasses fill `classes`, `labels`, `ids`, `origin` and implement `load`."""

    classes: list[str]
    labels: np.ndarray
    ids: list[str]
    origin: str
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images are refused unread (data.max_image_pixels)

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
        return open_image(data, name=f"{self.origin}[{i}] {self.ids[i]}", max_pixels=self.max_pixels)


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
        return open_image(self.files[i], name=self.files[i], max_pixels=self.max_pixels)

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
    fcol = _pick_column(cols, CSV_FILE_COLUMNS, path, "file")
    lcol = next((c for c in CSV_LABEL_COLUMNS if c in cols), None)
    root = path.parent
    files = csv_files(path, [r[fcol] for r in rows], fcol)
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


CSV_FILE_COLUMNS = ("file", "filename", "image", "path", "id")
CSV_LABEL_COLUMNS = ("label", "class", "target", "class_name")


def csv_files(path: Path, entries: list[str], column: str) -> list[str]:
    """The image paths a CSV's file column names: relative to the CSV when any entry is found there; otherwise (the
    Kaggle layout: `train.csv` with `id,label` next to a `train/` folder, ids with or without the extension) looked
    up by relative path, file name or file stem in the image folders beside the CSV, `<csv stem>/` first. An entry
    found nowhere keeps its path next to the CSV and is reported as unreadable like any missing file.

    Raises:
        DataError: no entry is found next to the CSV or in any folder beside it (names the column and an entry).
    """
    root = path.parent
    direct = [root / e for e in entries]
    if any(p.exists() for p in direct[:1000]) or not entries:
        return [str(p) for p in direct]
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: (d.name != path.stem, d.name))
    for folder in folders:
        index = _image_index(folder)
        found = [index.get(e.strip().replace("\\", "/")) for e in entries]
        if any(found):
            return [f or str(d) for f, d in zip(found, direct, strict=True)]
    where = ", ".join(f"{d.name}/" for d in folders[:6]) or "no folders"
    raise DataError(f"{path}: {column!r} entries such as {entries[0]!r} are neither files next to the CSV nor images "
                    f"in the folders beside it ({where})")


def _image_index(folder: Path) -> dict[str, str]:
    """Every image under `folder` by relative path, file name and file stem (the first one wins a clash)."""
    index: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and is_image_file(p.name):
            for key in (p.relative_to(folder).as_posix(), p.name, p.stem):
                index.setdefault(key, str(p))
    return index


def cifar_batches(root: Path, split: str) -> ArraySource:
    """torchvision's CIFAR python format: `data_batch_1..5`/`test_batch` (10) or `train`/`test` (100).

    The batches are pickles; they are read by `read_cifar_pickle`, which builds nothing but plain data and numpy
    arrays, so a crafted batch cannot run code."""
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
        d = read_cifar_pickle(root / n)
        x, y = _field(d, "data", root / n), _field(d, label_key, root / n)
        try:
            x = np.asarray(x, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = [int(v) for v in y]
        except (TypeError, ValueError) as e:
            raise DataError(f"{root / n}: not CIFAR images and labels ({first_line(e)})") from None
        if len(x) != len(y):
            raise DataError(f"{root / n}: {len(x)} images but {len(y)} labels")
        images.append(x)
        labels += y
    names_ = _field(read_cifar_pickle(meta), key, meta)
    if not isinstance(names_, list) or not all(isinstance(c, (bytes, str)) for c in names_):
        raise DataError(f"{meta}: {key!r} is not a list of class names")
    classes = [c.decode("latin1") if isinstance(c, bytes) else c for c in names_]  # py3 pickles: bytes
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), labels, classes, f"{root}:{split}")


def _field(d: dict, key: str, path: Path):
    if key not in d:
        raise DataError(f"{path}: no {key!r} entry (found {', '.join(map(str, list(d)[:8]))})")
    return d[key]


class _Refused(pickle.UnpicklingError):
    """Something a CIFAR batch never holds (as opposed to a malformed pickle)."""


class _CifarUnpickler(pickle.Unpickler):
    """A pickle reader that builds only what CIFAR python batches hold: dicts, lists, tuples, bytes, str, numbers and
    numpy arrays of numbers. Every global a pickle names goes through `find_class`; only these resolve:

        numpy.core.multiarray._reconstruct, numpy._core.multiarray._reconstruct   ndarrays, pickle protocols 0-4
        numpy.core.numeric._frombuffer, numpy._core.numeric._frombuffer           ndarrays, pickle protocol 5
        numpy.ndarray                                                             what _reconstruct allocates
        numpy.dtype                                                               a numeric dtype from its code
        _codecs.encode                                                            bytes, protocols 0-2, latin1 only
    """

    def find_class(self, module: str, name: str):
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"it needs the global {module}.{name}, which a CIFAR batch never holds")
        return found


def _numeric_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:  # an object array's items would be arbitrary objects
        raise _Refused("it holds a numpy object array")
    return dt


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes under protocols 0-2: `encode(str, 'latin1')`, nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"it calls _codecs.encode with {encoding!r}")
    return text.encode("latin1")


_ARRAY = np.zeros(1)
_CIFAR_GLOBALS = {
    **{(m, "_reconstruct"): _ARRAY.__reduce_ex__(2)[0] for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _ARRAY.__reduce_ex__(5)[0] for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


def read_cifar_pickle(path: Path) -> dict:
    """One CIFAR python batch (or its meta file) as a dict with str keys, read by `_CifarUnpickler`.

    Raises:
        DataError: missing, refused (it names a global outside the list above) or not a readable pickled dict;
            one line naming the file.
    """
    if not path.exists():
        raise DataError(f"{path}: missing CIFAR batch file")
    try:
        with open(path, "rb") as f:
            # latin1: the original batches were pickled by Python 2, whose byte strings (the arrays' raw data
            # included) must come back byte for byte
            d = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise DataError(f"{path}: refused to read this CIFAR batch: {first_line(e, 160)} (only dicts, lists, bytes, "
                        f"strings, numbers and numeric numpy arrays are read)") from None
    except Exception as e:  # truncated or garbage files raise EOFError, ValueError, TypeError, ...
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {first_line(e, 120)})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR batch (a pickled {type(d).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def digits() -> ArraySource:
    """scikit-learn's bundled 8x8 handwritten digits (16 grey levels -> 0-255, replicated to RGB)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    rgb = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    return ArraySource(rgb, d.target, [str(i) for i in range(10)], "digits")


def named_cifar(name: str, split: str, *, download: bool, cache_dir: Path) -> ArraySource:
    """CIFAR-10/100 in `cache_dir/datasets` (torchvision's layout); downloads only when `download` is true.

    torchvision only downloads and checks the archive (its published MD5); the batches are read by `cifar_batches`
    (restricted unpickler), never by torchvision's dataset class, which unpickles them without restriction."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    root = cache_dir / "datasets"
    cls = getattr(tvd, CIFAR_NAMES[name])
    folder = root / cls.base_folder
    if not folder.is_dir():
        if not download:
            raise DataError(f"{name}: not found in {root}; set data.download=true (needs internet) or point "
                            f"data.train at an extracted cifar-10-batches-py directory")
        try:
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        except (OSError, RuntimeError, ValueError) as e:  # urllib errors are OSErrors; a bad checksum RuntimeError
            raise DataError(f"{name}: download failed ({first_line(e)}); are you offline? Point data.train at an "
                            f"extracted CIFAR batches directory instead") from None
    src = cifar_batches(folder, "test" if split == "test" else "train")
    src.origin = f"{name}:{split}"
    return src


SYNTHETIC_OPTIONS = {"classes": 10, "size": 32, "channels": 3, "seed": 0}
SYNTHETIC_LIMITS = {"classes": 2, "size": 4, "channels": 1, "seed": 0}  # smallest accepted value of each option
SYNTHETIC_FORM = "synthetic:N[,classes=K][,size=S][,channels=C][,seed=X], e.g. synthetic:1000,classes=10,size=32"
SYNTHETIC_MAX_BYTES = 2**30  # larger sets are generated item by item instead of held in memory


def parse_synthetic(spec: str) -> dict:
    """`synthetic:N[,key=value...]` -> {"n", "classes", "size", "channels", "seed"}; a bad part is a DataError."""
    head, *parts = spec.split(",")
    n = head.partition(":")[2]
    if not n.isdigit() or int(n) < 2:
        raise DataError(f"{spec}: the number of images must be a whole number >= 2 ({SYNTHETIC_FORM})")
    opts = dict(SYNTHETIC_OPTIONS, n=int(n))
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if key not in SYNTHETIC_OPTIONS or not eq:
            raise DataError(f"{spec}: unknown option {part!r}; options are {', '.join(SYNTHETIC_OPTIONS)} "
                            f"({SYNTHETIC_FORM})")
        if not value.strip().isdigit() or int(value) < SYNTHETIC_LIMITS[key]:
            raise DataError(f"{spec}: {key} must be a whole number >= {SYNTHETIC_LIMITS[key]}, got {value!r}")
        opts[key] = int(value)
    if opts["n"] < opts["classes"]:
        raise DataError(f"{spec}: {opts['n']} images cannot cover {opts['classes']} classes")
    return opts


class SyntheticSource(Source):
    """Generated images whose class is visible: learnable, and the same for the same options on every machine.

    Class k has a sinusoidal grating of its own orientation (k·180°/K, jittered), spatial frequency (1.5-4 cycles
    per image) and per-channel contrast, over a faint per-channel tint of its own; every image draws a random phase,
    an amplitude in [0.5, 1], a brightness offset and Gaussian pixel noise (sigma 0.35 of the grating's range) from a
    generator seeded by (seed, index). The tint alone is a weak, linear cue (brightness offsets blur it); the
    grating needs oriented filters. Labels are balanced (N mod K spread evenly) and shuffled by the seed. With 3
    channels the items are RGB uint8 images (the normal image pipeline); with any other channel count they are
    float tensors (C, S, S) fed to the model as they are (`model.args.in_chans=C`).

    Args:
        n: number of images.
        classes, size, channels, seed: see `SYNTHETIC_OPTIONS`.
        origin: the spec it was opened from.
    """

    def __init__(self, n: int, *, classes: int = 10, size: int = 32, channels: int = 3, seed: int = 0,
                 origin: str = ""):
        self.n, self.num_classes, self.size, self.channels, self.seed = n, classes, size, channels, seed
        self.origin = origin or f"synthetic:{n},classes={classes},size={size},channels={channels},seed={seed}"
        self.classes = [f"class{k}" for k in range(classes)]
        self.ids = [f"synthetic_{i:07d}" for i in range(n)]
        self.labels = np.random.default_rng([seed, n, classes, 1]).permutation(np.arange(n) % classes)
        rng = np.random.default_rng([seed, classes, channels, 2])
        self._theta = np.pi * (np.arange(classes) + rng.uniform(-0.25, 0.25, classes)) / classes
        self._freq = rng.uniform(1.5, 4.0, classes)
        self._contrast = rng.choice([-1.0, 1.0], (classes, channels)) * rng.uniform(0.4, 1.0, (classes, channels))
        self._tint = rng.uniform(-0.25, 0.25, (classes, channels))
        yy, xx = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
        self._grid = (xx, yy)
        self._all: np.ndarray | None = None

    def _pattern(self, i: int) -> np.ndarray:
        """Item i as float32 (S, S, C), roughly in [-1, 1]."""
        k = int(self.labels[i])
        rng = np.random.default_rng([self.seed, i, 3])
        phase, amp, offset = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.0), rng.uniform(-0.15, 0.15)
        xx, yy = self._grid
        u = xx * np.cos(self._theta[k]) + yy * np.sin(self._theta[k])
        wave = np.sin(2 * np.pi * self._freq[k] * u + phase)
        x = 0.7 * amp * wave[..., None] * self._contrast[k] + self._tint[k] + offset
        x = x + rng.normal(0.0, 0.35, x.shape)
        return np.clip(x, -1.0, 1.0).astype(np.float32)

    def _image(self, i: int) -> np.ndarray:
        return np.rint((self._pattern(i) + 1.0) * 127.5).astype(np.uint8)

    def features(self) -> np.ndarray:
        """Every item as float32 (N, C, S, S) (the channels != 3 form)."""
        return np.stack([self._pattern(i).transpose(2, 0, 1) for i in range(self.n)])

    def load(self, i: int) -> Image.Image:
        if self.channels != 3:
            raise DataError(f"{self.origin}: {self.channels}-channel items are tensors, not RGB images")
        arr = self._all[i] if self._all is not None else self._image(i)
        return Image.fromarray(arr)

    def array(self) -> np.ndarray | None:
        """All images (N, S, S, 3) uint8, generated on first use; None when larger than `SYNTHETIC_MAX_BYTES`."""
        if self.channels != 3 or self.n * self.size * self.size * 3 > SYNTHETIC_MAX_BYTES:
            return None
        if self._all is None:
            self._all = np.stack([self._image(i) for i in range(self.n)])
        return self._all

    def fingerprint(self) -> str:
        return f"{type(self).__name__}|{self.origin}|{len(self)}"


def open_synthetic(spec: str) -> SyntheticSource:
    o = parse_synthetic(spec)
    return SyntheticSource(o["n"], classes=o["classes"], size=o["size"], channels=o["channels"], seed=o["seed"],
                           origin=spec)


def open_source(spec: str, *, download: bool = False, cache_dir: Path | None = None, labeled: bool = True,
                max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Source:
    """Open a dataset given as a path or a name (see the module table).

    Args:
        spec: path or name; `:test` after a CIFAR directory or name selects its test split.
        download: allow a named dataset to be downloaded.
        cache_dir: where named datasets live.
        labeled: a folder of images without class sub-folders is only accepted when False.
        max_pixels: images with more pixels are skipped unread, named like any unreadable image
            (`data.max_image_pixels`).

    Raises:
        DataError: missing path, unknown format, empty class folder, unreadable file (message names it).
    """
    src = _open_spec(spec, download, cache_dir or default_cache_dir(), labeled)
    src.max_pixels = max_pixels
    return src


def _open_spec(spec: str, download: bool, cache_dir: Path, labeled: bool) -> Source:
    if spec.split(":")[0] == "synthetic" and not os.path.exists(spec):
        return open_synthetic(spec)
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


__all__ = ["ImageError", "Source", "ArraySource", "FileListSource", "ParquetSource", "SyntheticSource",
           "open_source", "check_same_classes", "default_cache_dir"]
