"""`data.train=synthetic:N[,classes=K][,size=S][,channels=C][,seed=X]`: determinism, shapes, errors, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitforge.commands.cli import main
from vitforge.data import sources
from vitforge.data.dataset import FeatureSource, open_inputs
from vitforge.data.sources import SyntheticSource, open_source
from vitforge.errors import DataError


def test_same_spec_same_images_and_shapes():
    a = open_source("synthetic:60,classes=3,size=12")
    b = open_source("synthetic:60,classes=3,size=12")
    assert isinstance(a, SyntheticSource) and len(a) == 60 and a.labeled
    assert a.array().shape == (60, 12, 12, 3) and a.array().dtype == np.uint8
    assert np.array_equal(a.array(), b.array()) and np.array_equal(a.labels, b.labels)
    assert a.classes == ["class0", "class1", "class2"] and np.bincount(a.labels).tolist() == [20, 20, 20]
    assert a.ids[:2] == ["synthetic_0000000", "synthetic_0000001"]
    assert np.array_equal(np.asarray(a.load(7)), a.array()[7])  # one image, however it is read
    assert a.fingerprint() == b.fingerprint() != open_source("synthetic:60,classes=3,size=12,seed=1").fingerprint()


def test_seed_changes_images_and_defaults():
    a, b = open_source("synthetic:40,seed=0"), open_source("synthetic:40,seed=1")
    assert not np.array_equal(a.array(), b.array())
    assert (a.num_classes, a.size, a.channels, a.seed) == (10, 32, 3, 0)
    assert a.array().std() > 30  # a pattern, not a flat image


def test_classes_differ_in_their_pattern():
    """Class means of the images are further apart than the spread of each class's images around its mean."""
    s = open_source("synthetic:400,classes=4,size=16")
    x = s.array().reshape(400, -1).astype(np.float64)
    mean_colour = s.array().reshape(400, -1, 3).mean(1)
    centroids = np.stack([mean_colour[s.labels == k].mean(0) for k in range(4)])
    within = np.mean([mean_colour[s.labels == k].std(0).mean() for k in range(4)])
    between = np.mean([np.linalg.norm(c1 - c2) for i, c1 in enumerate(centroids) for c2 in centroids[i + 1:]])
    assert between > 2 * within
    assert x.std() > 0


def test_large_sets_are_generated_item_by_item(monkeypatch):
    monkeypatch.setattr(sources, "SYNTHETIC_MAX_BYTES", 1000)
    s = open_source("synthetic:20,size=16")
    assert s.array() is None
    img = s.load(3)
    assert img.size == (16, 16) and img.mode == "RGB"
    monkeypatch.setattr(sources, "SYNTHETIC_MAX_BYTES", 2**30)
    assert np.array_equal(np.asarray(img), open_source("synthetic:20,size=16").array()[3])


def test_other_channel_counts_are_feature_tensors():
    f = open_inputs("synthetic:30,classes=3,size=8,channels=5")
    assert isinstance(f, FeatureSource) and f.features.shape == (30, 5, 8, 8) and f.features.dtype == torch.float32
    assert float(f.features.abs().max()) <= 1.0 and f.labels.tolist() == open_source("synthetic:30,classes=3,size=8,"
                                                                                        "channels=5").labels.tolist()
    with pytest.raises(DataError, match="5-channel items are tensors, not RGB images"):
        open_source("synthetic:30,classes=3,size=8,channels=5").load(0)


@pytest.mark.parametrize("spec, message", [
    ("synthetic:x", "synthetic:x: the number of images must be a whole number >= 2 (synthetic:N[,classes=K][,size=S]"
                    "[,channels=C][,seed=X], e.g. synthetic:1000,classes=10,size=32)"),
    ("synthetic:10,colour=1", "synthetic:10,colour=1: unknown option 'colour=1'; options are classes, size, channels, "
                              "seed"),
    ("synthetic:10,classes=1", "synthetic:10,classes=1: classes must be a whole number >= 2, got '1'"),
    ("synthetic:10,size=2.5", "synthetic:10,size=2.5: size must be a whole number >= 4, got '2.5'"),
    ("synthetic:3,classes=4", "synthetic:3,classes=4: 3 images cannot cover 4 classes"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(DataError) as e:
        open_source(spec)
    assert str(e.value).startswith(message)


def test_cli_training_on_synthetic_beats_chance(tmp_path, capsys):
    """A tiny ViT, 4 classes (chance 25%), 6 epochs through `vitforge train`: clearly above chance."""
    rc = main(["train", "model.name=vit_demo", "data.train=synthetic:480,classes=4,size=16", "data.img_size=16",
               "data.val_split=0.25", "data.batch_size=32", "data.aug.crop_padding=0", "data.aug.hflip=false",
               "optim.lr=3e-3", "train.epochs=6", "train.device=cpu", "train.threads=1", "run.progress=none",
               "run.tensorboard=false", f"run.dir={tmp_path}", "run.name=syn"])
    assert rc == 0
    summary = json.loads((tmp_path / "syn" / "summary.json").read_text())
    assert summary["dataset"] == "synthetic:480,classes=4,size=16" and summary["val_images"] == 120
    assert summary["classes"] == ["class0", "class1", "class2", "class3"]
    assert summary["best_val_top1"] >= 60, summary["best_val_top1"]


def test_cli_training_on_one_channel_tensors(tmp_path):
    rc = main(["train", "model.name=vit_demo", "model.args.in_chans=1", "data.train=synthetic:96,classes=2,size=8,"
               "channels=1", "data.batch_size=16", "train.epochs=1", "train.device=cpu", "train.threads=1",
               "run.progress=none", "run.tensorboard=false", f"run.dir={tmp_path}", "run.name=c1"])
    assert rc == 0
    summary = json.loads((tmp_path / "c1" / "summary.json").read_text())
    assert summary["train_images"] + summary["val_images"] == 96
