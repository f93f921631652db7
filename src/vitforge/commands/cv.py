"""Stratified K-fold cross-validation (`vitforge cv`), resumable after a crash.

Each fold is a normal run directory trained with `data.folds=K data.fold=k` (the split is a function of the
labels, K and `data.split_seed`), so every fold can also be resumed, evaluated or ensembled on its own:

    <cv_dir>/cv.json            the base config and K; a rerun must match it
             progress.json      finished folds with their metrics (written after each fold)
             fold_<k>/          run directory of fold k (+ oof.csv: its held-out predictions)
             oof.csv            out-of-fold predictions: file, fold, label, pred, prob_<class>...
             cv_summary.json    per-fold and overall out-of-fold accuracy and macro-F1

A rerun of the same command skips the folds listed in progress.json, resumes an unfinished fold from its
`last.pt`, and starts the remaining ones. The default directory name has no timestamp for that reason.

`train.budget` is the budget of the whole CV, not of each fold: a user has one wall-clock for the command (a Kaggle
kernel's 9 hours), and only the CV knows what else it spends (opening the data, each fold's out-of-fold
predictions). Each fold gets an equal share of what is left when it starts, (budget - spent) / folds left, less the
last fold's out-of-fold prediction time, and plans its steps inside that (`vitforge.train.budget`); a fold that ends
early or late changes the shares of the folds after it. The seconds of folds finished in an earlier session count.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from vitforge.config import Config, load_config, to_dict
from vitforge.data import open_data
from vitforge.data.inputs import AUTO, resolve_auto
from vitforge.errors import ConfigError
from vitforge.eval.ensemble import predict_ensemble
from vitforge.eval.metrics import label_metrics
from vitforge.eval.tta import check_tta_name
from vitforge.progress import duration
from vitforge.runtime import release_memory
from vitforge.train import budget
from vitforge.train.trainer import Trainer

log = logging.getLogger("vitforge")
# Settings a rerun may change without invalidating the folds already trained (they only affect speed and output).
RERUN_MAY_CHANGE = ("run.progress", "run.tensorboard", "data.num_workers", "data.eval_batch_size", "train.device")


def fold_config(base: Config, cv_dir: Path, folds: int, fold: int) -> Config:
    """The config of fold `fold`: the base config holding out that fold, run dir `<cv_dir>/fold_<fold>`."""
    cfg = load_config(to_dict(base))
    cfg.data = dataclasses.replace(cfg.data, val=None, folds=folds, fold=fold)
    cfg.run = dataclasses.replace(cfg.run, dir=str(cv_dir), name=f"fold_{fold}")
    return cfg


def default_cv_dir(cfg: Config, folds: int) -> Path:
    """`run.dir/run.name`, or `run.dir/cv<K>-<model>-<dataset>` (stable, so a rerun finds it)."""
    if cfg.run.name:
        return Path(cfg.run.dir) / cfg.run.name
    stem = Path(cfg.data.train.split(":")[0].rstrip("/")).stem or "data"
    return Path(cfg.run.dir) / f"cv{folds}-{cfg.model.name.replace(':', '-').replace('/', '-')}-{stem}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same_cv(cv_dir: Path, cfg: Config, folds: int) -> None:
    """A rerun into an existing CV directory must describe the same CV (else its folds would be mixed)."""
    meta = json.loads((cv_dir / "cv.json").read_text())
    if meta["folds"] != folds:
        raise ConfigError(f"--folds {folds}: {cv_dir} holds a {meta['folds']}-fold CV; use another run.name")
    old, new = _flat(meta["config"]), _flat(to_dict(cfg))
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not k.startswith(RERUN_MAY_CHANGE)]
    if diff:
        raise ConfigError(f"{diff[0]}: {cv_dir} was started with {old.get(diff[0])!r}, now {new.get(diff[0])!r}; "
                          f"rerun with the same settings to resume it, or choose another run.name")


class CrossValidation:
    """One K-fold CV: `run()` trains the folds that are not finished yet and writes the summary.

    Args:
        cfg: the base configuration (recipe + overrides); `data.val` must be unset.
        folds: K >= 2.
        cv_dir: where the folds go (default `default_cv_dir`).
        hooks: passed to every fold's `Trainer` (`on_step(trainer)`).
        tta: test-time augmentation of the out-of-fold predictions (`vitforge.eval.tta`).
        started: the `vitforge.train.budget.clock()` reading a `train.budget` counts from (default: now).
    """

    def __init__(self, cfg: Config, folds: int, *, cv_dir: str | Path | None = None, hooks=None, tta: str = "none",
                 started: float | None = None):
        self.started = budget.clock() if started is None else started
        if cfg.data.val:
            raise ConfigError("data.val: cross-validation holds out its own folds; unset data.val")
        check_tta_name(tta)  # before fold 0 trains, not when its out-of-fold predictions are made
        if cfg.data.train == AUTO:  # resolved once (one line saying what), recorded in cv.json and every fold
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=resolve_auto(AUTO, "train")))
        self.cfg, self.folds, self.hooks, self.tta = cfg, folds, hooks, tta
        self.dir = Path(cv_dir) if cv_dir else default_cv_dir(cfg, folds)
        self.progress_path = self.dir / "progress.json"
        self.interrupted = False

    # ---- state on disk ---------------------------------------------------------------------------------------------
    def _start(self) -> None:
        base = dataclasses.replace(self.cfg.data, val=None, folds=self.folds, fold=0)
        self.data = open_data(base)  # checks paths and that every class has >= K images, before any training
        if (self.dir / "cv.json").exists():
            _check_same_cv(self.dir, self.cfg, self.folds)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"folds": self.folds, "split_seed": self.cfg.data.split_seed, "classes": self.data.classes,
                "config": to_dict(self.cfg)}
        (self.dir / "cv.json").write_text(json.dumps(meta, indent=2) + "\n")

    def progress(self) -> dict:
        if self.progress_path.exists():
            return json.loads(self.progress_path.read_text())
        return {"folds": self.folds, "done": {}}

    def _record(self, fold: int, result: dict) -> None:
        prog = self.progress()
        prog["done"][str(fold)] = result
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(prog, indent=2) + "\n")
        tmp.replace(self.progress_path)  # atomic: a crash never leaves half a progress file

    # ---- folds -----------------------------------------------------------------------------------------------------
    def run(self) -> dict | None:
        """Train the unfinished folds; returns the summary, or None when a fold was interrupted (Ctrl-C)."""
        self._start()
        start, trained = time.monotonic(), 0
        todo = sum(str(k) not in self.progress()["done"] for k in range(self.folds))
        self.earlier_s = sum(float(r.get("seconds") or 0.0) for r in self.progress()["done"].values())
        self.oof_s = 0.0  # the last fold's out-of-fold prediction time (reserved in the next fold's budget)
        for k in range(self.folds):
            if str(k) in self.progress()["done"]:
                _say(f"fold {k + 1}/{self.folds}: done earlier, skipped")
                continue
            result = self._run_fold(k, todo - trained)
            if result is None:
                self.interrupted = True
                _say(f"fold {k + 1}/{self.folds} interrupted; rerun the same command to resume it")
                return None
            self._record(k, result)
            trained += 1
            spent = time.monotonic() - start
            left = f", about {duration(spent / trained * (todo - trained))} left" if trained < todo else ""
            _say(f"fold {k + 1}/{self.folds}: out-of-fold accuracy {result['accuracy']:.2f}%, "
                 f"macro-F1 {result['macro_f1']:.4f} ({result['n']} images); {duration(spent)} elapsed{left}")
        return self._summarise()

    def spent(self) -> float:
        """Seconds this CV has taken: folds finished in earlier sessions, and this session."""
        return self.earlier_s + budget.clock() - self.started

    def fold_budget(self, left: int) -> float:
        """train.budget of the next fold when `left` folds are still to train (see the module docstring)."""
        total, spent = self.cfg.train.budget_seconds, self.spent()
        share = (total - spent) / left - self.oof_s
        if share <= 0:
            raise ConfigError(f"train.budget: {self.cfg.train.budget} for the whole {self.folds}-fold CV is spent "
                              f"({spent:.0f} s) with {left} fold(s) to train; give more time")
        return share

    def _run_fold(self, k: int, left: int) -> dict | None:
        run_dir = self.dir / f"fold_{k}"
        t0 = budget.clock()
        if not (run_dir / "summary.json").exists():
            if (run_dir / "checkpoints" / "last.pt").exists():
                _say(f"fold {k + 1}/{self.folds}: resuming {run_dir}")
                trainer = Trainer(resume=run_dir, hooks=self.hooks, started=t0)  # a budget keeps its stored plan
            else:
                if run_dir.exists():  # started but killed before its first checkpoint: nothing to keep
                    shutil.rmtree(run_dir)
                cfg = fold_config(self.cfg, self.dir, self.folds, k)
                if cfg.train.budget is not None:  # the fold's share of the CV's budget, counted from now
                    cfg.train.budget = f"{self.fold_budget(left):.2f}"
                trainer = Trainer(cfg, hooks=self.hooks, started=t0)
            trainer.fit()
            interrupted = trainer.interrupted
            # The fold's model, optimizer, EMA, streams (device-cached images, worker processes) go before the
            # next fold builds its own: without this a K-fold CV's memory grows by about a fold each time.
            del trainer
            release_memory()
            if interrupted:
                return None
        t1 = budget.clock()
        result = self._oof(k, run_dir)
        self.oof_s = budget.clock() - t1
        return {**result, "seconds": budget.clock() - t0}

    def _oof(self, k: int, run_dir: Path) -> dict:
        """Predict fold k's held-out images with its best checkpoint; write fold_<k>/oof.csv; fold metrics."""
        cfg = fold_config(self.cfg, self.dir, self.folds, k)
        val = open_data(cfg.data).val
        pred = predict_ensemble([run_dir], val, tta=self.tta, batch_size=cfg.data.eval_batch, device=cfg.train.device)
        label_of = {val.source.ids[i]: int(val.labels[i]) for i in val.indices}
        labels = np.array([label_of[i] for i in pred["ids"]], dtype=np.int64)
        _write_oof(run_dir / "oof.csv", pred["ids"], k, labels, pred["probs"], pred["classes"])
        del val
        release_memory()  # the evaluation's model and stream
        summary = json.loads((run_dir / "summary.json").read_text())
        m = _metrics(labels, pred["probs"].argmax(1), len(pred["classes"]))
        return {"run": run_dir.name, **m, "best_val_top1": summary.get("best_val_top1"),
                "best_epoch": summary.get("best_epoch"), "epochs_run": summary.get("epochs_run"),
                "wall_seconds": summary.get("wall_seconds"), "unreadable": pred["unreadable"]}

    def _summarise(self) -> dict:
        done = self.progress()["done"]
        rows = []
        for k in range(self.folds):
            with open(self.dir / f"fold_{k}" / "oof.csv", newline="") as f:
                rows += list(csv.DictReader(f))
        classes = self.data.classes
        labels = np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)
        preds = np.array([classes.index(r["pred"]) for r in rows], dtype=np.int64)
        _write_rows(self.dir / "oof.csv", rows)
        per_fold = [done[str(k)] for k in range(self.folds)]
        accs = [f["accuracy"] for f in per_fold]
        summary = {"folds": self.folds, "split_seed": self.cfg.data.split_seed, "model": self.cfg.model.name,
                   "dataset": self.cfg.data.train, "classes": classes, "tta": self.tta,
                   "overall": _metrics(labels, preds, len(classes)),
                   "fold_accuracy_mean": float(np.mean(accs)), "fold_accuracy_std": float(np.std(accs)),
                   "per_fold": per_fold, "oof_csv": str(self.dir / "oof.csv"),
                   "runs": [str(self.dir / f["run"]) for f in per_fold],
                   "wall_seconds": float(sum(f.get("wall_seconds") or 0.0 for f in per_fold))}
        if self.cfg.train.budget is not None:
            summary["budget"] = {"budget": self.cfg.train.budget, "budget_s": self.cfg.train.budget_seconds,
                                 "actual_s": self.spent(), "fold_seconds": [f.get("seconds") for f in per_fold]}
        (self.dir / "cv_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        o = summary["overall"]
        _say(f"{self.folds}-fold CV: out-of-fold accuracy {o['accuracy']:.2f}% (per fold "
             f"{summary['fold_accuracy_mean']:.2f} ± {summary['fold_accuracy_std']:.2f}), macro-F1 "
             f"{o['macro_f1']:.4f} | {self.dir / 'cv_summary.json'}")
        return summary


def _metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    m = label_metrics(labels, preds, num_classes)
    if m["n"] == 0:
        return {"n": 0, "accuracy": float("nan"), "macro_f1": 0.0}
    return {"n": m["n"], "accuracy": m["top1"], "macro_f1": m["macro_f1"]}


def _write_oof(path: Path, ids: list[str], fold: int, labels: np.ndarray, probs: np.ndarray, classes: list[str]):
    rows = [{"file": i, "fold": fold, "label": classes[y], "pred": classes[int(p.argmax())],
             **{f"prob_{c}": f"{v:.6f}" for c, v in zip(classes, p, strict=True)}}
            for i, y, p in zip(ids, labels, probs, strict=True)]
    _write_rows(path, rows)


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file", "fold", "label", "pred"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _say(line: str) -> None:
    log.info(line)
    print(line, file=sys.stderr, flush=True)


def run_cv(cfg: Config, folds: int, *, cv_dir: str | Path | None = None, hooks=None, tta: str = "none") -> dict | None:
    """Library entry point: run (or resume) a K-fold CV; the summary dict, or None if it was interrupted."""
    return CrossValidation(cfg, folds, cv_dir=cv_dir, hooks=hooks, tta=tta).run()
