"""Nothing vitforge loads can run code, and every crafted or broken file is a one-line refusal (exit 2).

Crafted files: a plain pickle and a torch zip (`data.pkl`) whose unpickling would create a marker file, a checkpoint
with the right marker but missing keys, a safetensors file with a broken header, CIFAR batches holding a foreign
class. Each goes to every entry point that reads such a file (eval, predict, export, pseudo-label, report,
train --resume, model.pretrained, distill.teacher, ensemble members, the CIFAR source, the decode cache); the marker
never appears. Also: checkpoints that load but are not what they claim, format-1 checkpoints (numpy RNG state)
still resuming, bounded image decoding (pixel limit, truncated files) without warning noise or leaked global state.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

from vitforge.checkpoint import FORMAT, load_checkpoint
from vitforge.commands.cli import main
from vitforge.config import load_config
from vitforge.constants import DEFAULT_MAX_IMAGE_PIXELS
from vitforge.data.cache import decode_all, read_cache
from vitforge.data.dataset import open_data, readable_items
from vitforge.data.images import ImageError, open_image
from vitforge.data.sources import open_source
from vitforge.errors import ConfigError
from vitforge.models.build import build_model
from vitforge.models.pretrained import load_torch_file
from vitforge.train.trainer import Trainer, train

SRC = Path(__file__).resolve().parents[1] / "src" / "vitforge"
QUICK = ["train.device=cpu", "run.progress=none", "train.threads=1"]


EXPORT_CONFIG = {"format": "vitforge-export", "model_name": "vit_demo", "model_kwargs": {"num_classes": 10,
                                                                                         "img_size": 8},
                 "classes": [str(i) for i in range(10)], "preprocess": {"img_size": 8, "mean": [0.5] * 3,
                                                                         "std": [0.25] * 3}}


class Payload:
    """Unpickling this calls `open(marker, "w")`: the file appears if and only if a loader ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---- files ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny finished run (vit_demo on digits): checkpoints/best.pt and last.pt written by this version."""
    root = tmp_path_factory.mktemp("untrusted")
    return train(load_config(None, ["data.train=digits", "model.name=vit_demo", "data.img_size=8", "train.max_steps=2",
                                    "data.batch_size=64", "ema.enabled=true", f"run.dir={root}", "run.name=r",
                                    *QUICK]))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(folder / f"img{i}.png")
    return folder


def crafted(kind: str, folder: Path, marker: Path) -> Path:
    """One crafted file of `kind` in `folder`."""
    if kind == "pickle":  # a plain pickle.dump, as someone would hand over a `.pt`
        path = folder / "crafted_pickle.pt"
        path.write_bytes(pickle.dumps({"format": FORMAT, "version": 2, "model": Payload(marker)}))
    elif kind == "zip":  # the torch.save zip layout; its data.pkl calls io.open when unpickled
        path = folder / "crafted_zip.pt"
        torch.save({"format": FORMAT, "version": 2, "model": Payload(marker)}, path)
    elif kind == "missing_keys":  # the right marker, nothing else a checkpoint needs
        path = folder / "missing_keys.pt"
        torch.save({"format": FORMAT, "version": 2, "classes": ["0", "1"]}, path)
    elif kind == "safetensors_header":  # header length 40, then a JSON header cut short; a good config beside it
        path = folder / "broken.safetensors"
        path.write_bytes(struct.pack("<Q", 40) + b'{"w": {"dtype": "F32", "shape": [2], "da' + bytes(64))
        path.with_suffix(".json").write_text(json.dumps(EXPORT_CONFIG))
    else:
        raise AssertionError(kind)
    return path


def run_dir_with(ckpt: Path, folder: Path) -> Path:
    """A run directory whose best.pt and last.pt are `ckpt` (what `report` and `train --resume` read)."""
    run = folder / "planted_run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in ("best.pt", "last.pt"):
        shutil.copyfile(ckpt, run / "checkpoints" / name)
    return run


def entry_argv(entry: str, f: Path, tmp: Path, images: Path, good_run: Path) -> tuple[list[str], Path]:
    """The command line of `entry` reading `f`, and the path the error must name."""
    dry = ["data.train=digits", "data.img_size=8", "--dry-run", f"run.dir={tmp / 'runs'}", *QUICK]
    if entry in ("report", "resume"):
        run = run_dir_with(f, tmp)
        if entry == "report":
            return (["report", str(run), "--data", "digits", "--tta", "none", "--device", "cpu"],
                    run / "checkpoints/best.pt")
        return ["train", "--resume", str(run)], run / "checkpoints/last.pt"
    return {
        "eval": ["eval", str(f), "--data", "digits", "--device", "cpu"],
        "predict": ["predict", str(f), "--images", str(images), "--out", str(tmp / "p.csv"), "--device", "cpu"],
        "export": ["export", str(f), "--format", "safetensors", "--out", str(tmp / "m.safetensors")],
        "pseudo-label": ["pseudo-label", str(f), "--images", str(images), "--out", str(tmp / "pl.csv"),
                         "--device", "cpu"],
        "ensemble": ["eval", str(good_run), str(f), "--data", "digits", "--device", "cpu"],
        "pretrained": ["train", "model.name=vit_demo", f"model.pretrained={f}", *dry],
        "pretrained-timm": ["train", "model.name=timm:test_vit", f"model.pretrained={f}", *dry, "data.img_size=32"],
        "teacher": ["train", "model.name=vit_demo", f"distill.teacher={f}", *dry],
    }[entry], f


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitforge: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---- the crafted files are live: a naive loader runs them ---------------------------------------------------------
def test_the_crafted_files_run_code_when_loaded_naively(tmp_path):
    marker = tmp_path / "MARKER"
    pickle.loads(crafted("pickle", tmp_path, marker).read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(crafted("zip", tmp_path, marker), weights_only=False)
    assert marker.exists()


# ---- every checkpoint / weights entry point ----------------------------------------------------------------------
ENTRIES = ["eval", "predict", "export", "pseudo-label", "report", "resume", "pretrained", "pretrained-timm", "teacher",
           "ensemble"]
SAYS = {
    "pickle": r"not a readable (checkpoint|weights file) \(not a torch\.save file: ",
    "zip": r"refused to load: it needs the global io\.open; vitforge loads only tensors",
    "missing_keys": r"vitforge checkpoint without its 'model_name' field|its 'model' weights are a NoneType",
    "safetensors_header": r"not a readable (checkpoint|safetensors file) \(|not readable safetensors weights for "
                          r"vit_demo \(",
}


@pytest.mark.parametrize("kind", list(SAYS))
@pytest.mark.parametrize("entry", ENTRIES)
def test_crafted_file_is_a_one_line_refusal_everywhere(entry, kind, tmp_path, images, run, capsys):
    marker = tmp_path / "MARKER"
    f = crafted(kind, tmp_path, marker)
    argv, named = entry_argv(entry, f, tmp_path, images, run)
    capsys.readouterr()
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert str(named) in err and re.search(SAYS[kind], err), err
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "pl.csv").exists()  # nothing written


@pytest.mark.parametrize("kind", ["pickle", "zip"])
def test_crafted_checkpoint_in_a_fresh_process(kind, tmp_path):
    marker = tmp_path / "MARKER"
    f = crafted(kind, tmp_path, marker)
    r = subprocess.run([sys.executable, "-m", "vitforge", "eval", str(f), "--data", "digits", "--device", "cpu"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith(f"vitforge: error: {f}: ") and "\n" not in err, r.stderr
    assert not marker.exists()


# ---- checkpoints that load but are not what they claim --------------------------------------------------------------
def _mutated(src: Path, dst: Path, change) -> Path:
    ckpt = torch.load(src, weights_only=True)
    change(ckpt)
    torch.save(ckpt, dst)
    return dst


def _set(path: str, value):
    def change(ckpt):
        *parents, last = path.split(".")
        d = ckpt
        for p in parents:
            d = d[p]
        d[last] = value
    return change


def _int_weights(ckpt):
    k = next(iter(ckpt["model"]))
    ckpt["model"][k] = ckpt["model"][k].to(torch.int32)


def _wider_weights(ckpt):
    k = "head.weight"
    ckpt["model"][k] = torch.zeros(ckpt["model"][k].shape[0] + 1, ckpt["model"][k].shape[1])


CLAIMS = {
    "classes": (_set("classes", 5), "field 'classes' is a int, expected list"),
    "class names": (_set("classes", ["a", 3]), "field 'classes' must be a non-empty list of class names (holds a int)"),
    "unregistered model": (_set("model_name", "no_such_model"),
                           "cannot rebuild its model (model.name: unknown model 'no_such_model'"),
    "refused arguments": (_set("model_kwargs.bogus", 1),
                          "cannot rebuild its model (model 'vit_demo' does not take argument 'bogus')"),
    "constructor error": (_set("model_kwargs.num_heads", 5), "cannot rebuild its model (model 'vit_demo' cannot be "
                                                             "built with"),
    "other shapes": (_wider_weights, "does not fit model vit_demo: shape mismatch at head.weight: checkpoint (11, "),
    "other dtype": (_int_weights, "does not fit model vit_demo: dtype mismatch at "),
    "weights not tensors": (lambda c: c["model"].__setitem__("head.bias", [0.0] * 10),
                            "field 'model' entry 'head.bias' is a list, not a tensor"),
    "tensor in config": (_set("config.data.mean", torch.zeros(3)),
                         "field 'config' holds a Tensor at ['data']['mean'], not plain data"),
    "newer format": (_set("version", 99), "checkpoint format 99 is newer than this vitforge reads (2)"),
    "preprocess": (_set("preprocess.img_size", "big"), "field 'preprocess' has an invalid img_size: big"),
    "eval weights": (_set("eval_weights", "best"), "field 'eval_weights' is 'best', expected 'model' or 'ema'"),
}


@pytest.mark.parametrize("claim", list(CLAIMS))
@pytest.mark.parametrize("verb", ["eval", "export"])
def test_checkpoint_that_is_not_what_it_claims(claim, verb, run, tmp_path, capsys):
    change, says = CLAIMS[claim]
    f = _mutated(run / "checkpoints/best.pt", tmp_path / "claims.pt", change)
    argv = ["eval", str(f), "--data", "digits", "--device", "cpu"] if verb == "eval" else [
        "export", str(f), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]
    capsys.readouterr()
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"vitforge: error: {f}") and says in err, err
    assert not (tmp_path / "m.safetensors").exists()


RESUME_CLAIMS = {
    "optimizer": (_set("optimizer.param_groups", []), "last.pt: its optimizer state does not fit this run (ValueError"),
    "progress": (_set("progress.epoch", "3"), "last.pt: field 'progress' has epoch = '3', not a number"),
    "progress key": (_set("progress.lr", 1.0), "last.pt: field 'progress' has an unknown key 'lr'"),
    "rng": (_set("rng", [{"torch": torch.zeros(3)}]), "last.pt: its rng state does not fit this run ("),
    "ema": (_set("ema", {"module.x": torch.zeros(1)}), "last.pt (EMA weights) does not fit model ModelEma: missing"),
    "config": (_set("config.data.bogus", 1), "last.pt: its stored config is not valid here (data.bogus"),
    "model name": (_set("model_name", "vit_tiny"), "last.pt: its model_name 'vit_tiny' differs from its config's "
                                                   "model.name 'vit_demo'"),
    "no rng": (lambda c: c.pop("rng"), "last.pt: training state without its 'rng' field(s)"),
}


@pytest.mark.parametrize("claim", list(RESUME_CLAIMS))
def test_resume_from_a_last_pt_that_is_not_what_it_claims(claim, run, tmp_path, capsys):
    change, says = RESUME_CLAIMS[claim]
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.lock", "report"))
    _mutated(run / "checkpoints/last.pt", copy / "checkpoints/last.pt", change)
    before = (copy / "checkpoints/best.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(copy)]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"vitforge: error: {copy / 'checkpoints'}") and says in err, err
    assert (copy / "checkpoints/best.pt").read_bytes() == before  # nothing the user had is overwritten


def test_safetensors_weights_of_another_dtype_or_bad_dtype_code(tmp_path, capsys):
    model = build_model("vit_demo", {"num_classes": 10, "img_size": 8})
    state = {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "ints.safetensors"))
    bad = tmp_path / "code.safetensors"
    header = json.dumps({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    dry = ["train", "data.train=digits", "data.img_size=8", "--dry-run", f"run.dir={tmp_path}", *QUICK]
    for f, says in ((tmp_path / "ints.safetensors", "does not fit model vit_demo: dtype mismatch at "),
                    (bad, "not a readable safetensors file (")):
        capsys.readouterr()
        assert main([*dry, f"model.pretrained={f}"]) == 2
        err = one_line_error(capsys)
        assert f"model.pretrained: {f}" in err and says in err, err


@pytest.fixture(scope="module")
def export_folder(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", str(run), "--format", "folder", "--out", str(out)]) == 0
    return out


def _bad_int_weights(folder: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(torch.int32) if v.is_floating_point() else v for k, v in state.items()},
              str(folder / "model.safetensors"))


def _config(**change):
    def apply(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(change)
        (folder / "config.json").write_text(json.dumps(cfg))
    return apply


EXPORT_CLAIMS = {
    "arguments not a dict": (_config(model_kwargs=5), "config.json: field 'model_kwargs' is a int, expected dict"),
    "unregistered model": (_config(model_name="no_such_model"),
                           "config.json: cannot rebuild its model (model.name: unknown model 'no_such_model'"),
    "refused arguments": (_config(model_kwargs={"bogus": 1}),
                          "config.json: cannot rebuild its model (model 'vit_demo' does not take argument 'bogus')"),
    "class names": (_config(classes=[1, 2]), "config.json: field 'classes' must be a non-empty list of class names"),
    "preprocess": (_config(preprocess={"img_size": 8}), "config.json: field 'preprocess' lacks mean, std"),
    "not json": (lambda f: (f / "config.json").write_text("{"), "config.json: not a readable export config ("),
    "other dtype": (_bad_int_weights, "model.safetensors does not fit vit_demo: dtype mismatch at "),
    "broken header": (lambda f: (f / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{"),
                      "model.safetensors: not readable safetensors weights for vit_demo ("),
}


@pytest.mark.parametrize("claim", list(EXPORT_CLAIMS))
def test_exported_model_that_is_not_what_it_claims(claim, export_folder, tmp_path, capsys):
    change, says = EXPORT_CLAIMS[claim]
    folder = tmp_path / "model"
    shutil.copytree(export_folder, folder)
    change(folder)
    capsys.readouterr()
    assert main(["eval", str(folder), "--data", "digits", "--device", "cpu"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"vitforge: error: {folder}") and says in err, err


def test_an_onnx_file_that_is_not_one(tmp_path, capsys):
    f = tmp_path / "model.onnx"
    f.write_bytes(pickle.dumps({"model": Payload(tmp_path / "MARKER")}))
    capsys.readouterr()
    assert main(["eval", str(f), "--data", "digits", "--device", "cpu"]) == 2
    assert f"{f}: not a readable ONNX model (" in one_line_error(capsys) and not (tmp_path / "MARKER").exists()


# ---- checkpoints written by earlier vitforge (format 1) -------------------------------------------------------------
def test_new_checkpoints_hold_only_plain_data(run):
    for name in ("best.pt", "last.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(run / "checkpoints" / name)) == []
    ckpt = load_checkpoint(run, prefer="last")
    assert ckpt["version"] == 2 and type(ckpt["provenance"]["torch"]) is str
    name, keys, pos, has_gauss, gauss = ckpt["rng"][0]["numpy"]
    assert name == "MT19937" and keys.dtype == torch.int64 and keys.shape == (624,) and isinstance(pos, int)


def test_format_1_checkpoint_resumes_through_the_allow_list(run, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.lock", "report"))
    state = np.random.RandomState(7).get_state()  # what format 1 stored: the ndarray tuple, TorchVersion

    def to_format_1(ckpt):
        ckpt["version"] = 1
        ckpt["provenance"]["torch"] = torch.__version__
        ckpt["rng"] = [{"torch": torch.get_rng_state(), "numpy": state, "python": random.getstate()}]

    _mutated(run / "checkpoints/last.pt", copy / "checkpoints/last.pt", to_format_1)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(copy / "checkpoints/last.pt"))
    assert "numpy.ndarray" in unsafe and "torch.torch_version.TorchVersion" in unsafe  # really the old layout
    allowed = torch.serialization.get_safe_globals()
    Trainer(resume=copy)  # restores the numpy generator exactly
    assert np.array_equal(np.random.get_state()[1], state[1]) and np.random.get_state()[2] == state[2]
    # The allow-list is scoped to each load (torch keeps it as a set: its list order follows the classes' ids).
    assert set(torch.serialization.get_safe_globals()) == set(allowed)
    assert main(["train", "--resume", str(copy), "train.max_steps=3"]) == 0
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(copy / "checkpoints/last.pt")) == []


def test_the_allow_list_admits_numpy_arrays_but_nothing_else(tmp_path):
    torch.save({"a": np.arange(3, dtype=np.uint32)}, tmp_path / "np.pt")
    assert load_torch_file(tmp_path / "np.pt", "x")["a"].tolist() == [0, 1, 2]
    torch.save({"a": np.arange(3, dtype=np.uint32), "when": __import__("datetime").date(2020, 1, 1)},
               tmp_path / "date.pt")
    with pytest.raises(Exception, match=r"date.pt: refused to load: it needs the global datetime.date;"):
        load_torch_file(tmp_path / "date.pt", str(tmp_path / "date.pt"))


# ---- CIFAR python batches -------------------------------------------------------------------------------------------
def _write_cifar(root: Path, n: int = 4, protocol: int = 4, numpy1_names: bool = False) -> dict:
    """A CIFAR-10 python folder (5 train batches + test batch + meta); returns the arrays written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(range(n)),
             b"batch_label": name.encode()}
        raw = pickle.dumps(d, protocol=protocol)
        if numpy1_names:  # GLOBAL opcodes are "module\nname\n" text under protocol 2: the names numpy 1.x wrote
            raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        (root / name).write_bytes(raw)
        written[name] = d
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"k{i}".encode() for i in range(10)]},
                                                     protocol=protocol))
    return written


@pytest.mark.parametrize("protocol, numpy1", [(2, True), (2, False), (4, False), (5, False)])
def test_genuine_cifar_batches_read_under_every_pickle_protocol(protocol, numpy1, tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol, numpy1_names=numpy1)
    if numpy1:
        assert b"numpy.core.multiarray\n_reconstruct" in (tmp_path / "cifar-10-batches-py/data_batch_1").read_bytes()
    src = open_source(str(tmp_path))
    expect = written["data_batch_1"][b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(src.array()[:4], expect) and src.classes[9] == "k9" and len(src) == 20


FOREIGN = {
    "marker": (lambda m: {b"data": Payload(m), b"labels": [0]}, "it needs the global io.open"),
    "namespace": (lambda m: {b"data": __import__("argparse").Namespace(x=1), b"labels": [0]},
                  "it needs the global argparse.Namespace"),
    "object array": (lambda m: {b"data": np.array([1, "x"], dtype=object), b"labels": [0]},
                     "it holds a numpy object array"),
}


@pytest.mark.parametrize("payload", list(FOREIGN))
@pytest.mark.parametrize("entry", ["train", "eval", "named cifar10"])
def test_cifar_batch_with_a_foreign_class_is_refused(payload, entry, tmp_path, run, capsys):
    marker = tmp_path / "MARKER"
    make, says = FOREIGN[payload]
    cache = tmp_path / "cache"
    root = cache / "datasets" / "cifar-10-batches-py" if entry == "named cifar10" else tmp_path / "cifar"
    _write_cifar(root)
    (root / "data_batch_1").write_bytes(pickle.dumps(make(marker)))
    spec = "cifar10" if entry == "named cifar10" else str(root)
    argv = (["eval", str(run), "--data", spec, "--device", "cpu"] if entry == "eval" else
            ["train", f"data.train={spec}", f"data.cache_dir={cache}", "--dry-run", f"run.dir={tmp_path}", *QUICK])
    capsys.readouterr()
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert f"{root / 'data_batch_1'}: refused to read this CIFAR batch: {says}" in err, err
    assert not marker.exists()


def test_cifar_batch_that_is_not_images_and_labels(tmp_path):
    root = tmp_path / "cifar"
    _write_cifar(root)
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1]}))
    (root / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(Exception, match=r"data_batch_2: 3 images but 1 labels"):
        open_source(str(root))
    (root / "data_batch_2").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(Exception, match=r"data_batch_2: not a CIFAR batch \(a pickled list, not a dict\)"):
        open_source(str(root))
    shutil.copyfile(root / "data_batch_1", root / "data_batch_2")
    with pytest.raises(Exception, match=r"data_batch_3: not a readable CIFAR batch \("):
        open_source(str(root))


# ---- decode cache ----------------------------------------------------------------------------------------------------
def _plant(kind: str, path: Path, marker: Path) -> None:
    if kind in ("pickle", "zip", "safetensors_header"):
        shutil.copyfile(crafted(kind, path.parent.parent, marker), path)
    elif kind == "other key":  # a valid cache file of other data under this name
        save_file({"images": torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "keep": torch.zeros(1, dtype=torch.int64)},
                  str(path), metadata={"format": "vitforge-decode-cache", "key": "0" * 40, "bad": "[]"})
    else:  # the right header, wrong content
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            meta = json.loads(f.read(n))["__metadata__"]
        tensors = {"float images": {"images": torch.zeros(36, 3, 16, 16), "keep": torch.arange(36)},
                   "wrong items": {"images": torch.zeros(36, 3, 16, 16, dtype=torch.uint8),
                                   "keep": torch.arange(36) + 100}}[kind]
        save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("kind", ["pickle", "zip", "safetensors_header", "other key", "float images", "wrong items"])
def test_decode_cache_that_fails_its_check_is_rebuilt(kind, tmp_path, caplog):
    marker = tmp_path / "MARKER"
    data = make_image_folder(tmp_path / "train")  # 3 classes x 12 images of 16 px
    cache = tmp_path / "cache"
    first = decode_all(open_source(str(data)), None, cache)
    (path,) = (cache / "decoded").glob("*.safetensors")
    _plant(kind, path, marker)
    again = decode_all(open_source(str(data)), None, cache)
    assert torch.equal(again.images, first.images) and np.array_equal(again.keep, first.keep)
    assert f"decode cache {path} failed its check" in caplog.text
    assert not marker.exists()
    key = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])["__metadata__"]["key"]
    assert torch.equal(read_cache(path, key, None, np.arange(36)).images, first.images)  # replaced by a good file


# ---- bounded image decoding ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 10000 x 9000 PNG of 11 kB: 90 M pixels, over PIL's own limit (which would print a warning)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (10000, 9000)).save(path)
    return path


def test_an_image_over_the_limit_is_refused_before_decoding_without_warnings(bomb, recwarn):
    with pytest.raises(ImageError, match=re.escape(f"{bomb}: 10000x9000 = 90,000,000 pixels declared, over the limit "
                                                   f"of {DEFAULT_MAX_IMAGE_PIXELS:,} (decompression-bomb guard)")):
        open_image(str(bomb))
    with pytest.raises(ImageError, match="upload.png: 10000x9000 = 90,000,000 pixels declared, over the limit of "
                                         "1,000,000"):
        open_image(bomb.read_bytes(), name="upload.png", max_pixels=1_000_000)  # the bytes path (serve)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_predict_skips_and_names_an_oversized_image_without_warning_noise(bomb, images, run, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    shutil.copyfile(bomb, folder / "bomb.png")
    r = subprocess.run([sys.executable, "-m", "vitforge", "predict", str(run), "--images", str(folder), "--out",
                        str(tmp_path / "p.csv"), "--device", "cpu"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 3 predictions" in r.stdout and "1 unreadable image(s) skipped" in r.stdout
    assert "bomb.png: 10000x9000 = 90,000,000 pixels declared, over the limit of 89,478,485" in r.stdout
    assert "DecompressionBomb" not in r.stderr and "Warning" not in r.stderr, r.stderr


def test_the_pixel_limit_is_a_config_key(tmp_path):
    data = make_image_folder(tmp_path / "train", per_class=4)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(data / "cat" / "big.png")
    cfg = load_config(None, [f"data.train={data}", "data.max_image_pixels=300", "data.val_split=0"]).data
    opened = open_data(cfg)
    dec = decode_all(opened.train.source, None, tmp_path / "cache", opened.train.indices)
    assert len(dec.keep) == 12 and dec.bad == [f"{data / 'cat' / 'big.png'}: 32x32 = 1,024 pixels declared, over the "
                                               f"limit of 300 (decompression-bomb guard)"]
    _, bad = readable_items(opened.train)  # the large-image (DataLoader) path skips it by its header
    assert bad == dec.bad
    roomy = decode_all(open_data(load_config(None, [f"data.train={data}", "data.val_split=0"]).data).train.source,
                       None, tmp_path / "cache")
    assert len(roomy.keep) == 13  # another limit, another cache entry
    with pytest.raises(ConfigError, match="data.max_image_pixels: must be >= 1"):
        load_config(None, ["data.max_image_pixels=0"])


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_a_truncated_image_is_reported_never_half_decoded(ext, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / f"cut.{ext}"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) * 6 // 10])
    with pytest.raises(ImageError, match=rf"cut.{ext}: cannot decode image \("):
        open_image(str(path))
    folder = tmp_path / "f" / "a"
    folder.mkdir(parents=True)
    shutil.copyfile(path, folder / f"cut.{ext}")
    Image.new("RGB", (64, 64)).save(folder / "ok.png")
    dec = decode_all(open_source(str(tmp_path / "f")), None, None)
    assert len(dec.keep) == 1 and dec.bad[0].startswith(f"{folder / f'cut.{ext}'}: cannot decode image")


def test_decoding_leaves_no_global_state_behind(tmp_path, bomb):
    data = make_image_folder(tmp_path / "train", per_class=20)
    shutil.copyfile(bomb, data / "cat" / "bomb.png")
    (data / "dog" / "junk.png").write_bytes(b"not an image")
    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    dec = decode_all(open_source(str(data)), 16, None)  # 8 decode threads
    assert len(dec.keep) == 60 and len(dec.bad) == 2
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == limit
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    setters = [p for p in SRC.rglob("*.py")
               if re.search(r"(LOAD_TRUNCATED_IMAGES|Image\.MAX_IMAGE_PIXELS)\s*=(?!=)", p.read_text())]
    assert setters == []


def test_no_unrestricted_loader_is_left_in_src():
    """Every torch.load passes weights_only=True, no bare pickle.load/loads, np.load only with allow_pickle=False,
    no yaml.load (recipes go through OmegaConf's safe loader)."""
    for p in SRC.rglob("*.py"):
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), (p, m.group(0))
        assert not re.search(r"pickle\.loads?\(|yaml\.(unsafe_)?load\(|weights_only=False", text), p
        for m in re.finditer(r"np\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in m.group(1), (p, m.group(0))
