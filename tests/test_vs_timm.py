"""benchmarks/vs_timm.py's arithmetic and data: every contestant uses vitforge's own split, the plan fills the time it
is given (evaluations counted), and the time-to-accuracy ratio reads the curves as documented."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar_like_parquet

from vitforge.config import DataConfig
from vitforge.data.dataset import open_data

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def vs():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("vs_timm", BENCH / "vs_timm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("subset", [None, 60])
def test_split_is_vitforges(vs, tmp_path, subset):
    path = write_cifar_like_parquet(tmp_path / "d.parquet", n=200)
    opened = open_data(DataConfig(train=str(path), val_split=40, split_seed=0, limit=subset))
    data = vs.load_data(path, 40, subset)
    assert len(data["val_y"]) == 40 and len(data["train_y"]) == (subset or 160)
    np.testing.assert_array_equal(data["val_y"], opened.val.labels[opened.val.indices])
    np.testing.assert_array_equal(data["train_y"], opened.train.labels[opened.train.indices])
    for split, key in ((opened.val, "val_x"), (opened.train, "train_x")):
        first = np.asarray(split.source.load(int(split.indices[0])))
        np.testing.assert_array_equal(data[key][0], first)


def test_plan_fills_the_time_with_evaluations_counted(vs):
    # 100 s at 0.5 s/step, 10 steps per epoch, evaluations 3 s, per-epoch costs 0.1 s, about 2 evaluation points
    total = vs.plan_steps(100.0, 0.5, 3.0, 0.1, 10, 2)
    cost = lambda t: t * 0.5 + vs.count_evals(t, 10, 2) * 3.0 + -(-t // 10) * 0.1  # noqa: E731
    assert cost(total) <= 100.0 < cost(total + 2)
    assert vs.count_evals(180, 10, 2) == 2  # 18 epochs, every 9th: after epoch 9 and 18 (the end)
    assert vs.count_evals(185, 10, 2) == 2  # 18.5 epochs (19 started), every 10th: after epoch 10, and the end
    assert vs.count_evals(185, 10, 3) == 4  # every 6th: after epochs 6, 12, 18, and the end (step 185)


def test_time_to_accuracy_reads_the_first_point_reaching_the_target(vs):
    def run(c, b, pts):
        return {"contestant": c, "budget_s": b, "points": [{"seconds": s, "val_top1": a} for s, a in pts],
                "top1_within_budget": [a for s, a in pts if s <= b][-1]}

    runs = {"vitforge/600": run("vitforge", 600, [(200, 50.0), (400, 70.0), (590, 80.0)]),
            "vitforge/1200": run("vitforge", 1200, [(300, 55.0), (1190, 85.0)]),
            "timm/1200": run("timm", 1200, [(600, 60.0), (1195, 69.0)]),
            "timm/600": run("timm", 600, [(590, 81.0)])}
    a = vs.analyse(runs)
    assert a["time_to_accuracy"]["timm/1200"] == {"target_top1": 69.0, "baseline_budget_s": 1200,
                                                  "vitforge_seconds": 400, "vitforge_run_budget_s": 600, "ratio": 3.0}
    assert a["time_to_accuracy"]["timm/600"]["vitforge_seconds"] == 1190  # only the longer run gets there
    assert a["equal_budget"]["timm/600"]["difference"] == -1.0
    assert a["equal_budget"]["timm/1200"]["difference"] == 16.0
