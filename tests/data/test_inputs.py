"""`data.train=auto` / `--images auto`: the training data and test images found under a fake Kaggle input directory
(several layouts), the one line saying what was chosen, and the one-line errors listing what was seen."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from vitforge.config import load_config
from vitforge.data import open_data
from vitforge.data.inputs import ROOT_ENV, choose, find_inputs, resolve_auto
from vitforge.errors import DataError


def flat(root: Path, n: int = 4, prefix: str = "img", size: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / f"{prefix}{i}.png")
    return root


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    root = tmp_path / "input"
    root.mkdir()
    monkeypatch.setenv(ROOT_ENV, str(root))
    return root


def test_imagefolder_train_and_flat_test(kaggle, capsys):
    make_image_folder(kaggle / "muffin-vs-chihuahua" / "train", classes=("chihuahua", "muffin"), per_class=3)
    flat(kaggle / "muffin-vs-chihuahua" / "test")
    assert resolve_auto("auto", "train") == str(kaggle / "muffin-vs-chihuahua" / "train")
    line = capsys.readouterr().err.strip()
    assert line == (f"data.train=auto: {kaggle}/muffin-vs-chihuahua/train (ImageFolder, 2 classes: chihuahua, muffin)"
                    f"; test images: {kaggle}/muffin-vs-chihuahua/test")
    assert resolve_auto("auto", "test") == str(kaggle / "muffin-vs-chihuahua" / "test")
    line = capsys.readouterr().err.strip()
    assert line == f"--images=auto: {kaggle}/muffin-vs-chihuahua/test (image folder, 4 images)"
    assert resolve_auto("data/train", "train") == "data/train"  # anything but `auto` passes through, silently
    assert capsys.readouterr().err == ""


def test_nested_archive_folders_and_a_val_folder(kaggle, capsys):
    ds = kaggle / "dogs" / "archive (3)"
    make_image_folder(ds / "train" / "train", classes=("a", "b", "c"), per_class=2)
    make_image_folder(ds / "val", classes=("a", "b", "c"), per_class=2)  # a second ImageFolder, not named train
    make_image_folder(ds / "test", classes=("a", "b", "c"), per_class=2)  # a labelled test set: never training data
    flat(ds / "docs" / "figures")  # loose images not named test
    found = find_inputs(kaggle)
    assert sorted(f.path.name for f in found.train) == ["test", "train", "val"]
    assert choose(found, "train").path == ds / "train" / "train"
    assert choose(found, "test").path == ds / "test"  # the folder named test among two image sources
    cfg = load_config(None, ["data.train=auto", "data.val_split=0.5"]).data
    opened = open_data(cfg)  # the library path resolves `auto` too
    assert opened.classes == ["a", "b", "c"] and len(opened.train) + len(opened.val) == 6
    assert f"data.train=auto: {ds}/train/train (ImageFolder, 3 classes: a, b, c)" in capsys.readouterr().err


def test_label_csv_beside_an_image_folder(kaggle):
    ds = kaggle / "cactus"
    flat(ds / "train", n=6, prefix="t")
    flat(ds / "test", n=3, prefix="q")
    # Kaggle style: ids without the folder (and here without the extension), labels as names
    write_csv(ds / "train.csv", ["id", "label"], [[f"t{i}", "yes" if i % 2 else "no"] for i in range(6)])
    write_csv(ds / "sample_submission.csv", ["id", "label"], [[f"q{i}", 0] for i in range(3)])
    assert resolve_auto("auto", "train") == str(ds / "train.csv")
    assert resolve_auto("auto", "test") == str(ds / "test")
    opened = open_data(load_config(None, ["data.train=auto", "data.val_split=0"]).data)
    src = opened.train.source
    assert opened.classes == ["no", "yes"] and len(src) == 6
    assert src.files == [str(ds / "train" / f"t{i}.png") for i in range(6)]
    assert src.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_csv_with_paths_next_to_it_is_unchanged(tmp_path):
    flat(tmp_path / "imgs", n=2)
    write_csv(tmp_path / "labels.csv", ["file", "label"], [["imgs/img0.png", "a"], ["imgs/img1.png", "b"]])
    src = open_data(load_config(None, [f"data.train={tmp_path / 'labels.csv'}", "data.val_split=0"]).data).train.source
    assert src.files == [str(tmp_path / "labels.csv").replace("labels.csv", "imgs/img0.png"),
                         str(tmp_path / "imgs" / "img1.png")]


def test_csv_entries_found_nowhere_name_the_column(tmp_path):
    flat(tmp_path / "pics", n=2)
    write_csv(tmp_path / "train.csv", ["id", "label"], [["zzz", "a"], ["yyy", "b"]])
    with pytest.raises(DataError, match=r"train.csv: 'id' entries such as 'zzz' are neither files next to the CSV nor "
                                        r"images in the folders beside it \(pics/\)"):
        open_data(load_config(None, [f"data.train={tmp_path / 'train.csv'}"]).data)


def test_two_training_candidates_not_told_apart_by_name(kaggle):
    make_image_folder(kaggle / "flowers" / "images", classes=("rose", "tulip"), per_class=2)
    make_image_folder(kaggle / "birds" / "data", classes=("owl", "tit"), per_class=2)
    with pytest.raises(DataError) as e:
        resolve_auto("auto", "train")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data.train=auto: 2 candidates for training data (an ImageFolder or a "
                                              f"label CSV) under {kaggle} and none is the only one named 'train'")
    assert "birds/data (ImageFolder, 2 classes: owl, tit); flowers/images (ImageFolder, 2 classes: rose, tulip)" in msg
    assert msg.endswith("give data.train=PATH")


def test_nothing_usable_lists_what_was_seen(kaggle):
    flat(kaggle / "ds" / "test")  # test images only
    (kaggle / "ds" / "notes").mkdir()
    with pytest.raises(DataError) as e:
        resolve_auto("auto", "train")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"data.train=auto: no training data (an ImageFolder or a label CSV) under {kaggle}; saw: "
                   f"ds/test (image folder, 4 images); ds/notes (no images); give data.train=PATH")
    flat(kaggle / "ds" / "extra")
    assert resolve_auto("auto", "test") == str(kaggle / "ds" / "test")  # two image folders: the one named test
    (kaggle / "ds" / "test").rename(kaggle / "ds" / "holdout")
    with pytest.raises(DataError, match=r"^--images=auto: 2 candidates for test images \(a folder of images\) under "
                                        r".* none is the only one named 'test': ds/extra \(image folder, 4 images\); "
                                        r"ds/holdout \(image folder, 4 images\); give --images=PATH$"):
        resolve_auto("auto", "test")


def test_no_input_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=rf"no input directory {tmp_path}/nowhere \(not on Kaggle\?\); set "
                                        rf"{ROOT_ENV}=DIR"):
        resolve_auto("auto", "test")


def test_cli_train_dry_run_records_the_path_and_predict_refuses_in_one_line(kaggle, tmp_path, capsys):
    from vitforge.commands.cli import main

    make_image_folder(kaggle / "comp" / "train", classes=("a", "b"), per_class=4)
    assert main(["train", "model.name=timm:test_vit", "data.img_size=32", "data.train=auto", "data.val_split=0.5",
                 "data.batch_size=2", "train.device=cpu", f"run.dir={tmp_path / 'runs'}", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.err.count("data.train=auto:") == 1
    assert f"data.train=auto: {kaggle}/comp/train (ImageFolder, 2 classes: a, b)\n" in out.err  # no test folder
    assert f"train: {kaggle}/comp/train" in out.out  # the printed (and recorded) config holds the path found
    # no test images: refused before any model is loaded (the checkpoint does not even exist)
    assert main(["predict", str(tmp_path / "none.pt"), "--images", "auto", "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert f"--images=auto: no test images (a folder of images) under {kaggle}; saw: comp/train (ImageFolder" in err
