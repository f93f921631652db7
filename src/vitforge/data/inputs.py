"""`data.train=auto` and `vitforge predict --images auto`: find a competition's data under the platform's input
directory (Kaggle mounts every attached dataset read-only at `/kaggle/input/<dataset>/...`).

    find_inputs(root) -> Inputs(train, test, seen)      what the directory holds, classified
    resolve_auto(spec, want="train" | "test")           the path `auto` stands for, one line saying which

The root is `$VITFORGE_INPUT_ROOT` when set, else `/kaggle/input`. Folders are classified from their own listing
(never a whole-tree scan, so a dataset of 100k images is read in a few directory listings):

- ImageFolder (training data): >= 2 sub-folders, every one holding images, none named like a split (train, test,
  val, ...), no loose images.
- label CSV (training data): a `.csv` with a file column (file, filename, image, path, id) and a label column (label,
  class, target, class_name) whose first entry is an image next to the CSV or in a folder beside it.
- image folder (test images): loose images and no sub-folders of images.

Training data: the only candidate, else the only one whose name contains "train"; a CSV named like a submission or
test file, or an ImageFolder named test, never is. Test images: the only image folder (or ImageFolder named test),
else the only one whose name contains "test". The root itself holds datasets, one folder each, and is never data. Any
other situation is a one-line `DataError` listing what was seen, so the user can name the path instead.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vitforge.data.images import is_image_file
from vitforge.data.sources import CSV_FILE_COLUMNS, CSV_LABEL_COLUMNS, csv_files
from vitforge.errors import DataError

AUTO = "auto"
ROOT_ENV = "VITFORGE_INPUT_ROOT"
KAGGLE_INPUT = "/kaggle/input"
MAX_DEPTH = 5  # /kaggle/input/<dataset>/<archive folder>/<train>/<class>: deep enough for nested archives
SPLIT_NAMES = {"train", "training", "test", "testing", "val", "valid", "validation"}
NOT_TRAINING = ("submission", "test", "sample")  # CSV names that are never training labels


def input_root() -> Path:
    """`$VITFORGE_INPUT_ROOT`, else `/kaggle/input`."""
    return Path(os.environ.get(ROOT_ENV) or KAGGLE_INPUT)


@dataclass
class Found:
    """One classified folder or CSV."""

    path: Path
    kind: str  # "ImageFolder", "label CSV", "image folder"
    detail: str  # e.g. "2 classes: cat, dog" or "153 images"

    def describe(self, root: Path) -> str:
        return f"{_rel(self.path, root)} ({self.kind}, {self.detail})"


@dataclass
class Inputs:
    """Everything classified under a root: training candidates, test-image candidates, and other folders seen."""

    root: Path
    train: list[Found] = field(default_factory=list)
    test: list[Found] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # folders with neither (for the error message)

    def seen(self, limit: int = 8) -> str:
        items = [f.describe(self.root) for f in self.train + self.test] + self.other
        more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
        return "; ".join(items[:limit]) + more if items else "nothing"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def _listing(d: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(sub-folders, image files, CSV files) directly in `d`, hidden entries left out, sorted."""
    dirs, images, csvs = [], [], []
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    dirs.append(Path(e.path))
                elif is_image_file(e.name):
                    images.append(Path(e.path))
                elif e.name.lower().endswith(".csv"):
                    csvs.append(Path(e.path))
    except OSError:
        pass
    return sorted(dirs), images, sorted(csvs)


def _holds_images(d: Path) -> bool:
    return bool(_listing(d)[1])


def _label_csv(path: Path) -> Found | None:
    """A CSV of (file, label) rows whose first entry resolves to an image, else None."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            first = next(reader, None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    fcol = next((c for c in CSV_FILE_COLUMNS if c in cols), None)
    lcol = next((c for c in CSV_LABEL_COLUMNS if c in cols), None)
    if fcol is None or lcol is None or first is None or not first.get(fcol):
        return None
    try:
        image = Path(csv_files(path, [first[fcol]], fcol)[0])
    except DataError:
        return None
    if not (image.is_file() and is_image_file(image.name)):
        return None
    return Found(path, "label CSV", f"columns {fcol},{lcol}; images in {_rel(image.parent, path.parent)}/")


def find_inputs(root: Path) -> Inputs:
    """Classify the folders and CSVs under `root` (see the module table); the folders of an ImageFolder or of an
    image folder are not descended into.

    Raises:
        DataError: `root` does not exist (names it and the environment variable that moves it).
    """
    if not root.is_dir():
        raise DataError(f"no input directory {root} (not on Kaggle?); set {ROOT_ENV}=DIR to search another one, or "
                        f"give the data path itself")
    out = Inputs(root)
    todo = [(root, 0)]
    while todo:
        d, depth = todo.pop(0)
        dirs, images, csvs = _listing(d)
        for c in csvs:
            found = _label_csv(c)
            if found and not any(w in c.stem.lower() for w in NOT_TRAINING):
                out.train.append(found)
        if d == root:  # the root holds datasets (one folder each), never classes or images of its own
            todo += [(s, 1) for s in dirs]
            continue
        with_images = [s for s in dirs if _holds_images(s)]
        if images and not with_images:
            out.test.append(Found(d, "image folder", f"{len(images)} images"))
            continue
        splits = {s.name.lower() for s in dirs} & SPLIT_NAMES  # train/ + test/ of images: splits, not classes
        if not images and len(dirs) >= 2 and len(with_images) == len(dirs) and not splits:
            names = [s.name for s in dirs]
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            out.train.append(Found(d, "ImageFolder", f"{len(names)} classes: {shown}"))
            continue
        if not csvs and not dirs:
            out.other.append(f"{_rel(d, root)} (no images)")
        if depth < MAX_DEPTH:
            todo += [(s, depth + 1) for s in dirs]
    return out


def _pick(found: list[Found], word: str) -> Found | None:
    if len(found) == 1:
        return found[0]
    named = [f for f in found if word in (f.path.stem if f.kind == "label CSV" else f.path.name).lower()]
    return named[0] if len(named) == 1 else None


def choose(inputs: Inputs, want: str) -> Found:
    """The training data (`want="train"`) or test-image folder (`want="test"`) of `inputs`.

    Raises:
        DataError: none, or several with none singled out by name; one line listing what was seen.
    """
    if want == "train":  # an ImageFolder named test is a labelled test set, not training data
        found = [f for f in inputs.train if "test" not in f.path.name.lower()]
        word, what, option = "train", "training data (an ImageFolder or a label CSV)", "data.train"
    else:  # a labelled test set is predicted like unlabeled images
        found = inputs.test + [f for f in inputs.train if f.kind == "ImageFolder" and "test" in f.path.name.lower()]
        word, what, option = "test", "test images (a folder of images)", "--images"
    picked = _pick(found, word)
    if picked is not None:
        return picked
    if not found:
        raise DataError(f"{option}=auto: no {what} under {inputs.root}; saw: {inputs.seen()}; give {option}=PATH")
    raise DataError(f"{option}=auto: {len(found)} candidates for {what} under {inputs.root} and none is the only "
                    f"one named '{word}': {'; '.join(f.describe(inputs.root) for f in found[:8])}; give "
                    f"{option}=PATH")


def resolve_auto(spec: str, want: str = "train", *, root: Path | None = None, say=None) -> str:
    """`spec` itself, or for `auto` the path found under `root` (default `input_root()`), after one line saying
    what was chosen (to `say`, default stderr).

    Args:
        spec: a data spec; only the exact word `auto` is resolved.
        want: "train" (data.train) or "test" (predict --images).
    """
    if spec != AUTO:
        return spec
    inputs = find_inputs(root or input_root())
    chosen = choose(inputs, want)
    line = f"{'data.train' if want == 'train' else '--images'}=auto: {chosen.path} ({chosen.kind}, {chosen.detail})"
    if want == "train":
        try:
            line += f"; test images: {choose(inputs, 'test').path}"
        except DataError:
            pass
    (say or _stderr)(line)
    return str(chosen.path)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
