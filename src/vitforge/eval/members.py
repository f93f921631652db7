"""Ensemble members and their weights from held-out scores (`--weights auto`).

A member is what one path on the command line stands for: a checkpoint, a run directory (its best.pt), or a CV
directory (`vitforge cv`: all its fold models, averaged with equal weights). Weights are per member; a CV
directory's weight is shared equally by its folds.

`--weights auto` rule: w_m proportional to exp(-L_m), L_m = the member's held-out log-loss (mean negative log
probability of the true class on images it did not train on):

- exp(-L) is the geometric mean of the probability the member gives the right class, a number in (0, 1]; a member
  at chance level (L = ln K) gets 1/K of the weight of a perfect one.
- Log-loss, not accuracy: averaging probabilities is what the weights change, and the log-loss is the proper
  scoring rule of probabilities. Accuracy ignores confidence (a model that predicts 0.5 for everything can have
  the same top-1 as a calibrated one) and moves in steps of 1/N (153 validation images: 0.65 points), so
  accuracy-proportional weights (the rule in AlphsX/Muffyn's README, "Weighted Averaging") come out almost equal
  whatever the members are worth.
- exp(-L), not 1/L: bounded, so a member that happens to be near-perfect on a small held-out set does not take an
  unbounded share. It is Bayesian model averaging with the held-out likelihood tempered to one image; untempered
  BMA (exp(-N L)) puts all the weight on one member for any realistic N, which is no ensemble at all.

Held-out scores: a CV directory's out-of-fold predictions (`oof.csv`, every training image predicted by the fold
model that did not train on it); a run's `best.pt` validation loss (the run's held-out split). The best epoch was
chosen on that same split, so a run's score is slightly optimistic; out-of-fold scores of finished CVs are not.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitforge.checkpoint import load_checkpoint, resolve
from vitforge.errors import VitforgeError
from vitforge.eval.loading import load_for_inference, source_kind

CSV_FLOOR = 1e-6  # oof.csv holds probabilities with 6 decimals: 0.000000 means "below 5e-7"


@dataclass
class Member:
    """One ensemble member: the path given, what it is, and the checkpoints it runs."""

    source: str
    kind: str  # "cv" or "run"
    checkpoints: list[Path]


@dataclass
class HeldOut:
    """A member's held-out score."""

    log_loss: float
    accuracy: float  # percent
    n: int
    what: str  # where the score comes from, for printing


def is_cv_dir(path: Path) -> bool:
    return (path / "cv.json").is_file()


def expand_members(sources) -> list[Member]:
    """Members of the paths given: a CV directory (with cv.json) gives its fold runs; runs and files as given.

    Raises:
        VitforgeError: nothing given, or a CV directory whose folds are not all trained.
    """
    members = []
    for s in [sources] if isinstance(sources, (str, Path)) else sources:
        p = Path(s).expanduser()
        if is_cv_dir(p):
            folds = json.loads((p / "cv.json").read_text())["folds"]
            runs = [p / f"fold_{k}" for k in range(folds)]
            missing = [r.name for r in runs if not (r / "checkpoints" / "best.pt").is_file()]
            if missing:
                raise VitforgeError(f"{p}: fold(s) {', '.join(missing)} have no best.pt yet; finish the CV first "
                                    f"(rerun `vitforge cv` with the same arguments)")
            members.append(Member(str(s), "cv", runs))
        else:
            members.append(Member(str(s), "run", [p]))
    if not members:
        raise VitforgeError("give at least one CV directory, run directory or checkpoint")
    return members


def expand_sources(sources) -> list[Path]:
    """Every checkpoint of the members of `sources` (CV directories give their fold runs), in order."""
    return [c for m in expand_members(sources) for c in m.checkpoints]


def log_loss(probs: np.ndarray, labels: np.ndarray, floor: float = 1e-12) -> float:
    """Mean -log p(true class) of (N, K) probabilities, each floored at `floor`."""
    p = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(p, floor)).mean())


def read_oof(cv_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(ids, folds (N,), labels (N,), probs (N, K), classes) of a finished CV's oof.csv.

    Raises:
        VitforgeError: the CV is not finished (no cv_summary.json / oof.csv) or the file is not an oof.csv.
    """
    path = cv_dir / "oof.csv"
    if not (cv_dir / "cv_summary.json").is_file() or not path.is_file():
        raise VitforgeError(f"{cv_dir}: no out-of-fold predictions yet (oof.csv is written when every fold is done); "
                            f"finish the CV first (rerun `vitforge cv` with the same arguments)")
    classes = json.loads((cv_dir / "cv_summary.json").read_text())["classes"]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [f"prob_{c}" for c in classes]
    if not rows or any(c not in rows[0] for c in ("file", "fold", "label", *cols)):
        raise VitforgeError(f"{path}: expected columns file, fold, label, {', '.join(cols)}")
    index = {c: k for k, c in enumerate(classes)}
    bad = next((r["label"] for r in rows if r["label"] not in index), None)
    if bad is not None:
        raise VitforgeError(f"{path}: label {bad!r} is not one of the CV's classes")
    ids = [r["file"] for r in rows]
    folds = np.array([int(r["fold"]) for r in rows], dtype=np.int64)
    labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    probs = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float64)
    return ids, folds, labels, probs, classes


def held_out(member: Member) -> HeldOut:
    """The member's held-out log-loss and accuracy (module docstring).

    Raises:
        VitforgeError: a checkpoint that carries no validation metrics (e.g. last.pt, or a run without a held-out
            split); the message says to give numeric weights instead.
    """
    if member.kind == "cv":
        _, _, labels, probs, _ = read_oof(Path(member.source).expanduser())
        acc = float((probs.argmax(1) == labels).mean() * 100)
        return HeldOut(log_loss(probs, labels, CSV_FLOOR), acc, len(labels), "out-of-fold")
    path = member.checkpoints[0]
    if source_kind(path) == "checkpoint":
        ck = load_checkpoint(resolve(path))
        path, m = ck["path"], ck.get("metrics") or {}
    else:  # an export keeps the metrics of the checkpoint it came from
        m = load_for_inference(path)[1].get("metrics") or {}
    if not m.get("n") or m.get("loss") is None or not math.isfinite(m["loss"]):
        raise VitforgeError(f"{path}: no held-out score in this model (only a run's best.pt, and exports of it, record "
                            f"the validation loss); use its run directory, or give one number per model to --weights")
    return HeldOut(float(m["loss"]), float(m["top1"]), int(m["n"]), "validation")


def weights_from_losses(losses: list[float]) -> list[float]:
    """exp(-L_m) normalised to sum 1 (module docstring); computed relative to the best member for stability."""
    best = min(losses)
    w = [math.exp(-(v - best)) for v in losses]
    return [v / sum(w) for v in w]


def auto_weights(members: list[Member]) -> tuple[list[float], list[HeldOut]]:
    """(member weights summing to 1, their held-out scores) by the `--weights auto` rule."""
    scores = [held_out(m) for m in members]
    return weights_from_losses([s.log_loss for s in scores]), scores


def describe_weights(members: list[Member], weights: list[float], scores: list[HeldOut] | None) -> str:
    """The lines `--weights auto` prints: one per member with its weight and the score it came from."""
    head = "ensemble weights" + (" from held-out log-loss (w ~ exp(-log-loss)):" if scores else ":")
    lines = [head]
    for i, (m, w) in enumerate(zip(members, weights, strict=True)):
        folds = f" ({len(m.checkpoints)} folds)" if m.kind == "cv" else ""
        line = f"  {w:.3f}  {m.source}{folds}"
        if scores:
            s = scores[i]
            line += f"  {s.what} log-loss {s.log_loss:.4f}, top-1 {s.accuracy:.2f}% on {s.n} images"
        lines.append(line)
    return "\n".join(lines)
