"""`vitforge.eval.predict`: the evaluation stream a checkpoint's metadata describes (its classes, its
preprocessing), and the inference autocast policy."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from vitforge.data.dataset import Split
from vitforge.data.sources import open_source
from vitforge.errors import DataError
from vitforge.eval.predict import autocast_factory, eval_stream_for, stream_for_split

CPU = torch.device("cpu")
META = {"classes": ["fox", "cat", "dog"], "preprocess": {"img_size": 16, "mean": [0.5, 0.4, 0.3],
                                                          "std": [0.2, 0.25, 0.3]}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("pred") / "train", per_class=3, size=16)


def items(stream) -> tuple[torch.Tensor, list[int], list[str]]:
    xs, ys, ids = [], [], []
    for x, y, idx in stream:
        xs.append(x)
        ys += y.tolist()
        ids += [stream.ids[i] for i in idx.tolist()]
    return torch.cat(xs), ys, ids


def test_labels_follow_the_checkpoint_class_order_and_pixels_its_normalisation(folder):
    s = eval_stream_for(META, str(folder), labeled=True, batch_size=4, device=CPU, num_workers=0)
    x, ys, ids = items(s)
    assert x.shape == (9, 3, 16, 16) and x.dtype == torch.float32
    assert {i: y for i, y in zip(ids, ys, strict=True)} == {
        f"{c}/{k:03d}.png": META["classes"].index(c) for c in ("cat", "dog", "fox") for k in range(3)}
    first = np.asarray(Image.open(folder / ids[0]).convert("RGB"), dtype=np.float32) / 255
    want = (torch.from_numpy(first).permute(2, 0, 1) - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) \
        / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    torch.testing.assert_close(x[0], want, rtol=0, atol=1e-6)


def test_resized_to_the_checkpoint_input_size(folder):
    meta = {**META, "preprocess": {**META["preprocess"], "img_size": 24}}
    x, _, _ = items(eval_stream_for(meta, str(folder), labeled=True, batch_size=5, device=CPU, num_workers=0))
    assert x.shape == (9, 3, 24, 24)


def test_unlabeled_images_get_label_minus_one(folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(folder.rglob("*.png"))[:4]:
        shutil.copy(p, flat / f"{p.parent.name}_{p.name}")
    _, ys, ids = items(eval_stream_for(META, str(flat), labeled=False, batch_size=3, device=CPU, num_workers=0))
    assert ys == [-1] * 4 and len(set(ids)) == 4
    with pytest.raises(DataError, match="images without class sub-folders"):
        eval_stream_for(META, str(flat), labeled=True, batch_size=3, device=CPU)


def test_classes_unknown_to_the_checkpoint_are_named(tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("cat", "wolf"), per_class=2, size=16)
    with pytest.raises(DataError, match=r"has classes not in the training set: wolf \(training classes: fox, cat, "
                                        r"dog\)$"):
        eval_stream_for(META, str(other), labeled=True, batch_size=2, device=CPU)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files found"):
        eval_stream_for(META, str(tmp_path / "empty"), labeled=False, batch_size=2, device=CPU)


def test_stream_for_split_reads_only_the_split(folder):
    src = open_source(str(folder))
    keep = np.array([1, 4, 7])
    s = stream_for_split(META, Split(src, keep, src.labels), batch_size=8, device=CPU, num_workers=0)
    _, ys, ids = items(s)
    assert ids == [src.ids[i] for i in keep] and ys == src.labels[keep].tolist()


def test_inference_autocast_is_full_precision_on_cpu():
    a = torch.randn(3, 3)
    with autocast_factory(CPU)():
        assert (a @ a).dtype == torch.float32
