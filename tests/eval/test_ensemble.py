"""Ensembles and submissions (issue 5): two real runs of different architectures and input sizes on digits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from vitforge.checkpoint import load_checkpoint
from vitforge.commands.cli import main
from vitforge.config import load_config
from vitforge.errors import CheckpointError, VitforgeError
from vitforge.eval.ensemble import evaluate_ensemble, predict_ensemble, run_ensemble
from vitforge.eval.submission import KAGGLE, CsvFormat, write_submission
from vitforge.train.trainer import train

QUICK = ["data.train=digits", "run.progress=none", "train.device=cpu", "train.threads=1"]
DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A vit_demo at 8 px and a one-layer ViT-Lite at 16 px, trained briefly on digits."""
    root = tmp_path_factory.mktemp("ens")
    a = train(load_config(None, ["model.name=vit_demo", "train.epochs=2", "schedule.warmup_epochs=0",
                                 "data.aug.hflip=false", "data.aug.crop_padding=0", f"run.dir={root}", "run.name=a",
                                 *QUICK]))
    b = train(load_config(None, ["model.name=vit_lite_7_4_cifar", "model.args.depth=1", "model.args.embed_dim=32",
                                 "model.args.num_heads=2", "data.img_size=16", "train.epochs=1", f"run.dir={root}",
                                 "run.name=b", *QUICK]))
    return a, b


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """20 digits as PNG files (one in a sub-folder), unlabeled."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_png")
    (root / "sub").mkdir()
    d = load_digits()
    for i in range(20):
        grey = np.rint(d.images[i] * 255 / 16).astype(np.uint8)
        name = root / ("sub" if i == 7 else "") / f"img_{i:03d}.png"
        Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(name)
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """ImageFolder of 60 digits (6 per class) that the runs did not train on as files."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_folder")
    d = load_digits()
    for c in range(10):
        (root / str(c)).mkdir()
        for i in np.flatnonzero(d.target == c)[-6:]:
            grey = np.rint(d.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(root / str(c) / f"{i}.png")
    return root


def test_ensemble_averages_models_of_different_sizes(runs, images):
    a, b = runs
    assert load_checkpoint(a)["preprocess"]["img_size"] == 8 and load_checkpoint(b)["preprocess"]["img_size"] == 16
    pa, pb = predict_ensemble(a, str(images)), predict_ensemble([b], str(images))
    pred = predict_ensemble([a, b], str(images), weights=[1, 3])
    assert pred["ids"] == pa["ids"] == pb["ids"] and len(pred["ids"]) == 20 and "sub/img_007.png" in pred["ids"]
    assert pred["classes"] == DIGITS and pred["models"] == ["vit_demo", "vit_lite_7_4_cifar"]
    assert pred["probs"].shape == (20, 10) and pred["per_model_probs"].shape == (2, 20, 10)
    assert pred["weights"] == [0.25, 0.75]
    assert np.allclose(pred["per_model_probs"][0], pa["probs"], atol=1e-6)
    assert np.allclose(pred["per_model_probs"][1], pb["probs"], atol=1e-6)
    assert np.allclose(pred["probs"], 0.25 * pa["probs"] + 0.75 * pb["probs"], atol=1e-6)
    equal = predict_ensemble([a, b], str(images))
    assert np.allclose(equal["probs"], (pa["probs"] + pb["probs"]) / 2, atol=1e-6)
    assert np.allclose(equal["probs"].sum(1), 1, atol=1e-5)


def test_tta_changes_each_models_probabilities(runs, images):
    a, b = runs
    plain = predict_ensemble([a, b], str(images))
    flip = predict_ensemble([a, b], str(images), tta="flip")
    assert flip["tta"] == "flip" and not np.allclose(flip["per_model_probs"], plain["per_model_probs"])
    assert np.allclose(flip["probs"].sum(1), 1, atol=1e-5)


def test_class_mismatch_names_the_checkpoint(runs, images, tmp_path):
    a, _ = runs
    ckpt = torch.load(a / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    ckpt["classes"] = [f"c{i}" for i in range(10)]
    odd = tmp_path / "renamed.pt"
    torch.save(ckpt, odd)
    with pytest.raises(CheckpointError, match=r"renamed\.pt: its classes \[c0, c1.*differ from those of .*best\.pt"):
        predict_ensemble([a, odd], str(images))


@pytest.mark.parametrize("weights, message", [([1.0], "1 weight"), ([1.0, -1.0], "non-negative"),
                                              ([0.0, 0.0], "positive sum")])
def test_bad_weights(runs, images, weights, message):
    with pytest.raises(VitforgeError, match=message):
        predict_ensemble(list(runs), str(images), weights=weights)


def test_evaluate_ensemble_with_tta(runs, labelled):
    a, b = runs
    m = evaluate_ensemble([a, b], str(labelled), tta="flip-shift", weights=[2, 1])
    ens = run_ensemble([a, b], str(labelled), labeled=True, tta="flip-shift", weights=[2, 1])
    assert m["n"] == 60 and m["model"] == "ensemble(vit_demo, vit_lite_7_4_cifar)" and m["tta"] == "flip-shift"
    right = (ens.probs.argmax(1) == ens.labels).mean() * 100
    assert m["top1"] == pytest.approx(right, abs=1e-4)
    assert m["with_tta"]["top1"] == pytest.approx((ens.probs_tta.argmax(1) == ens.labels).mean() * 100, abs=1e-4)
    assert m["top1_tta"] == m["with_tta"]["top1"]
    assert [p["model"] for p in m["per_model"]] == ["vit_demo", "vit_lite_7_4_cifar"]
    single = evaluate_ensemble(a, str(labelled))
    assert m["per_model"][0]["top1"] == pytest.approx(single["top1"]) and single["with_tta"] is None
    assert single["top1_tta"] == single["top1"] and single["checkpoint"].endswith("best.pt")


# ---- CSV layouts -----------------------------------------------------------------------------------------------------
PRED = {"ids": ["sub/cat_01.jpg", "dog_02.png"], "classes": ["cat", "dog"],
        "probs": np.array([[0.9, 0.1], [0.3, 0.7]], dtype=np.float32)}


def read(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open()))


def test_default_layout(tmp_path):
    rows = read(write_submission(PRED, tmp_path / "p.csv"))
    assert rows == [["file", "pred", "prob_cat", "prob_dog"], ["sub/cat_01.jpg", "cat", "0.900000", "0.100000"],
                    ["dog_02.png", "dog", "0.300000", "0.700000"]]


def test_kaggle_and_custom_layouts(tmp_path):
    assert read(write_submission(PRED, tmp_path / "k.csv", KAGGLE)) == [["id", "label"], ["cat_01", "cat"],
                                                                          ["dog_02", "dog"]]
    fmt = CsvFormat(id_column="image", id_from="name", label_column="target", label_as="index", prob_prefix="",
                    decimals=2)
    assert read(write_submission(PRED, tmp_path / "c.csv", fmt)) == [
        ["image", "target", "cat", "dog"], ["cat_01.jpg", "0", "0.90", "0.10"], ["dog_02.png", "1", "0.30", "0.70"]]
    probs_only = CsvFormat(id_column="id", id_from="stem", label_column="")
    assert read(write_submission(PRED, tmp_path / "p.csv", probs_only))[0] == ["id", "prob_cat", "prob_dog"]


def test_layout_errors(tmp_path):
    twins = {**PRED, "ids": ["a/1.jpg", "b/1.jpg"]}
    with pytest.raises(VitforgeError, match="two images get the id '1'; use --id-from path"):
        write_submission(twins, tmp_path / "t.csv", KAGGLE)
    with pytest.raises(VitforgeError, match="repeat dog"):
        write_submission(PRED, tmp_path / "d.csv", CsvFormat(label_column="dog", prob_prefix=""))
    with pytest.raises(VitforgeError, match="ids only"):
        CsvFormat(label_column=None, probs=False)
    with pytest.raises(VitforgeError, match="--id-from"):
        CsvFormat(id_from="basename")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_existing_output_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "s.csv"
    out.write_text("precious\n")
    with pytest.raises(VitforgeError, match="already exists; pass --overwrite"):
        write_submission(PRED, out)
    assert out.read_text() == "precious\n"
    write_submission(PRED, out, overwrite=True)
    assert read(out)[0][0] == "file"


# ---- command line ----------------------------------------------------------------------------------------------------
def test_cli_two_model_kaggle_submission(runs, images, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "submission.csv"
    args = ["predict", str(a), str(b), "--images", str(images), "--out", str(out), "--kaggle", "--tta", "flip",
            "--weights", "1", "2"]
    assert main(args) == 0
    assert "wrote 20 predictions (vit_demo + vit_lite_7_4_cifar, tta flip)" in capsys.readouterr().out
    rows = read(out)
    assert rows[0] == ["id", "label"] and len(rows) == 21
    assert sorted(r[0] for r in rows[1:]) == [f"img_{i:03d}" for i in range(20)]
    assert all(r[1] in DIGITS for r in rows[1:])
    before = out.read_text()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err and out.read_text() == before
    assert main([*args, "--overwrite", "--label-as", "index", "--probs", "--prob-prefix", "p"]) == 0
    assert read(out)[0] == ["id", "label", *[f"p{c}" for c in DIGITS]]
    assert main(["predict", str(a), str(b), "--images", str(images), "--out", str(tmp_path / "w.csv"),
                 "--weights", "1"]) == 2
    assert "1 weight(s) for 2 checkpoint(s)" in capsys.readouterr().err
    assert main(["predict", str(a), "--images", str(images), "--out", str(tmp_path / "x.csv"), "--tta", "bogus"]) == 2
    assert "unknown view set 'bogus'" in capsys.readouterr().err


def test_cli_eval_ensemble_json_and_text(runs, labelled, capsys):
    import json

    a, b = runs
    assert main(["eval", str(a), str(b), "--data", str(labelled), "--tta", "flip", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 60 and len(m["per_model"]) == 2 and m["with_tta"]["n"] == 60
    assert len(m["confusion"]) == 10 and 0 <= m["ece"] <= 1
    assert main(["eval", str(a), "--data", str(labelled), "--tta", "flip-shift"]) == 0
    text = capsys.readouterr().out
    assert "top-1 without TTA" in text and "with TTA (flip-shift)" in text and "macro avg" in text


# ---- DDP: probabilities gathered from every rank ----------------------------------------------------------------
def test_collect_probs_gathers_every_rank(tmp_path):
    from ddp_probs_worker import rank_main, tiny_model

    x, y = torch.randn(11, 3, 4, 4), torch.randint(0, 5, (11,))
    out = tmp_path / "rank0.pt"
    mp.spawn(rank_main, args=(2, f"file://{tmp_path / 'init'}", x, y, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    order = got["idx"]
    assert sorted(order.tolist()) == list(range(11))  # every item once, from both ranks
    model = tiny_model()
    with torch.no_grad():
        assert torch.allclose(got["plain"], model(x[order]).softmax(1), atol=1e-6)
        both = (model(x[order]).softmax(1) + model(x[order].flip(-1)).softmax(1)) / 2
    assert torch.allclose(got["tta"], both, atol=1e-6)
    assert torch.equal(got["labels"], y[order])
