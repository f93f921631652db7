"""Stacking (`vitforge stack`): a logistic-regression meta-learner on the out-of-fold probabilities of K-fold CVs.

Inputs are finished `vitforge cv` directories over the same images (one per architecture or recipe). Their oof.csv
files give, for every training image, each member's probabilities from the fold model that did not train on it.

    features    per member, its logits recovered from the probabilities (log p - mean log p, the centred log-ratio;
                `features="probs"` uses the raw probabilities, as AlphsX/Muffyn's README "Stacking" does). With
                logits one weight per member reproduces that member exactly, and the model family includes every
                geometric pooling of the members.
    meta model  scikit-learn `LogisticRegression` (multinomial, L2, `C`), fitted on all out-of-fold rows, then
                applied to the members' test probabilities (each member = the mean of its fold models, with the TTA
                its out-of-fold predictions used).

Honest comparison: the meta-learner never scores rows it was fitted on. Its out-of-fold score comes from nested
cross-validation over the OOF rows with the CV's own folds: for each fold k, fit on the rows of the other folds,
predict fold k's rows; the K held-out blocks together are scored once. The `--weights auto` rule (weights from
held-out log-loss, `vitforge.eval.members`) is scored the same way (weights from the other folds' rows), and equal
averaging needs no fitting. All three, and every member alone, are reported side by side.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from vitforge.errors import VitforgeError
from vitforge.eval.ensemble import predict_ensemble
from vitforge.eval.members import CSV_FLOOR, log_loss, read_oof, weights_from_losses

log = logging.getLogger(__name__)
FEATURES = ("logits", "probs")
METHODS = ("stack", "weighted", "mean")


@dataclass
class OOFSet:
    """Out-of-fold predictions of M CV directories, aligned on the same N images."""

    cv_dirs: list[Path]
    ids: list[str]
    folds: np.ndarray  # (N,) fold of each row (the first CV's)
    labels: np.ndarray  # (N,)
    probs: np.ndarray  # (M, N, K)
    classes: list[str]


def load_oof_set(cv_dirs) -> OOFSet:
    """Read and align the oof.csv of every CV directory (rows matched by file name).

    Raises:
        VitforgeError: fewer than one directory, an unfinished CV, different classes, images or labels (named).
    """
    dirs = [Path(d).expanduser() for d in ([cv_dirs] if isinstance(cv_dirs, (str, Path)) else cv_dirs)]
    if not dirs:
        raise VitforgeError("give at least one CV directory (from `vitforge cv`)")
    for d in dirs:
        if not (d / "cv.json").is_file():
            raise VitforgeError(f"{d}: not a CV directory (no cv.json); stacking needs `vitforge cv` output")
    ids, folds, labels, first, classes = read_oof(dirs[0])
    probs = [first]
    for d in dirs[1:]:
        ids2, _, labels2, p2, classes2 = read_oof(d)
        if classes2 != classes:
            raise VitforgeError(f"{d}: its classes {classes2[:8]} differ from those of {dirs[0]} {classes[:8]}")
        pos = {name: r for r, name in enumerate(ids2)}
        missing = [i for i in ids if i not in pos]
        if missing or len(ids2) != len(ids):
            raise VitforgeError(f"{d}: its out-of-fold images differ from those of {dirs[0]} (e.g. "
                                f"{(missing or sorted(set(ids2) - set(ids)))[0]}); stack CVs of the same data")
        rows = np.array([pos[i] for i in ids], dtype=np.int64)
        if not np.array_equal(labels2[rows], labels):
            bad = ids[int(np.flatnonzero(labels2[rows] != labels)[0])]
            raise VitforgeError(f"{d}: image {bad} has another label than in {dirs[0]}")
        probs.append(p2[rows])
    return OOFSet(dirs, ids, folds, labels, np.stack(probs), classes)


def features(probs: np.ndarray, kind: str = "logits") -> np.ndarray:
    """Meta-features (N, M*K) from member probabilities (M, N, K): centred log-probabilities or the raw ones."""
    if kind not in FEATURES:
        raise VitforgeError(f"--features: must be one of {', '.join(FEATURES)}, got {kind!r}")
    x = probs
    if kind == "logits":
        lp = np.log(np.maximum(probs, CSV_FLOOR))
        x = lp - lp.mean(axis=2, keepdims=True)
    return np.concatenate(list(x), axis=1)


class MetaLearner:
    """Multinomial logistic regression on member features, returning probabilities over all K classes."""

    def __init__(self, num_classes: int, *, C: float = 1.0, kind: str = "logits"):
        if not C > 0:
            raise VitforgeError(f"--C: must be > 0, got {C}")
        self.k, self.C, self.kind = num_classes, C, kind
        self.model: LogisticRegression | None = None

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> MetaLearner:
        """probs (M, N, K), labels (N,)."""
        self.model = LogisticRegression(C=self.C, max_iter=5000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on separable toy data; the score says what matters
            self.model.fit(features(probs, self.kind), labels)
        return self

    def predict_proba(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) probabilities; a class absent from the fitted rows gets 0."""
        assert self.model is not None
        p = self.model.predict_proba(features(probs, self.kind))
        out = np.zeros((p.shape[0], self.k))
        out[:, self.model.classes_] = p
        return out


def nested_stacking(oof: OOFSet, *, C: float = 1.0, kind: str = "logits") -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Out-of-fold probabilities (N, K) of the meta-learner, and the rows each fold's meta-model was fitted on.

    For each fold k: fit on the rows whose fold is not k, predict the rows of fold k. No row is ever predicted by a
    meta-model that saw it.
    """
    out = np.zeros(oof.probs.shape[1:])
    fit_rows = {}
    for k in np.unique(oof.folds):
        test = np.flatnonzero(oof.folds == k)
        train = np.flatnonzero(oof.folds != k)
        if len(train) == 0:
            raise VitforgeError("stacking needs out-of-fold rows of at least two folds")
        meta = MetaLearner(len(oof.classes), C=C, kind=kind).fit(oof.probs[:, train], oof.labels[train])
        out[test] = meta.predict_proba(oof.probs[:, test])
        fit_rows[int(k)] = train
    return out, fit_rows


def nested_weighted(oof: OOFSet) -> np.ndarray:
    """Out-of-fold probabilities of the `--weights auto` average, weights from the other folds' rows."""
    out = np.zeros(oof.probs.shape[1:])
    for k in np.unique(oof.folds):
        test, train = oof.folds == k, oof.folds != k
        w = weights_from_losses([log_loss(p[train], oof.labels[train], CSV_FLOOR) for p in oof.probs])
        out[test] = np.tensordot(np.asarray(w), oof.probs[:, test], axes=1)
    return out


def scores(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """log-loss, accuracy (%), macro-F1 of (N, K) probabilities."""
    pred = probs.argmax(1)
    return {"log_loss": log_loss(probs, labels, CSV_FLOOR), "accuracy": float((pred == labels).mean() * 100),
            "macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(num_classes)),
                                       zero_division=0))}


def compare(oof: OOFSet, *, C: float = 1.0, kind: str = "logits") -> dict:
    """Out-of-fold scores of equal averaging, weighted averaging (`--weights auto`), stacking, and each member.

    Returns {"n", "folds", "methods": {name: {log_loss, accuracy, macro_f1}}, "members": [{cv_dir, ...scores}],
    "weights" (fitted on all rows, what a submission uses), "fit_rows" {fold: rows the meta-model was fitted on}}.
    """
    k = len(oof.classes)
    stacked, fit_rows = nested_stacking(oof, C=C, kind=kind)
    methods = {"mean": scores(oof.probs.mean(0), oof.labels, k),
               "weighted": scores(nested_weighted(oof), oof.labels, k), "stack": scores(stacked, oof.labels, k)}
    members = [{"cv_dir": str(d), **scores(p, oof.labels, k)} for d, p in zip(oof.cv_dirs, oof.probs, strict=True)]
    weights = weights_from_losses([m["log_loss"] for m in members])
    return {"n": len(oof.ids), "folds": int(len(np.unique(oof.folds))), "methods": methods, "members": members,
            "weights": weights, "fit_rows": fit_rows, "C": C, "features": kind}


def combine(method: str, oof: OOFSet, test_probs: np.ndarray, *, C: float = 1.0, kind: str = "logits") -> np.ndarray:
    """(N_test, K) probabilities of `method` for members' test probabilities (M, N_test, K); the stacker and the
    weights are fitted on all out-of-fold rows (none of which is a test image)."""
    if method not in METHODS:
        raise VitforgeError(f"--method: must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "mean":
        return test_probs.mean(0)
    if method == "weighted":
        w = weights_from_losses([log_loss(p, oof.labels, CSV_FLOOR) for p in oof.probs])
        return np.tensordot(np.asarray(w), test_probs, axes=1)
    return MetaLearner(len(oof.classes), C=C, kind=kind).fit(oof.probs, oof.labels).predict_proba(test_probs)


def format_comparison(c: dict) -> str:
    """The table `vitforge stack` prints."""
    lines = [f"out-of-fold scores over {c['n']} images ({c['folds']} folds; each rule scored on rows it was not "
             f"fitted on):", f"  {'method':<34s} {'log-loss':>9s} {'top-1':>8s} {'macro-F1':>9s}"]
    names = {"mean": "mean of members",
             "weighted": "weighted mean (--weights auto)",
             "stack": f"stacking (logistic, {c['features']}, C={c['C']:g})"}
    for key, label in names.items():
        s = c["methods"][key]
        lines.append(f"  {label:<34s} {s['log_loss']:9.4f} {s['accuracy']:7.2f}% {s['macro_f1']:9.4f}")
    for m, w in zip(c["members"], c["weights"], strict=True):
        label = f"member {Path(m['cv_dir']).name} (w {w:.3f})"
        lines.append(f"  {label:<34s} {m['log_loss']:9.4f} {m['accuracy']:7.2f}% {m['macro_f1']:9.4f}")
    return "\n".join(lines)


def cv_tta(cv_dir: Path) -> str:
    """The TTA of a CV's out-of-fold predictions (test predictions must use the same views)."""
    return json.loads((cv_dir / "cv_summary.json").read_text()).get("tta", "none")


def stack_predict(cv_dirs, images: str | None = None, *, method: str = "stack", C: float = 1.0,
                  kind: str = "logits", batch_size: int | None = None, device: str = "auto") -> dict:
    """Compare the combination rules out-of-fold and, with `images`, predict them with `method`.

    Args:
        cv_dirs: finished `vitforge cv` directories over the same training images (one or more).
        images: folder of test images (recursive) or any dataset spec; None = only the comparison.
        method: stack, weighted or mean: what the predictions use.
        C: inverse L2 strength of the logistic regression.
        kind: meta-features, logits or probs.
        batch_size, device: inference settings of the members' test predictions.

    Returns:
        {"comparison": `compare`'s dict, "method", and with images the `predict_ensemble`-style keys "ids",
        "probs" (N, K), "per_model_probs" (M, N, K), "classes", "unreadable", "models", "tta" (per member)}.
    """
    if method not in METHODS:
        raise VitforgeError(f"--method: must be one of {', '.join(METHODS)}, got {method!r}")
    oof = load_oof_set(cv_dirs)
    comparison = compare(oof, C=C, kind=kind)
    out = {"comparison": comparison, "method": method, "cv_dirs": [str(d) for d in oof.cv_dirs]}
    if images is None:
        return out
    preds = [predict_ensemble([d], images, tta=cv_tta(d), batch_size=batch_size, device=device)
             for d in oof.cv_dirs]
    for d, p in zip(oof.cv_dirs, preds, strict=True):
        if p["classes"] != oof.classes:
            raise VitforgeError(f"{d}: its fold models' classes differ from its oof.csv's")
    common = set.intersection(*(set(p["ids"]) for p in preds))
    ids = [i for i in preds[0]["ids"] if i in common]
    per_member = np.stack([p["probs"][[{n: r for r, n in enumerate(p["ids"])}[i] for i in ids]] for p in preds])
    unreadable = sorted(set().union(*(p["unreadable"] for p in preds)) |
                        (set().union(*(set(p["ids"]) for p in preds)) - common))
    out.update(ids=ids, probs=combine(method, oof, per_member, C=C, kind=kind), per_model_probs=per_member,
               classes=oof.classes, unreadable=unreadable, models=[d.name for d in oof.cv_dirs],
               tta=[cv_tta(d) for d in oof.cv_dirs])
    return out
