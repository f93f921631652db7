"""Data layer: sources chosen by path, image modes, corrupt files, splits, decode cache, epoch plans, batch aug."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from vitforge.config import load_config
from vitforge.data import augment as A
from vitforge.data.cache import decode_all
from vitforge.data.dataset import open_data
from vitforge.data.images import ImageError, open_image, to_rgb
from vitforge.data.loader import epoch_plan
from vitforge.data.sources import ArraySource, FileListSource, ParquetSource, open_source
from vitforge.data.split import stratified_folds, stratified_split
from vitforge.errors import DataError


# ---- image modes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new("RGB", (5, 4), (200, 100, 50)).convert(mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":
        img = Image.frombytes("I;16", (5, 4), np.full((4, 5), 65535, dtype="<u2").tobytes())
    elif mode in ("I", "F"):
        img = Image.fromarray(np.full((4, 5), 40000, dtype=np.int32 if mode == "I" else np.float32))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 4)
    if mode == "I":
        assert np.asarray(out).max() == round(40000 / 257)  # 16-bit ranges are rescaled, not clipped
    if mode == "I;16":
        assert np.asarray(out)[0, 0, 0] == 255


def test_transparency_composited_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # fully transparent black
    out = np.asarray(to_rgb(Image.fromarray(rgba, mode="RGBA")))
    assert (out == 255).all()
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert (np.asarray(to_rgb(p)) == 255).all()


def test_corrupt_and_missing_images_are_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg: cannot decode image"):
        open_image(str(bad))
    with pytest.raises(ImageError, match="gone.png: file not found"):
        open_image(str(tmp_path / "gone.png"))


# ---- sources ---------------------------------------------------------------------------------------------------------
def _write_parquet(path, n=12, with_names=True):
    rows, labels = [], []
    for i in range(n):
        buf = __import__("io").BytesIO()
        Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(buf, format="JPEG")
        rows.append({"bytes": buf.getvalue(), "path": f"c{i % 3}/{i}.jpg"})
        labels.append(i % 3)
    table = pa.table({"img": rows, "label": labels})
    if with_names:
        meta = {"info": {"features": {"img": {"_type": "Image"},
                                      "label": {"names": ["red", "green", "blue"], "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    pq.write_table(table, path)
    return path


def test_parquet_source(tmp_path):
    src = open_source(str(_write_parquet(tmp_path / "d.parquet")))
    assert isinstance(src, ParquetSource)
    assert src.classes == ["red", "green", "blue"] and len(src) == 12 and src.labeled
    assert src.load(0).mode == "RGB" and src.ids[1] == "c1/1.jpg"
    nameless = open_source(str(_write_parquet(tmp_path / "e.parquet", with_names=False)))
    assert nameless.classes == ["0", "1", "2"]


def test_real_cifar_parquet(cifar_parquet):
    src = open_source(str(cifar_parquet))
    assert len(src) == 50000 and src.classes[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(src.labels).tolist() == [5000] * 10
    assert src.load(123).size == (32, 32)


def test_image_folder_csv_and_flat_folder(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=3)
    src = open_source(str(root))
    assert isinstance(src, FileListSource) and src.classes == ["cat", "dog", "fox"] and len(src) == 9
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,label\ntrain/cat/000.png,cat\ntrain/fox/001.png,fox\n")
    c = open_source(str(csv_path))
    assert c.classes == ["cat", "fox"] and c.labels.tolist() == [0, 1] and c.load(1).size == (16, 16)
    flat = tmp_path / "test"
    flat.mkdir()
    for i in range(3):
        Image.new("L", (9, 9)).save(flat / f"x{i}.png")
    with pytest.raises(DataError, match="images without class sub-folders"):
        open_source(str(flat))
    unl = open_source(str(flat), labeled=False)
    assert not unl.labeled and unl.ids == ["x0.png", "x1.png", "x2.png"]


def test_cifar_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"k{i}".encode() for i in range(10)]}, f)  # Python 3 pickles: bytes names
    train = open_source(str(tmp_path))
    test = open_source(f"{root}:test")
    assert isinstance(train, ArraySource) and len(train) == 20 and len(test) == 4
    assert train.classes[3] == "k3" and train.array().shape == (20, 32, 32, 3)
    with pytest.raises(DataError, match=r":bogus: unknown split 'bogus'; CIFAR batches and names take :train or :test"):
        open_source(f"{root}:bogus")


def test_a_split_suffix_on_other_sources_is_refused(tmp_path):
    folder = make_image_folder(tmp_path / "train", per_class=2)
    with pytest.raises(DataError, match=r"train:test: a :test split only applies to CIFAR batch folders and names"):
        open_source(f"{folder}:test")
    with pytest.raises(DataError, match="digits has no test split"):
        open_source("digits:test")


def test_csv_label_problems_name_the_row(tmp_path):
    make_image_folder(tmp_path / "train", per_class=2)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\ntrain/cat/000.png,1\ntrain/dog/001.png,-1\n")
    with pytest.raises(DataError, match=r"bad.csv: row 3 \(train/dog/001.png\) has label -1; class indices are >= 0"):
        open_source(str(bad))
    bad.write_text("file,label\ntrain/cat/000.png,cat\ntrain/dog/001.png,\n")
    with pytest.raises(DataError, match=r"bad.csv: row 3 \(train/dog/001.png\) has an empty 'label'"):
        open_source(str(bad))


def test_digits_source():
    d = open_source("digits")
    assert len(d) == 1797 and d.array().shape == (1797, 8, 8, 3) and d.array().max() == 255


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "data path not found"),
        (lambda p: p.mkdir(), "empty directory"),
        (lambda p: (p / "cat").mkdir(parents=True), "class folder .*cat contains no images"),
    ],
)
def test_bad_paths(tmp_path, setup, message):
    target = tmp_path / "d"
    setup(target)
    with pytest.raises(DataError, match=message):
        open_source(str(target))


def test_unsupported_file_and_unnamed_cifar(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        open_source(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="data.download=true"):
        open_source("cifar10", cache_dir=tmp_path)


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=4)
    (root / "dog" / "zz_bad.png").write_bytes(b"garbage")
    src = open_source(str(root))
    dec = decode_all(src, None, tmp_path / "cache")
    assert len(dec.keep) == 12 and len(dec.bad) == 1 and "zz_bad.png" in dec.bad[0]


def test_zero_usable_images_is_an_error(tmp_path):
    root = tmp_path / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "x.png").write_bytes(b"not an image")
    cfg = load_config(None, [f"data.train={root}", "data.val_split=0"])
    with pytest.raises(DataError, match="no decodable images"):
        from vitforge.train.trainer import Trainer

        Trainer(cfg)


def test_class_mismatch_with_explicit_val(tmp_path):
    train = make_image_folder(tmp_path / "train", classes=("cat", "dog"), per_class=3)
    val = make_image_folder(tmp_path / "val", classes=("cat", "cow"), per_class=2)
    cfg = load_config(None, [f"data.train={train}", f"data.val={val}"])
    with pytest.raises(DataError, match="classes not in the training set: cow"):
        open_data(cfg.data)
    reordered = make_image_folder(tmp_path / "val2", classes=("dog",), per_class=2)
    d = open_data(load_config(None, [f"data.train={train}", f"data.val={reordered}"]).data)
    assert d.val.labels.tolist() == [1, 1]  # mapped by name onto the training classes


# ---- splits, cache, plans --------------------------------------------------------------------------------------------
def test_stratified_split_is_fixed_and_proportional():
    labels = np.repeat(np.arange(5), 40)
    tr, va = stratified_split(labels, 0.2, seed=3, classes=[str(i) for i in range(5)])
    tr2, va2 = stratified_split(labels, 0.2, seed=3, classes=[str(i) for i in range(5)])
    assert np.array_equal(va, va2) and len(va) == 40 and np.bincount(labels[va]).tolist() == [8] * 5
    assert not set(tr) & set(va) and len(tr) + len(va) == 200
    _, va_count = stratified_split(labels, 10, seed=0, classes=[str(i) for i in range(5)])
    assert len(va_count) == 10
    folds = stratified_folds(labels, 4, seed=0, classes=[str(i) for i in range(5)])
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(200))
    with pytest.raises(DataError, match="fewer than 2 images"):
        stratified_split(np.array([0, 0, 1]), 0.5, seed=0, classes=["a", "b"])


def test_decode_cache_reuse_and_invalidation(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=2)
    cache = tmp_path / "cache"
    first = decode_all(open_source(str(root)), None, cache)
    files = list((cache / "decoded").glob("*.safetensors"))
    assert len(files) == 1
    again = decode_all(open_source(str(root)), None, cache)
    assert torch.equal(first.images, again.images)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "cat" / "999.png")  # the dataset changed
    third = decode_all(open_source(str(root)), None, cache)
    assert len(third.keep) == len(first.keep) + 1 and len(list((cache / "decoded").glob("*.safetensors"))) == 2


def test_epoch_plan_repeats_ranks_and_determinism():
    n = 50
    p = epoch_plan(n, epoch=2, seed=1, shuffle=True, repeats=3)
    assert len(p) == 150 and np.bincount(p, minlength=n).tolist() == [3] * n
    assert np.array_equal(p, epoch_plan(n, epoch=2, seed=1, shuffle=True, repeats=3))
    assert not np.array_equal(p, epoch_plan(n, epoch=3, seed=1, shuffle=True, repeats=3))
    r0 = epoch_plan(n, epoch=0, seed=1, shuffle=True, rank=0, world=2)
    r1 = epoch_plan(n, epoch=0, seed=1, shuffle=True, rank=1, world=2)
    assert len(r0) == len(r1) == 25 and sorted(np.concatenate([r0, r1]).tolist()) == list(range(n))
    ev = [epoch_plan(7, epoch=0, seed=0, shuffle=False, rank=r, world=3) for r in range(3)]
    assert sorted(np.concatenate(ev).tolist()) == list(range(7))
    w = np.where(np.arange(n) < 5, 9.0, 1.0)
    drawn = epoch_plan(n, epoch=0, seed=0, shuffle=True, weights=w, repeats=40)
    assert np.isin(drawn, np.arange(5)).mean() > 0.35  # 5 heavy items hold 45/90 of the mass


# ---- batch augmentation ----------------------------------------------------------------------------------------------
def test_batch_crop_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    out = A.batch_crop(x, 2, A.step_generator(torch.device("cpu"), 0, 0, 0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(padded[b, :, dy:dy + 6, dx:dx + 6], out[b])]
        assert found, "crop is not a 6x6 window of the zero-padded image"


def test_flip_erase_and_determinism():
    x = torch.randn(64, 3, 8, 8)
    g = lambda: A.step_generator(torch.device("cpu"), 5, 1, 2)  # noqa: E731
    f = A.batch_flip(x, g())
    flipped = (f == x.flip(-1)).flatten(1).all(1)
    kept = (f == x).flatten(1).all(1)
    assert (flipped | kept).all() and 10 < flipped.sum() < 54
    assert torch.equal(A.batch_flip(x, g()), f)  # same keys, same flips
    e = A.batch_erase(x, 1.0, g())
    changed = (e != x).flatten(1).float().mean(1)
    assert (changed > 0).all() and (changed < 0.5).all()
    assert torch.equal(A.batch_erase(x, 0.0, g()), x)


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_targets_are_distributions(mixup, cutmix):
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 4
    rng = np.random.default_rng(0)
    xm, t = A.mix_batch(x, y, num_classes=4, smoothing=0.1, mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0,
                        switch_prob=0.5, rng=rng)
    assert xm.shape == x.shape and t.shape == (8, 4)
    assert torch.allclose(t.sum(1), torch.ones(8)) and (t > 0).all()
    if cutmix and not mixup:  # pasted area and label weight agree (lam corrected to the box)
        frac = (xm != x).float().mean().item()
        own = t[torch.arange(8), y] - 0.1 / 4
        assert abs((1 - own.mean().item() / 0.9) - frac) < 0.1


def test_extra_data_only_trains_and_keeps_the_split(tmp_path):
    train = make_image_folder(tmp_path / "train", classes=("cat", "dog"), per_class=10)
    extra = tmp_path / "pseudo.csv"
    extra.write_text("file,label\n" + "".join(f"train/dog/{i:03d}.png,dog\n" for i in range(4)))
    plain = open_data(load_config(None, [f"data.train={train}", "data.val_split=0.2"]).data)
    more = open_data(load_config(None, [f"data.train={train}", "data.val_split=0.2", f"data.extra={extra}"]).data)
    assert np.array_equal(plain.val.indices, more.val.indices)  # same held-out images with or without extra
    assert len(more.train) == len(plain.train) + 4 and (more.train.indices >= 20).sum() == 4
    assert (more.val.indices < 20).all()


def test_fingerprint_is_stable_across_processes(tmp_path):
    import subprocess
    import sys

    root = make_image_folder(tmp_path / "train", per_class=2)
    code = f"from vitforge.data.sources import open_source; print(open_source({str(root)!r}).fingerprint())"
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout for _ in range(2)}
    assert len(prints) == 1 and prints.pop().strip()


def test_worker_datasets_pickle_for_spawned_workers(tmp_path):
    import pickle

    from vitforge.data.preprocess import Preprocess
    from vitforge.data.streams import StreamOptions, build_eval_stream, build_train_stream

    root = make_image_folder(tmp_path / "train", per_class=4, size=80)  # > 64 px: the worker path
    cfg = load_config(None, [f"data.train={root}", "data.img_size=32", "data.val_split=0.25"])
    d = open_data(cfg.data)
    pre = Preprocess(32, [0.5] * 3, [0.5] * 3)
    opt = StreamOptions(batch_size=4, device=torch.device("cpu"), num_workers=0)
    for stream in (build_train_stream(d.train, pre, cfg.data, opt, num_classes=3), build_eval_stream(d.val, pre, opt)):
        ds = pickle.loads(pickle.dumps(stream.loader.dataset))
        x, y, i, ok = ds[(0, 0, 123)]
        assert ok and x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_small_and_large_parts_do_not_share_the_small_image_path(tmp_path):
    from vitforge.data.decoded import is_small

    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        Image.new("RGB", (400, 300), (i * 50, 0, 0)).save(big / f"{i}.jpg")
    csv_path = tmp_path / "extra.csv"
    csv_path.write_text("file,label\n" + "".join(f"big/{i}.jpg,{i}\n" for i in range(3)))
    d = open_data(load_config(None, ["data.train=digits", f"data.extra={csv_path}"]).data)
    assert not is_small(d.train.source)
    assert is_small(open_data(load_config(None, ["data.train=digits"]).data).train.source)


def test_unlabeled_extra_or_val_is_an_error(tmp_path):
    flat = tmp_path / "unl"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    csv_path = tmp_path / "nolabel.csv"
    csv_path.write_text("file\nunl/a.png\n")
    with pytest.raises(DataError, match="data.extra .*nolabel.csv has no labels"):
        open_data(load_config(None, ["data.train=digits", f"data.extra={csv_path}"]).data)
