"""K-fold cross-validation: stratified disjoint folds, a crash (SIGKILL) during fold 2 resumes without redoing
fold 1, out-of-fold predictions and metrics, rerun safety; and every Muffyn recipe validates."""

from __future__ import annotations

import csv
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from sklearn.metrics import f1_score

from vitforge.commands.cli import main
from vitforge.commands.cv import run_cv
from vitforge.config import load_config
from vitforge.data import open_data
from vitforge.data.transforms import train_transform
from vitforge.errors import ConfigError
from vitforge.models.registry import create_model

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["model.name=timm:test_vit", "data.img_size=32", "data.batch_size=4", "train.epochs=6", "optim.lr=3e-3",
        "train.device=cpu", "run.progress=none", "run.tensorboard=false", "train.threads=1", "data.aug.crop_padding=0"]


def test_folds_are_stratified_disjoint_and_cover_the_data(tmp_path):
    data = make_image_folder(tmp_path / "train", per_class=9, size=8)
    vals = []
    for k in range(3):
        opened = open_data(load_config(None, [f"data.train={data}", "data.folds=3", f"data.fold={k}"]).data)
        tr, va = set(opened.train.indices.tolist()), set(opened.val.indices.tolist())
        assert not tr & va and len(tr | va) == 27
        assert np.bincount(opened.val.labels[opened.val.indices]).tolist() == [3, 3, 3]
        vals.append(va)
    assert set().union(*vals) == set(range(27)) and sum(map(len, vals)) == 27
    with pytest.raises(ConfigError, match=r"data.fold: must be a fold index in \[0, 3\)"):
        load_config(None, ["data.folds=3", "data.fold=3"])
    with pytest.raises(ConfigError, match="data.folds: must be >= 2"):
        load_config(None, ["data.fold=0"])
    with pytest.raises(ConfigError, match="data.val: cannot be combined with data.folds"):
        load_config(None, ["data.folds=2", "data.fold=0", "data.val=digits"])


class Seen:
    """Records (fold, step) of every optimizer step of every fold's trainer."""

    def __init__(self):
        self.steps: list[tuple[int, int]] = []

    def on_step(self, trainer):
        self.steps.append((trainer.cfg.data.fold, trainer.state.step))


def test_killed_during_fold_2_resumes_without_redoing_fold_1(tmp_path):
    data = make_image_folder(tmp_path / "train", per_class=12, size=16)
    args = [f"data.train={data}", *TINY, f"run.dir={tmp_path}", "run.name=cv"]
    proc = subprocess.Popen([sys.executable, "-m", "vitforge", "cv", "--folds", "2", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cv = tmp_path / "cv"
    deadline = time.time() + 120
    while not (cv / "fold_1" / "checkpoints" / "last.pt").exists():  # fold 2 has saved its first epoch
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cv / "fold_1" / "summary.json").exists(), "fold 2 finished before the kill"
    assert list(json.loads((cv / "progress.json").read_text())["done"]) == ["0"]
    fold1 = {p.name: p.stat().st_mtime_ns for p in (cv / "fold_0").rglob("*") if p.is_file()}

    seen = Seen()
    summary = run_cv(load_config(None, args), 2, hooks=seen)
    assert {f for f, _ in seen.steps} == {1}  # fold 1 was not trained again
    assert seen.steps[0][1] > 1  # fold 2 continued from its last.pt, not from step 0
    assert {p.name: p.stat().st_mtime_ns for p in (cv / "fold_0").rglob("*") if p.is_file()} == fold1
    progress = json.loads((cv / "progress.json").read_text())["done"]
    assert sorted(progress) == ["0", "1"]

    rows = list(csv.DictReader(open(cv / "oof.csv")))
    assert len(rows) == 36 and len({r["file"] for r in rows}) == 36  # every image predicted once, by its fold
    assert sorted(int(r["fold"]) for r in rows) == [0] * 18 + [1] * 18
    labels, preds = [r["label"] for r in rows], [r["pred"] for r in rows]
    assert all(Path(r["file"]).parts[0] == r["label"] for r in rows)  # ImageFolder: the label is the folder
    acc = 100 * np.mean([a == b for a, b in zip(labels, preds, strict=True)])
    assert summary["overall"]["accuracy"] == pytest.approx(acc)
    assert summary["overall"]["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert [f["n"] for f in summary["per_fold"]] == [18, 18]
    assert summary["fold_accuracy_mean"] == pytest.approx(np.mean([f["accuracy"] for f in summary["per_fold"]]))
    assert json.loads((cv / "cv_summary.json").read_text())["overall"] == summary["overall"]
    probs = np.array([[float(r[f"prob_{c}"]) for c in ("cat", "dog", "fox")] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert summary["overall"]["accuracy"] > 50  # colour-coded classes are learnable

    # The fold ensemble with 12-view TTA writes a submission (the README's last step).
    test = make_image_folder(tmp_path / "test_by_class", per_class=2, size=16, seed=3)
    flat = tmp_path / "test"
    flat.mkdir()
    for p in sorted(test.rglob("*.png")):
        shutil.copy(p, flat / f"{p.parent.name}_{p.stem}.png")
    sub = tmp_path / "submission.csv"
    assert main(["predict", *summary["runs"], "--images", str(flat), "--tta", "saccadic12", "--kaggle", "--out",
                 str(sub)]) == 0
    rows = list(csv.DictReader(open(sub)))
    assert list(rows[0]) == ["id", "label"] and sorted(r["id"] for r in rows) == sorted(p.stem for p in flat.iterdir())
    assert {r["label"] for r in rows} <= {"cat", "dog", "fox"}
    assert sum(r["id"].startswith(r["label"]) for r in rows) >= 4  # mostly right (true class is in the name)


def test_interrupted_fold_and_rerun_rules(tmp_path, capsys):
    data = make_image_folder(tmp_path / "train", per_class=6, size=16)
    args = [f"data.train={data}", *TINY, "train.epochs=2", f"run.dir={tmp_path}", "run.name=cv"]

    class StopInFold2:
        def on_step(self, trainer):
            if trainer.cfg.data.fold == 1:
                trainer.request_stop()

    assert main(["cv", "--folds", "2", "--tta", "bogus", *args]) == 2  # refused before fold 0 trains
    assert "--tta: unknown view set 'bogus'" in capsys.readouterr().err and not (tmp_path / "cv").exists()
    assert run_cv(load_config(None, args), 2, hooks=StopInFold2()) is None  # like Ctrl-C: saved, resumable
    assert (tmp_path / "cv" / "fold_1" / "checkpoints" / "last.pt").exists()
    with pytest.raises(ConfigError, match=r"optim.lr: .* was started with 0.003, now 0.01; rerun with the same"):
        run_cv(load_config(None, [*args, "optim.lr=0.01"]), 2)
    with pytest.raises(ConfigError, match="--folds 3: .* holds a 2-fold CV"):
        run_cv(load_config(None, args), 3)
    assert main(["cv", "--folds", "2", *args, "data.num_workers=0"]) == 0  # speed settings may change
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 2 and out["overall"]["accuracy"] >= 0


MUFFYN = sorted((ROOT / "recipes" / "muffyn").glob("*.yaml"))


@pytest.mark.parametrize("recipe", MUFFYN, ids=[p.stem for p in MUFFYN])
def test_muffyn_recipes_validate(recipe, tmp_path, capsys):
    cfg = load_config(recipe)
    assert cfg.model.pretrained == "hub" and cfg.train.head_epochs == 5 and cfg.train.epochs == 40
    assert cfg.train.head_lr == 1e-3 and cfg.optim.lr == 5e-5 and cfg.schedule.min_lr == 1e-6
    assert cfg.data.batch_size * cfg.train.grad_accum == 32 and cfg.ema.decay == 0.999
    assert cfg.train.label_smoothing == 0.1 and cfg.train.early_stop == 8
    with torch.device("meta"):  # the arguments fit the model (no weights are read)
        model = create_model(cfg.model.name, num_classes=2, img_size=cfg.data.img_size,
                             drop_path_rate=cfg.model.drop_path_rate)
    assert model.pretrained_cfg["input_size"] == (3, cfg.data.img_size, cfg.data.img_size)
    data = make_image_folder(tmp_path / "train", classes=("chihuahua", "muffin"), per_class=5, size=8)
    assert main(["train", str(recipe), "--dry-run", f"data.train={data}"]) == 0
    assert "# data: 8 train / 2 val images, 2 classes" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", MUFFYN, ids=[p.stem for p in MUFFYN])
def test_muffyn_recipes_use_the_seed_augmentation_and_mix_in_phase_two(recipe):
    cfg = load_config(recipe)
    a, m, epochs = cfg.data.aug, cfg.data.mix, cfg.train.epochs
    assert a.pre_resize == cfg.data.img_size + 32 and a.rrc_scale == [0.7, 1.0] and a.hflip  # resize 416, crop 384
    assert a.rotate == 15 and a.affine_translate == 0.1 and a.affine_scale == [0.9, 1.1] and a.affine_shear == 0
    assert a.color_jitter == 0.3 and a.hue == 0.05 and a.random_erasing == 0.2 and a.erasing_scale == [0.02, 0.15]
    assert m.on_epoch == cfg.train.head_epochs and (m.mixup_alpha, m.cutmix_alpha, m.prob) == (0.2, 1.0, 0.5)
    assert [m.active(e, epochs) for e in range(epochs)] == [False] * 5 + [True] * 35  # phase 2 only
    ops = train_transform(cfg.data.img_size, a, small=False).transforms[1:-1]
    assert [type(t).__name__ for t in ops] == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip",
                                               "RandomRotation", "RandomAffine", "ColorJitter"]


class FoldObjects:
    """At each fold's first step: which earlier folds' model, optimizer and streams are still alive (weak refs)."""

    def __init__(self):
        self.refs: dict[int, list] = {}
        self.alive_at_start: dict[int, list[int]] = {}

    def on_step(self, trainer):
        fold = trainer.cfg.data.fold
        if fold in self.refs:
            return
        self.alive_at_start[fold] = [k for k, refs in self.refs.items() if any(r() is not None for r in refs)]
        self.refs[fold] = [weakref.ref(o) for o in (trainer, trainer.model, trainer.optimizer, trainer.train_stream,
                                                    trainer.val_stream)]


def test_a_fold_frees_its_model_optimizer_and_streams_before_the_next_one(tmp_path):
    """With automatic garbage collection off, only the explicit release between folds can free what a fold's
    objects hold in reference cycles: nothing of fold 1 may be alive when fold 2 starts, or after the CV."""
    data = make_image_folder(tmp_path / "train", per_class=6, size=8)
    seen = FoldObjects()
    gc.collect()
    gc.disable()
    try:
        summary = run_cv(load_config(None, [f"data.train={data}", *TINY, "train.epochs=1", f"run.dir={tmp_path}",
                                            "run.name=cv"]), 3, hooks=seen)
        assert summary is not None and sorted(seen.refs) == [0, 1, 2]
        assert seen.alive_at_start == {0: [], 1: [], 2: []}
        assert all(r() is None for refs in seen.refs.values() for r in refs)
    finally:
        gc.enable()
