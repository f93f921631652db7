"""Hyperspectral training end to end: a synthetic cube through `data.hsi` into sclusterformer_hsi."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vitforge.commands.cli import main
from vitforge.config import load_config
from vitforge.errors import DataError
from vitforge.train.trainer import Trainer, train


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(0)
    H, W, bands = 24, 20, 36
    gt = np.zeros((H, W), dtype=np.int64)
    gt[2:10, 2:18], gt[12:22, 2:9], gt[12:22, 11:18] = 1, 2, 3
    signatures = rng.normal(0, 1, (4, bands))
    cube = signatures[gt] + rng.normal(0, 0.3, (H, W, bands))  # class-dependent spectra
    np.save(tmp_path / "cube.npy", cube.astype(np.float32))
    np.save(tmp_path / "gt.npy", gt)
    np.save(tmp_path / "emap.npy", rng.normal(0, 1, (H, W)).astype(np.float32))
    return tmp_path


def _overrides(d, *extra):
    return [f"data.train={d / 'cube.npy'}", f"data.hsi.gt={d / 'gt.npy'}", f"data.hsi.extra_band={d / 'emap.npy'}",
            "data.hsi.train_fraction=0.2", "data.hsi.class_names=[roof,grass,water]", "model.name=sclusterformer_hsi",
            "data.batch_size=16", "train.epochs=1", "train.device=cpu", "run.progress=none", "train.threads=1",
            f"run.dir={d / 'runs'}", "run.name=hsi", *extra]


def test_trains_and_reports_oa_aa_kappa(scene, capsys):
    run = train(load_config(None, _overrides(scene, "train.max_steps=3")))
    s = json.loads((run / "summary.json").read_text())
    n_labelled = 8 * 16 + 2 * 10 * 7
    assert s["classes"] == ["roof", "grass", "water"]
    assert s["train_images"] + s["val_images"] == n_labelled and s["steps"] == 3
    m = s["best_val_metrics"]
    assert {"top1", "balanced_accuracy", "kappa", "macro_f1", "per_class_recall"} <= set(m)
    assert -1 <= m["kappa"] <= 1 and set(m["per_class_recall"]) == {"roof", "grass", "water"}
    assert main(["eval", str(run), "--data", str(scene / "cube.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == n_labelled  # every labelled pixel of the scene


def test_missing_hsi_settings_are_named(scene):
    with pytest.raises(DataError, match="needs its ground truth: set data.hsi.gt"):
        Trainer(load_config(None, [f"data.train={scene / 'cube.npy'}", f"run.dir={scene}"]))
    with pytest.raises(DataError, match="data.hsi.extra_band"):
        Trainer(load_config(None, [f"data.train={scene / 'cube.npy'}", f"data.hsi.gt={scene / 'gt.npy'}",
                                   f"run.dir={scene}"]))
