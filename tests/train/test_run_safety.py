"""What a run may write and who may write it: new or empty directories only, a suffix for a default name taken in
the same second, one process per run (a live `--resume` twin is refused, a dead one's lock is taken over), devices
that are not there named before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from vitforge.commands.cli import main
from vitforge.config import load_config
from vitforge.errors import ConfigError
from vitforge.train.rundir import RunDir
from vitforge.train.trainer import Trainer, absolute_paths, train

QUICK = ["model.name=vit_demo", "model.args.depth=1", "data.train=digits", "data.limit=80", "data.batch_size=16",
         "train.epochs=1", "train.max_steps=2", "train.device=cpu", "run.progress=none", "train.threads=1",
         "run.tensorboard=false"]


def test_an_explicit_name_never_takes_over_a_foreign_directory(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"precious")
    with pytest.raises(ConfigError, match=r"run.name: .*photos already exists and is not a vitforge run"):
        train(load_config(None, [*QUICK, f"run.dir={tmp_path}", "run.name=photos"]))
    assert sorted(p.name for p in mine.iterdir()) == ["cat.jpg"] and (mine / "cat.jpg").read_bytes() == b"precious"
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert (train(load_config(None, [*QUICK, f"run.dir={tmp_path}", "run.name=empty"])) / "checkpoints").is_dir()


def test_a_default_name_taken_in_the_same_second_gets_a_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr("vitforge.train.rundir.default_name", lambda model, data: "same-second")
    cfg = load_config(None, [*QUICK, f"run.dir={tmp_path}"])
    a = RunDir.create(cfg, dataset_name="digits")
    b = RunDir.create(cfg, dataset_name="digits")
    c = RunDir.create(cfg, dataset_name="digits")
    assert [r.path.name for r in (a, b, c)] == ["same-second", "same-second-2", "same-second-3"]


def test_a_live_run_cannot_be_resumed_twice_and_a_dead_lock_is_taken_over(tmp_path, capsys):
    run = train(load_config(None, [*QUICK, f"run.dir={tmp_path}", "run.name=r", "train.max_steps=null"]))
    assert not (run / ".lock").exists()  # released at the end
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "now"}))
        before = (run / "metrics.jsonl").read_text()
        assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {sleeper.pid}" in err and "\n" not in err.strip()
        assert (run / "metrics.jsonl").read_text() == before  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    # The process is gone (like a SIGKILLed trainer): its lock is stale and the resume goes ahead.
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    assert not (run / ".lock").exists()
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_lock_of_another_host_is_respected(tmp_path):
    r = RunDir(tmp_path)
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "since": "then"}))
    with pytest.raises(ConfigError, match="in use by process .* on elsewhere"):
        r.acquire()
    (tmp_path / ".lock").write_text("{half-writ")  # a holder killed while writing it: stale
    r.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    r.release()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("spec, says", [
    ("cuda", "train.device: cuda requested but CUDA is not available here"),
    ("cuda:3", "train.device: cuda:3 requested but"),
    ("gpu", "train.device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
])
def test_a_device_that_is_not_there_is_named_before_any_work(spec, says, tmp_path):
    import torch

    if torch.cuda.is_available() and spec.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=f"^{says}"):
        Trainer(load_config(None, [*QUICK, f"run.dir={tmp_path}", f"train.device={spec}"]))
    assert not list(tmp_path.iterdir())


def test_eval_device_option_is_checked(capsys):
    assert main(["eval", "/no/run", "--data", "digits", "--device", "gpu"]) == 2
    assert "--device: 'gpu' is not a device" in capsys.readouterr().err


def test_relative_data_paths_are_stored_absolute_so_resume_works_from_anywhere(tmp_path, monkeypatch):
    from conftest import make_image_folder

    project = tmp_path / "project"
    make_image_folder(project / "data" / "train", per_class=10, size=8)
    monkeypatch.chdir(project)
    base = [q for q in QUICK if not q.startswith(("data.train", "data.limit", "train.max_steps"))]
    run = train(load_config(None, [*base, "data.train=data/train", "run.dir=runs", "run.name=rel"]))
    stored = load_config(run / "config.yaml")
    assert stored.data.train == str(project / "data" / "train")
    monkeypatch.chdir(tmp_path)  # somewhere else
    assert main(["train", "--resume", str(project / "runs" / "rel"), "train.epochs=2"]) == 0
    assert main(["eval", str(project / "runs" / "rel"), "--data", str(project / "data" / "train")]) == 0
    (tmp_path / "digits").mkdir()  # a folder named like a bundled source does not turn the name into a path
    assert absolute_paths(load_config(None, ["data.train=digits"])).data.train == "digits"
