"""Trackers behind one interface (start / log / close): metrics.jsonl and TensorBoard for real, W&B and MLflow against
small recording stand-ins of their modules (what we call and with which values), the refusal of a missing package
before any run directory exists, and a short training run that feeds every tracker the same epoch records."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from vitforge.commands.cli import main as cli_main
from vitforge.config import load_config
from vitforge.errors import ConfigError
from vitforge.train.rundir import RunDir
from vitforge.train.trackers import (
    JsonlTracker,
    MlflowTracker,
    TensorBoardTracker,
    Tracker,
    WandbTracker,
    build_trackers,
    run_info,
    scalars,
)
from vitforge.train.trainer import Trainer, step_windows, train

QUICK = ["model.name=vit_demo", "model.args.depth=1", "data.train=digits", "data.limit=80", "data.batch_size=16",
         "data.val_split=0.25", "train.epochs=2", "train.device=cpu", "run.progress=none", "train.threads=1",
         "run.tensorboard=false"]
RECORDS = [{"epoch": 0, "step": 3, "train_loss": 2.5, "lr": 1e-3, "img_per_s": 100.0, "epoch_seconds": 0.5,
            "peak_mem_mb": 10.0, "val_loss": 2.25, "val_top1": 12.5, "val_n": 20, "best": True},
           {"epoch": 1, "step": 6, "train_loss": 2.0, "lr": 5e-4, "img_per_s": 120.0, "epoch_seconds": 0.4,
            "peak_mem_mb": 10.0, "val_loss": float("nan"), "val_top1": 25.0, "val_n": 20}]


class FakeWandb(types.ModuleType):
    """Stands in for the `wandb` module: records `init` and what its run is given."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, values, step=None):
                fake.logs.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        return Run()


class FakeMlflow(types.ModuleType):
    """Stands in for the `mlflow` module (fluent API): records every call."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls, self.params, self.metrics = [], {}, []

    def set_tracking_uri(self, uri):
        self.calls.append(("set_tracking_uri", uri))

    def set_experiment(self, name):
        self.calls.append(("set_experiment", name))

    def start_run(self, run_id=None, run_name=None):
        self.calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "abc123"))

    def log_params(self, params):
        assert len(params) <= 100  # MLflow refuses larger batches
        self.calls.append(("log_params", len(params)))
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def end_run(self):
        self.calls.append(("end_run",))


def _run(tmp_path: Path) -> RunDir:
    (tmp_path / "r").mkdir()
    return RunDir(tmp_path / "r")


def test_scalars_groups_train_and_val_numbers_and_drops_flags_and_nan():
    assert scalars(RECORDS[0]) == {"train/train_loss": 2.5, "train/lr": 1e-3, "train/img_per_s": 100.0,
                                   "val/loss": 2.25, "val/top1": 12.5, "val/n": 20}
    assert "val/loss" not in scalars(RECORDS[1])


def test_step_windows_group_accum_batches_and_keeps_a_short_last_window():
    stream = [(i, -i, None) for i in range(5)]
    assert [[x for x, _ in w] for w in step_windows(stream, 2)] == [[0, 1], [2, 3], [4]]
    assert [len(w) for w in step_windows(stream, 1)] == [1] * 5


def test_jsonl_and_tensorboard_trackers_write_what_they_are_given(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path)
    cfg = load_config(None, QUICK)
    trackers: list[Tracker] = [JsonlTracker(), TensorBoardTracker()]
    for t in trackers:
        t.start(run_info(run, cfg, None))
    for r in RECORDS:
        for t in trackers:
            t.log(r["step"], r)
    for t in trackers:
        t.close()
    lines = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [0, 1] and lines[0] == RECORDS[0]
    acc = EventAccumulator(str(run.path / "events"))
    acc.Reload()
    assert {"train/train_loss", "train/lr", "val/top1", "val/loss"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("train/train_loss")] == [(3, 2.5), (6, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("val/top1")] == [(3, 12.5), (6, 25.0)]
    assert [e.step for e in acc.Scalars("val/loss")] == [3]  # NaN is not plotted
    # A resumed session drops the lines of the epochs it runs again.
    again = JsonlTracker()
    again.start(run_info(run, cfg, 1))
    assert [json.loads(x)["epoch"] for x in run.metrics.read_text().splitlines()] == [0]


def test_wandb_tracker_passes_options_and_values_and_resumes_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = _run(tmp_path)
    cfg = load_config(None, [*QUICK, "run.wandb=offline", "run.wandb_project=proj", "run.wandb_entity=team",
                             "run.wandb_tags=[cifar,baseline]"])
    trackers = build_trackers(cfg)
    assert [type(t) for t in trackers] == [JsonlTracker, WandbTracker]
    w = trackers[1]
    w.start(run_info(run, cfg, None))
    for r in RECORDS:
        w.log(r["step"], r)
    w.close()
    init = fake.inits[0]
    assert (init["project"], init["entity"], init["tags"], init["mode"], init["name"]) == (
        "proj", "team", ["cifar", "baseline"], "offline", "r")
    assert init["dir"] == str(run.path) and init["config"]["run"]["wandb_project"] == "proj"
    assert init["id"] == (run.path / "wandb_run_id").read_text().strip() and len(init["id"]) == 8
    assert fake.logs == [(3, scalars(RECORDS[0])), (6, scalars(RECORDS[1]))] and fake.finished == 1
    w2 = build_trackers(cfg)[1]
    w2.start(run_info(run, cfg, 1))  # resumed: the same W&B run
    assert fake.inits[1]["id"] == init["id"] and fake.inits[1]["resume"] == "allow"
    assert build_trackers(cfg, main=False) == []  # other ranks log nothing


def test_mlflow_tracker_uses_a_file_store_in_the_run_and_logs_params_once(tmp_path, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    run = _run(tmp_path)
    cfg = load_config(None, [*QUICK, "run.mlflow=true", "run.mlflow_experiment=exp", "optim.lr=0.002"])
    m = build_trackers(cfg)[-1]
    assert isinstance(m, MlflowTracker)
    m.start(run_info(run, cfg, None))
    for r in RECORDS:
        m.log(r["step"], r)
    m.close()
    assert fake.calls[:3] == [("set_tracking_uri", (run.path / "mlruns").resolve().as_uri()),
                              ("set_experiment", "exp"), ("start_run", None, "r")]
    assert fake.calls[-1] == ("end_run",) and (run.path / "mlflow_run_id").read_text().strip() == "abc123"
    assert fake.params["optim.lr"] == "0.002" and fake.params["model.name"] == "vit_demo"
    assert sum(c[1] for c in fake.calls if c[0] == "log_params") == len(fake.params) > 100  # in batches of <= 100
    assert fake.metrics == [(3, scalars(RECORDS[0])), (6, scalars(RECORDS[1]))]
    fake.calls.clear()
    uri = load_config(None, [*QUICK, "run.mlflow=true", "run.mlflow_uri=http://mlflow.example:5000"])
    m = build_trackers(uri)[-1]
    m.start(run_info(run, uri, 1))  # a server URI; a resumed run continues its MLflow run, params are not re-logged
    assert fake.calls == [("set_tracking_uri", "http://mlflow.example:5000"), ("set_experiment", "vitforge"),
                          ("start_run", "abc123", None)]


@pytest.mark.parametrize("option,package", [("run.wandb=offline", "wandb"), ("run.mlflow=true", "mlflow")])
def test_a_missing_tracker_package_is_refused_before_a_run_directory_exists(tmp_path, monkeypatch, capsys, option,
                                                                            package):
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` raises ImportError
    cfg = load_config(None, [*QUICK, option, f"run.dir={tmp_path}", "run.name=never"])
    with pytest.raises(ConfigError, match=rf"^{option.split('=')[0]}: the {package} package is not installed "
                                          rf"\(pip install vitforge\[{package}\]\)"):
        Trainer(cfg)
    assert cli_main(["train", *QUICK, option, f"run.dir={tmp_path}", "run.name=never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install vitforge[{package}]" in err[0]
    assert not (tmp_path / "never").exists() and not any(tmp_path.iterdir())


def test_a_run_feeds_every_tracker_the_same_epoch_records(tmp_path, monkeypatch):
    wandb, mlflow = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    t = Trainer(load_config(None, [*QUICK, f"run.dir={tmp_path}", "run.name=all", "run.tensorboard=true",
                                   "run.wandb=offline", "run.mlflow=true"]))
    assert t.interrupted is False and t.stop_signal is None
    assert [type(x).__name__ for x in t.parts.trackers] == ["JsonlTracker", "TensorBoardTracker", "WandbTracker",
                                                           "MlflowTracker"]
    run = t.fit()
    assert t.interrupted is False
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[-1]["step"] == 2 * t.steps_per_epoch
    expected = [(r["step"], scalars(r)) for r in records]
    assert wandb.logs == expected and mlflow.metrics == expected
    assert expected[0][1]["val/top1"] == records[0]["val_top1"] and wandb.finished == 1
    assert mlflow.calls[-1] == ("end_run",) and list((run / "events").glob("events.out.tfevents.*"))


def test_train_without_optional_trackers_needs_neither_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    run = train(load_config(None, [*QUICK, "train.max_steps=1", f"run.dir={tmp_path}", "run.name=plain"]))
    assert (run / "metrics.jsonl").exists() and not (run / "wandb_run_id").exists()


@pytest.mark.parametrize("override,key", [("run.wandb_project=a/b", "run.wandb_project"),
                                          ("run.wandb_entity=''", "run.wandb_entity"),
                                          ("run.wandb_tags=['']", "run.wandb_tags"),
                                          ("run.mlflow_uri=''", "run.mlflow_uri"),
                                          ("run.mlflow_experiment=''", "run.mlflow_experiment")])
def test_tracker_options_are_validated(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(None, [override])
