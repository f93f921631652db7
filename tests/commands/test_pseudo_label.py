"""Consensus pseudo-labels: only images whose averaged confidence passes the threshold AND on which every model
agrees are written, with their scores, in a CSV that `data.extra` reads back."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder

from vitforge.commands.cli import main
from vitforge.commands.pseudo_label import expand_sources, pseudo_label, select_pseudo_labels
from vitforge.config import load_config
from vitforge.data import open_data
from vitforge.errors import VitforgeError
from vitforge.eval.ensemble import predict_ensemble
from vitforge.train.trainer import train


def test_selection_rule_needs_confidence_and_unanimity():
    per_model = np.array([
        # image: 0 confident+agreed, 1 agreed but unsure, 2 confident on average but model 2 dissents, 3 tie-ish
        [[0.99, 0.01], [0.60, 0.40], [0.99, 0.01], [0.50, 0.50]],
        [[0.97, 0.03], [0.55, 0.45], [0.45, 0.55], [0.49, 0.51]],
    ])
    probs = per_model.mean(0)
    assert probs[2, 0] >= 0.7  # image 2 passes a 0.7 threshold on the average alone
    np.testing.assert_array_equal(select_pseudo_labels(probs, per_model, 0.7), [True, False, False, False])
    np.testing.assert_array_equal(select_pseudo_labels(probs, per_model, 0.5), [True, True, False, False])
    np.testing.assert_array_equal(select_pseudo_labels(probs, per_model[:1], 0.7), [True, False, True, False])


def _train(tmp_path: Path, data: Path, name: str, seed: int) -> Path:
    """A run directory; its last.pt is the confident model (best.pt may be an early epoch: 3 validation images)."""
    return train(load_config(None, [
        f"data.train={data}", "data.val_split=3", "model.name=timm:test_convnext", "data.img_size=32",
        "train.epochs=6", "optim.lr=3e-3", "data.batch_size=6", f"train.seed={seed}", "train.device=cpu",
        "run.progress=none", "run.tensorboard=false", f"run.dir={tmp_path / 'runs'}", f"run.name={name}",
        "train.threads=1", "data.aug.crop_padding=0"]))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Model A learned the folder; model B learned it with the dog and fox images swapped (they must disagree)."""
    tmp = tmp_path_factory.mktemp("pl")
    data = make_image_folder(tmp / "train", per_class=12, size=16)
    swapped = tmp / "swapped"
    shutil.copytree(data, swapped)
    (swapped / "dog").rename(swapped / "tmp")
    (swapped / "fox").rename(swapped / "dog")
    (swapped / "tmp").rename(swapped / "fox")
    unl = make_image_folder(tmp / "unl_by_class", per_class=4, size=16, seed=7)
    flat = tmp / "unlabeled"
    flat.mkdir()
    for p in sorted(unl.rglob("*.png")):
        shutil.copy(p, flat / f"{p.parent.name}_{p.name}")  # the true class is only in the name
    runs = [_train(tmp, data, "a", 0), _train(tmp, swapped, "b", 1)]
    return tmp, data, [r / "checkpoints" / "last.pt" for r in runs], flat


def test_only_confident_unanimous_images_are_added(two_models):
    tmp, data, runs, flat = two_models
    r = pseudo_label(runs, flat, out=tmp / "round2" / "pseudo.csv", threshold=0.9, tta="flip")
    rows = list(csv.DictReader(open(tmp / "round2" / "pseudo.csv")))
    assert r["images"] == 12 and r["selected"] == len(rows) > 0
    # Independently: each model alone (with the same TTA), averaged here.
    single = [predict_ensemble([run], str(flat), tta="flip") for run in runs]
    assert single[0]["ids"] == single[1]["ids"]
    per_model = np.stack([s["probs"] for s in single])
    avg = per_model.mean(0)
    classes = single[0]["classes"]
    expected = {i for i, p, votes in zip(single[0]["ids"], avg, per_model.argmax(2).T, strict=True)
                if p.max() >= 0.9 and (votes == p.argmax()).all()}
    assert {Path(row["file"]).name for row in rows} == expected
    for row in rows:
        i = single[0]["ids"].index(Path(row["file"]).name)
        assert row["label"] == classes[avg[i].argmax()] and float(row["score"]) == pytest.approx(avg[i].max(), 1e-5)
        assert float(row["min_model_score"]) == pytest.approx(per_model[:, i, avg[i].argmax()].min(), abs=1e-5)
        assert row["models"] == "2"
    # The swapped classes are never unanimous; the colour-coded cats are, and they are labelled cat.
    assert all(Path(row["file"]).name.startswith("cat_") and row["label"] == "cat" for row in rows)
    assert r["per_class"] == {"cat": len(rows), "dog": 0, "fox": 0}
    # A higher bar keeps a subset (confidence matters, not only agreement).
    strict = pseudo_label(runs, flat, out=tmp / "strict.csv", threshold=float(avg.max(1).max()) + 1e-6)
    assert strict["selected"] == 0


def test_pseudo_label_csv_is_training_data_for_the_next_round(two_models):
    tmp, data, runs, flat = two_models
    out = tmp / "next" / "pseudo.csv"
    r = pseudo_label(runs, flat, out=out, threshold=0.9)
    cfg = load_config(None, [f"data.train={data}", f"data.extra={out}", "data.folds=3", "data.fold=0"])
    opened = open_data(cfg.data)
    assert len(opened.train) == 24 + r["selected"] and len(opened.val) == 12  # extra data only trains
    src = opened.train.source
    extra_labels = opened.train.labels[36:]
    assert [src.classes[k] for k in extra_labels] == ["cat"] * r["selected"]
    assert np.asarray(src.load(36)).shape == (16, 16, 3)  # the relative file paths resolve
    with pytest.raises(VitforgeError, match="already exists; pass --overwrite"):
        pseudo_label(runs, flat, out=out, threshold=0.9)


def test_cli_takes_a_cv_directory_and_checks_its_folds(two_models, tmp_path, capsys):
    _, _, runs, flat = two_models
    cv = tmp_path / "cv"
    for k, last in enumerate(runs):  # a finished 2-fold CV directory made of the two runs
        shutil.copytree(last.parent.parent, cv / f"fold_{k}")
    (cv / "cv.json").write_text(json.dumps({"folds": 2}))
    assert expand_sources([cv]) == [cv / "fold_0", cv / "fold_1"]
    code = main(["pseudo-label", str(cv), "--images", str(flat), "--threshold", "0.9", "--out",
                 str(tmp_path / "p.csv")])
    assert code == 0 and "pass threshold 0.9 with all 2 models agreeing" in capsys.readouterr().out
    assert main(["pseudo-label", str(cv), "--images", str(flat), "--threshold", "0.9"]) == 0  # default --out
    assert (cv / "pseudo_labels.csv").read_text() == (tmp_path / "p.csv").read_text()
    assert "-> " + str(cv / "pseudo_labels.csv") in capsys.readouterr().out
    assert main(["pseudo-label", str(cv), "--images", str(flat)]) == 2  # never overwrites silently
    assert "pseudo_labels.csv already exists; pass --overwrite" in capsys.readouterr().err
    (cv / "fold_1" / "checkpoints" / "best.pt").unlink()
    with pytest.raises(VitforgeError, match="fold_1 have no best.pt yet; finish the CV first"):
        expand_sources([cv])
    with pytest.raises(VitforgeError, match="--threshold must be in"):
        pseudo_label(runs, flat, out=tmp_path / "x.csv", threshold=1.5)
