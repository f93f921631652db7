"""Ensembles of K-fold CVs and runs on real (tiny) trained models: `--weights auto` from held-out log-loss,
`vitforge stack`, the predicted class distribution, progress lines when piped, and top-5 hidden for 3 classes."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder

import vitforge.eval.stack as S
from vitforge.commands.cli import main
from vitforge.eval.ensemble import predict_ensemble
from vitforge.eval.members import log_loss, read_oof
from vitforge.eval.submission import class_distribution

TINY = ["data.img_size=32", "data.batch_size=4", "train.epochs=3", "optim.lr=3e-3", "train.device=cpu",
        "run.progress=none", "run.tensorboard=false", "train.threads=1", "data.aug.crop_padding=0"]


@pytest.fixture(scope="module")
def cvs(tmp_path_factory) -> dict:
    """Two 2-fold CVs (a ViT and a ConvNeXt) of 24 colour-coded images, and 6 unlabeled test images. The ViT folds
    share a fixed normalisation (one evaluation stream for both); the ConvNeXt folds normalise with their own
    training images' statistics (one stream each)."""
    tmp = tmp_path_factory.mktemp("cvens")
    data = make_image_folder(tmp / "train", per_class=8, size=16)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        for name, model, norm in (("vit", "timm:test_vit", ["data.mean=[0.4,0.4,0.4]", "data.std=[0.3,0.3,0.3]"]),
                                  ("cnx", "timm:test_convnext", [])):
            assert main(["cv", "--folds", "2", f"data.train={data}", f"model.name={model}", *TINY, *norm,
                         f"run.dir={tmp}", f"run.name={name}"]) == 0
    by_class = make_image_folder(tmp / "test_by_class", per_class=2, size=16, seed=3)
    flat = tmp / "test"
    flat.mkdir()
    for p in sorted(by_class.rglob("*.png")):
        shutil.copy(p, flat / f"{p.parent.name}_{p.stem}.png")
    return {"vit": tmp / "vit", "cnx": tmp / "cnx", "test": flat, "cv_log": err.getvalue(), "tmp": tmp}


def test_cv_prints_elapsed_and_time_left_per_fold(cvs):
    lines = [x for x in cvs["cv_log"].splitlines() if x.startswith("fold ")]
    assert "elapsed, about" in lines[0] and "left" in lines[0]  # fold 1 of 2: an estimate for fold 2
    assert lines[1].startswith("fold 2/2: out-of-fold accuracy") and "elapsed" in lines[1] and "left" not in lines[1]


def test_three_classes_have_no_top5(cvs):
    run = cvs["vit"] / "fold_0"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_top1" in r and "val_top5" not in r for r in records)
    assert "val_top5" not in json.loads((run / "summary.json").read_text())["final"]


def _oof_weights(*cv_dirs: Path) -> list[float]:
    e = []
    for d in cv_dirs:
        _, _, labels, probs, _ = read_oof(d)
        e.append(math.exp(-log_loss(probs, labels, 1e-6)))
    return [v / sum(e) for v in e]


def test_predict_weights_auto_from_out_of_fold_log_loss(cvs, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    assert main(["predict", str(cvs["vit"]), str(cvs["cnx"]), "--images", str(cvs["test"]), "--weights", "auto",
                 "--out", str(out), "--progress", "none"]) == 0
    cap = capsys.readouterr()
    w = _oof_weights(cvs["vit"], cvs["cnx"])
    lines = cap.err.splitlines()
    assert lines[0] == "ensemble weights from held-out log-loss (w ~ exp(-log-loss)):"
    assert lines[1].startswith(f"  {w[0]:.3f}  {cvs['vit']} (2 folds)  out-of-fold log-loss ")
    assert lines[2].startswith(f"  {w[1]:.3f}  {cvs['cnx']} (2 folds)  out-of-fold log-loss ")
    # the CSV is the weighted mean of each CV's fold ensemble
    a, b = (predict_ensemble([cvs[k]], str(cvs["test"])) for k in ("vit", "cnx"))
    rows = {r["file"]: r for r in csv.DictReader(open(out))}
    classes = a["classes"]
    for i, name in enumerate(a["ids"]):
        got = [float(rows[name][f"prob_{c}"]) for c in classes]
        np.testing.assert_allclose(got, w[0] * a["probs"][i] + w[1] * b["probs"][i], atol=2e-6)
    # the predicted class distribution, as Muffyn's README shows it ("Prediction Distribution")
    pred = np.array([[float(rows[n][f"prob_{c}"]) for c in classes] for n in a["ids"]]).argmax(1)
    counts = np.bincount(pred, minlength=3)
    assert "predicted classes:" in cap.out and "  total: 6 images" in cap.out
    for k in np.flatnonzero(counts):
        assert f"  {classes[k]}: {counts[k]} images ({100 * counts[k] / 6:.1f}%)" in cap.out


def test_eval_weights_auto_from_each_runs_validation_loss(cvs, capsys):
    import torch

    runs = [cvs["vit"] / "fold_0", cvs["cnx"] / "fold_1"]
    assert main(["eval", *map(str, runs), "--data", str(cvs["tmp"] / "train"), "--weights", "auto", "--json",
                 "--progress", "none"]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)  # stdout holds only the JSON; the weights went to stderr
    losses = [torch.load(r / "checkpoints" / "best.pt", weights_only=False)["metrics"]["loss"] for r in runs]
    e = [math.exp(-v) for v in losses]
    assert [x["weight"] for x in m["members"]] == pytest.approx([v / sum(e) for v in e])
    assert m["weights"] == pytest.approx([v / sum(e) for v in e])
    assert [x["held_out"]["what"] for x in m["members"]] == ["validation", "validation"]
    assert m["top5"] is None and "validation log-loss" in cap.err


def test_weights_auto_needs_a_held_out_score(cvs, capsys):
    last = cvs["vit"] / "fold_0" / "checkpoints" / "last.pt"
    assert main(["eval", str(last), "--data", str(cvs["tmp"] / "train"), "--weights", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"{last}: no held-out score in this model" in err and "one number per model to --weights" in err
    assert main(["eval", str(last), "--data", str(cvs["tmp"] / "train"), "--weights", "1", "x"]) == 2
    assert "--weights: 'x' is not a number" in capsys.readouterr().err


def test_stack_reports_out_of_fold_scores_and_writes_a_submission(cvs, tmp_path, capsys):
    out = tmp_path / "stack.csv"
    assert main(["stack", str(cvs["vit"]), str(cvs["cnx"]), "--images", str(cvs["test"]), "--out", str(out),
                 "--kaggle", "--probs", "--progress", "none"]) == 0
    text = capsys.readouterr().out
    oof = S.load_oof_set([cvs["vit"], cvs["cnx"]])
    c = S.compare(oof)
    assert text.startswith(S.format_comparison(c))  # the honest (nested) numbers, side by side
    assert "out-of-fold scores over 24 images (2 folds" in text and "stacking (logistic, logits, C=1)" in text
    assert f"wrote 6 predictions (stack of vit + cnx) to {out}" in text and "predicted classes:" in text
    # the submission = the meta-learner fitted on all OOF rows applied to each CV's fold-averaged test probabilities
    members = [predict_ensemble([cvs[k]], str(cvs["test"])) for k in ("vit", "cnx")]
    expect = S.combine("stack", oof, np.stack([p["probs"] for p in members]))
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0])[:2] == ["id", "label"]
    by_id = {r["id"]: r for r in rows}
    for i, name in enumerate(members[0]["ids"]):
        got = [float(by_id[Path(name).stem][f"prob_{k}"]) for k in oof.classes]
        np.testing.assert_allclose(got, expect[i], atol=2e-6)
    assert main(["stack", str(cvs["vit"]), str(cvs["cnx"]), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert set(j["methods"]) == {"mean", "weighted", "stack"} and j["n"] == 24
    assert j["methods"]["stack"] == pytest.approx(c["methods"]["stack"])


def test_stack_refuses_what_it_cannot_use(cvs, tmp_path, capsys):
    assert main(["stack", str(cvs["vit"] / "fold_0")]) == 2
    assert "not a CV directory (no cv.json)" in capsys.readouterr().err
    assert main(["stack", str(cvs["vit"]), "--images", str(cvs["test"])]) == 2
    assert "--images and --out go together" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(cvs["cnx"], other)
    rows = list(csv.DictReader(open(other / "oof.csv")))
    rows[0]["file"] = "cat/999.png"
    with open(other / "oof.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(["stack", str(cvs["vit"]), str(other)]) == 2
    assert f"{other}: its out-of-fold images differ from those of {cvs['vit']}" in capsys.readouterr().err


def test_one_class_everywhere_is_flagged():
    pred = {"classes": ["chihuahua", "muffin"], "probs": np.array([[0.2, 0.8]] * 5)}
    text, warning = class_distribution(pred)
    assert text.splitlines() == ["predicted classes:", "  muffin: 5 images (100.0%)",
                                 "  total: 5 images; 1 of 2 classes never predicted"]
    assert warning.startswith("every one of the 5 images is predicted as 'muffin'")
    pred["probs"][0] = [0.9, 0.1]
    assert class_distribution(pred)[1] is None


def test_piped_progress_lines_and_none(cvs, tmp_path, capsys):
    args = ["predict", str(cvs["vit"]), "--images", str(cvs["test"]), "--out", str(tmp_path / "p.csv"),
            "--batch-size", "2", "--tta", "flip"]
    assert main([*args, "--progress", "auto", "--progress-every", "0"]) == 0  # capsys: stderr is not a terminal
    err = capsys.readouterr().err
    # both folds run on one stream (same preprocessing): one line per batch of 2 images for the pair
    lines = [x for x in err.splitlines() if x.startswith("timm:test_vit x2 (2 views): ")]
    assert [x.split(": ")[1].split(" img")[0] for x in lines] == ["2/6", "4/6", "6/6"]
    assert main([*args, "--progress", "none", "--overwrite"]) == 0
    assert "img/s" not in capsys.readouterr().err


def test_folds_sharing_a_stream_predict_as_they_do_alone(cvs):
    folds = [cvs["vit"] / "fold_0", cvs["vit"] / "fold_1"]
    together = predict_ensemble(folds, str(cvs["test"]), tta="flip", batch_size=4)
    for k, fold in enumerate(folds):
        alone = predict_ensemble([fold], str(cvs["test"]), tta="flip", batch_size=4)
        assert alone["ids"] == together["ids"]
        np.testing.assert_allclose(together["per_model_probs"][k], alone["probs"], atol=1e-6)


def test_export_and_report_show_their_steps(cvs, tmp_path, capsys):
    run = cvs["cnx"] / "fold_0"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors"),
                 "--progress", "plain", "--progress-every", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"export safetensors: loading {run} (")
    assert err[1].startswith(f"export safetensors: writing {tmp_path / 'm.safetensors'} and checking parity (")
    assert main(["report", str(run), "--tta", "flip", "--progress", "plain", "--progress-every", "0"]) == 0
    err = capsys.readouterr().err
    assert f"report {run.name}: evaluating (tta flip)" in err and f"report {run.name}: drawing figures" in err
    assert "timm:test_convnext (2 views): 12/12 img (100%)" in err
    page = (run / "report" / "index.html").read_text()
    assert json.loads((run / "report" / "report.json").read_text())["top5"] is None and "top-5" not in page
