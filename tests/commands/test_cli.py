"""Command line: verbs, one-line errors with exit status 2, eval/predict on a real checkpoint, the demo."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image_folder
from PIL import Image

from vitforge.commands.cli import VERBS, build_parser, main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUICK = ["train.device=cpu", "run.progress=none", "train.threads=1"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitforge", *args], env=ENV, capture_output=True, text=True, cwd=cwd)


def test_verb_table_and_help_agree():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    assert set(sub.choices) == set(VERBS)
    for name in ("train", "demo", "eval", "predict", "models", "info", "verify-attention"):
        assert name in VERBS


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "train", per_class=16)
    assert main(["train", f"data.train={data}", "model.name=vit_demo", "data.img_size=8", "data.val_split=0.25",
                 "data.batch_size=8", "train.epochs=2", f"run.dir={root / 'runs'}", "run.name=r", *QUICK]) == 0
    return root / "runs" / "r"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "nope.yaml"], "recipe not found: nope.yaml"),
        (["train", "optim.lrr=1"], "optim.lrr: unknown key"),
        (["train", "data.train=/no/such/dir"], "data path not found: /no/such/dir"),
        (["train", "model.name=vit_huge_nonexistent"], "model.name: unknown model 'vit_huge_nonexistent'"),
        (["train", "model.args.depthh=3"], "model 'vit_demo' does not take argument"),
        (["train", "data.train=digits", "model.pretrained=/no/weights.pt"], "model.pretrained: file not found"),
        (["eval", "/no/ckpt.pt", "--data", "digits"], "checkpoint not found: /no/ckpt.pt"),
        (["train", "--resume", "/no/run"], "checkpoint not found: /no/run"),
        (["info", "not_a_model"], "unknown model 'not_a_model'"),
        (["info", "vit_demo", "depth"], "'depth' is not of the form key=value"),
        (["train", "data.train=digits", "model.args.num_heads=5", "--dry-run"],
         "model 'vit_demo' cannot be built with num_heads=5"),  # a dry run builds the model
        (["train", "data.train=digits", "distill.teacher=runs/none", "--dry-run"],
         "distill.teacher: 'runs/none' is not a registered model"),  # ... and resolves the teacher
        (["train", "data.train=digits", "model.name=sclusterformer_hsi", "--dry-run"],
         "model.name: 'sclusterformer_hsi' cannot take this data's input"),  # ... and feeds it one input
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    assert main([*args, *(["run.dir=" + str(tmp_path)] if args[0] == "train" and "--resume" not in args else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitforge: error: ") and message in err and "\n" not in err, err


@pytest.mark.parametrize("value, says", [("0", "must be >= 1, got 0"), ("-3", "must be >= 1, got -3"),
                                         ("x", "expected a whole number >= 1, got 'x'")])
@pytest.mark.parametrize("verb", [["eval", "run", "--data", "digits"],
                                  ["predict", "run", "--images", "d", "--out", "o"],
                                  ["report", "run"], ["verify-attention", "vit_demo"]])
def test_batch_size_must_be_positive(verb, value, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*verb, "--batch-size", value])
    assert exc.value.code == 2 and f"argument --batch-size: {says}" in capsys.readouterr().err


def test_predict_checks_its_output_before_predicting(tmp_path, capsys):
    assert main(["predict", "/no/such/run", "--images", str(tmp_path), "--out", "/proc/preds.csv"]) == 2
    assert "--out /proc/preds.csv: cannot write in /proc" in capsys.readouterr().err


def test_debug_after_the_verb_empty_model_search_and_nothing_to_verify(capsys):
    with pytest.raises(Exception, match="unknown model 'nope'"):  # --debug re-raises: the traceback is shown
        main(["info", "nope", "--debug"])
    assert main(["models", "zzz*"]) == 0
    assert "no registered model matches 'zzz*'" in capsys.readouterr().err
    assert main(["verify-attention", "resnet18_cifar"]) == 0
    assert capsys.readouterr().out.strip() == "nothing to check: no hand-written attention modules to check"


def test_not_a_checkpoint(tmp_path, capsys):
    junk = tmp_path / "weights.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["eval", str(junk), "--data", "digits"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_models_and_info_json(capsys):
    assert main(["models", "vit_*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "vit_demo", "params": 136650, "trainable_params": 136650} in rows
    assert main(["info", "vit_demo", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == info["trainable_params"] == 136650 and info["output_shape"] == [1, 10]
    assert [s["name"] for s in info["stages"]][:2] == ["patch_embed", "blocks.0"]
    assert main(["info", "vit_demo", "num_classes=3", "depth=2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_shape"] == [1, 3]


def test_eval_predict_and_class_mismatch(trained_run, tmp_path, capsys):
    data = trained_run.parent.parent / "train"
    assert main(["eval", str(trained_run), "--data", str(data), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 48 and 0 <= m["top1"] <= 100 and set(m["per_class_top1"]) == {"cat", "dog", "fox"}

    images = tmp_path / "test"
    images.mkdir()
    for i, mode in enumerate(["RGB", "L", "RGBA", "P"]):
        Image.new(mode, (20, 12)).save(images / f"img{i}.png")
    (images / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained_run), "--images", str(images), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "wrote 4 predictions" in said and "1 unreadable" in said and "broken.jpg" in said
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert all(r["pred"] in ("cat", "dog", "fox") for r in rows)
    assert abs(sum(float(rows[0][f"prob_{c}"]) for c in ("cat", "dog", "fox")) - 1) < 1e-4
    before = out.read_text()
    assert main(["predict", str(trained_run), "--images", str(images), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == before

    other = make_image_folder(tmp_path / "other", classes=("cat", "zebra"), per_class=2)
    assert main(["eval", str(trained_run), "--data", str(other)]) == 2
    assert "classes not in the training set: zebra" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config(tmp_path):
    r = run_cli("train", "data.train=digits", "optim.lr=0.004", "--dry-run", f"run.dir={tmp_path}")
    assert r.returncode == 0 and "lr: 0.004" in r.stdout and "# data: 1617 train / 180 val images" in r.stdout
    assert not any(tmp_path.iterdir())


def test_cifar_parquet_one_epoch_then_eval_and_predict(cifar_parquet, tmp_path):
    """A new user's first CIFAR-10 run: tiny model, one epoch on a stratified subset, on the CPU."""
    r = run_cli("train", f"data.train={cifar_parquet}", "model.name=vit_demo", "data.img_size=8", "data.limit=600",
                "data.val_split=200", "train.epochs=1", f"run.dir={tmp_path}", "run.name=c10", *QUICK[:1], *QUICK[2:],
                "run.progress=plain")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "epoch 1/1" in r.stderr and "val_top1" in r.stderr
    run = tmp_path / "c10"
    s = json.loads((run / "summary.json").read_text())
    assert s["train_images"] == 600 and s["val_images"] == 200 and len(s["classes"]) == 10
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 90, 200)).save(images / f"{i}.jpg")
    r = run_cli("predict", str(run), "--images", str(images), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    assert len(list(csv.DictReader((tmp_path / "p.csv").open()))) == 3


@pytest.mark.slow
def test_demo_meets_its_bar(tmp_path):
    """`vitforge demo`: >= 95% validation top-1 on the held-out 20% of digits (time is measured in benchmarks)."""
    r = run_cli("demo", f"run.dir={tmp_path}", "run.progress=plain")
    assert r.returncode == 0, r.stderr[-2000:]
    run = next(tmp_path.iterdir())
    s = json.loads((run / "summary.json").read_text())
    assert s["val_images"] == 359 and s["best_val_top1"] >= 95.0, s
    assert f"run directory {run}" in r.stdout


def test_train_leaves_the_process_group_when_the_run_ends(tmp_path):
    """`vitforge train` destroys the process group at the end of its run (runtime.cleanup), here a one-process gloo
    group standing in for torchrun's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["train", "data.train=digits", "data.limit=64", "model.name=vit_demo", "model.args.depth=1",
                     "data.batch_size=32", "train.max_steps=1", "run.tensorboard=false", *QUICK,
                     f"run.dir={tmp_path}", "run.name=pg"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
