"""Checkpoints: self-describing (config, classes, preprocessing, model name and arguments), written atomically.

A checkpoint alone rebuilds its model and preprocessing: `load_model(path)`.

A checkpoint holds only data: tensors, numbers, strings, lists, tuples and dicts (the config as a plain dict, RNG
states as tensors and lists). It is read with `torch.load(weights_only=True)` (`vitforge.models.pretrained.
load_torch_file`), so a crafted file cannot run code, and then checked field by field, so a file that loads but is
not what it claims is a one-line `CheckpointError` naming the file and the field, never a KeyError or traceback.

Checkpoints of format 1 (earlier vitforge) kept numpy's RNG state as an ndarray and torch's version as a
`TorchVersion`: they load through the explicit allow-list `TORCH_SAFE_GLOBALS` (data-only types, nothing else), so
runs started before keep resuming without any conversion step.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vitforge.config import Config, from_dict
from vitforge.data.preprocess import Preprocess
from vitforge.errors import CheckpointError, VitforgeError, first_line
from vitforge.models.build import build_model
from vitforge.models.pretrained import (
    CHECKPOINT_FORMAT,
    eval_state_dict,
    load_state_strict,
    load_torch_file,
    tensor_dict,
)
from vitforge.version import __version__

FORMAT = CHECKPOINT_FORMAT
VERSION = 2  # 2: plain data only (RNG states as tensors/lists, versions as str); 1: numpy arrays in the RNG state
NoneType = type(None)
# Every field a checkpoint may hold: (accepted types, required). best.pt and last.pt share the first seven.
FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "version": ((int,), True),
    "model_name": ((str,), True),
    "model_kwargs": ((dict,), True),
    "classes": ((list,), True),
    "preprocess": ((dict,), True),
    "config": ((dict,), True),
    "model": ((dict,), True),
    "eval_weights": ((str,), False),
    "ema": ((dict, NoneType), False),
    "optimizer": ((dict,), False),
    "scaler": ((dict, NoneType), False),
    "progress": ((dict,), False),
    "rng": ((dict, list), False),
    "budget": ((dict, NoneType), False),
    "metrics": ((dict, NoneType), False),
    "provenance": ((dict,), False),
}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    return {"vitforge": __version__, "torch": str(torch.__version__), "git": git_sha(),
            "saved": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` to `path` through a temporary file + rename: an interrupted save never destroys the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, "version": VERSION, "provenance": provenance(), **payload}, tmp)
    os.replace(tmp, path)


def resolve(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run directory (-> checkpoints/best.pt, else last.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (f"{prefer}.pt", "best.pt", "last.pt"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
        raise CheckpointError(f"{p}: no checkpoints/best.pt or checkpoints/last.pt (is this a vitforge run directory?)")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path, prefer: str = "best") -> dict:
    """Read a vitforge checkpoint onto the CPU and check its fields (`FIELDS`).

    Raises:
        CheckpointError: one line naming the file: not found, refused (it would run code or build a class),
            unreadable, not a vitforge checkpoint, or a field that is missing or of the wrong type.
    """
    p = resolve(path, prefer)
    ckpt = load_torch_file(p, str(p), what="checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a vitforge checkpoint (no '{FORMAT}' marker); for plain weights use "
                              f"model.pretrained={p}")
    check_fields(ckpt, str(p))
    ckpt["path"] = str(p)
    return ckpt


def check_fields(ckpt: dict, label: str) -> None:
    """Raise a `CheckpointError` starting with `label` for the first field that is missing or not what it claims."""
    for key, (types, required) in FIELDS.items():
        if key not in ckpt:
            if required:
                raise CheckpointError(f"{label}: vitforge checkpoint without its {key!r} field (damaged or crafted)")
            continue
        if not isinstance(ckpt[key], types) or isinstance(ckpt[key], bool) and bool not in types:
            want = " or ".join("None" if t is NoneType else t.__name__ for t in types)
            raise CheckpointError(f"{label}: field {key!r} is a {type(ckpt[key]).__name__}, expected {want}")
    if ckpt["version"] > VERSION:
        raise CheckpointError(f"{label}: checkpoint format {ckpt['version']} is newer than this vitforge reads "
                              f"({VERSION}); upgrade vitforge")
    check_model_fields(ckpt, label)
    for key in ("config", "metrics", "provenance"):
        where = _not_plain(ckpt.get(key))
        if where is not None:
            raise CheckpointError(f"{label}: field {key!r} holds {where}, not plain data (str, number, list, dict)")
    tensor_dict(ckpt["model"], label, "field 'model'")
    if ckpt.get("ema") is not None:
        tensor_dict(ckpt["ema"], label, "field 'ema'")
    if ckpt.get("eval_weights", "model") not in ("model", "ema"):
        raise CheckpointError(f"{label}: field 'eval_weights' is {ckpt['eval_weights']!r}, expected 'model' or 'ema'")


def check_model_fields(d: dict, label: str) -> None:
    """The fields that rebuild a model and its inputs, in a checkpoint or an export config: `model_name` (a
    non-empty str), `model_kwargs` (a dict of plain data), `classes` (a non-empty list of str) and `preprocess`
    (`Preprocess` fields of the right types). Raises a `CheckpointError` starting with `label`."""
    for key, kind in (("model_name", str), ("model_kwargs", dict), ("classes", list), ("preprocess", dict)):
        if not isinstance(d.get(key), kind):
            raise CheckpointError(f"{label}: field {key!r} is a {type(d.get(key)).__name__}, expected {kind.__name__}")
    if not d["model_name"]:
        raise CheckpointError(f"{label}: field 'model_name' is empty")
    for key in ("model_kwargs", "preprocess"):
        where = _not_plain(d[key])
        if where is not None:
            raise CheckpointError(f"{label}: field {key!r} holds {where}, not plain data (str, number, list, dict)")
    bad = next((c for c in d["classes"] if not isinstance(c, str)), None)
    if not d["classes"] or bad is not None:
        raise CheckpointError(f"{label}: field 'classes' must be a non-empty list of class names"
                              + (f" (holds a {type(bad).__name__})" if bad is not None else ""))
    _check_preprocess(d["preprocess"], label)


def _not_plain(obj: Any, path: str = "", depth: int = 0) -> str | None:
    """None when `obj` is JSON-like data (dicts with str keys, lists, tuples, str, numbers, bool, None), else where
    and what the first other thing is, e.g. "a Tensor at ['data']['mean']"."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return None
    if depth > 32:
        return f"nesting deeper than 32 levels at {path or 'the top'}"
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"a {type(k).__name__} key at {path or 'the top'}"
            found = _not_plain(v, f"{path}[{k[:40]!r}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        return next((f for i, v in enumerate(obj) if (f := _not_plain(v, f"{path}[{i}]", depth + 1))), None)
    return f"a {type(obj).__name__} at {path or 'the top'}"


def _check_preprocess(pre: dict, label: str) -> None:
    names = {f.name for f in fields(Preprocess)}
    unknown = sorted(str(k) for k in pre if k not in names)
    missing = sorted(n for n in ("img_size", "mean", "std") if n not in pre)
    if unknown or missing:
        raise CheckpointError(f"{label}: field 'preprocess' " + (f"has unknown key(s) {', '.join(unknown)}" if unknown
                                                                 else f"lacks {', '.join(missing)}"))
    checks = {
        "img_size": isinstance(pre["img_size"], int) and not isinstance(pre["img_size"], bool) and pre["img_size"] > 0,
        "mean": _numbers(pre["mean"]),
        "std": _numbers(pre["std"]) and all(v > 0 for v in pre["std"]) and len(pre["std"]) == len(pre["mean"]),
        "interpolation": isinstance(pre.get("interpolation", ""), str),
        "crop_pct": _numbers([pre.get("crop_pct", 1.0)]) and 0 < pre.get("crop_pct", 1.0) <= 1,
        "kind": pre.get("kind", "image") in ("image", "features"),
    }
    bad = next((k for k, ok in checks.items() if not ok), None)
    if bad is not None:
        raise CheckpointError(f"{label}: field 'preprocess' has an invalid {bad}: {str(pre.get(bad))[:80]}")


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def checkpoint_model(ckpt: dict) -> nn.Module:
    """The (randomly initialised) model a checked checkpoint describes (see `rebuild_model`)."""
    return rebuild_model(ckpt["model_name"], ckpt["model_kwargs"], ckpt["path"])


def rebuild_model(name: str, kwargs: dict, label: str) -> nn.Module:
    """`build_model(name, kwargs)` for a name and arguments read from a file: a model this vitforge does not know, or
    arguments its constructor refuses, are a `CheckpointError` starting with `label` (the file)."""
    try:
        return build_model(name, kwargs)
    except VitforgeError as e:
        raise CheckpointError(f"{label}: cannot rebuild its model ({first_line(e, 240)})") from None
    except Exception as e:  # a constructor given arguments it never expected may raise anything
        raise CheckpointError(f"{label}: cannot rebuild its model {name!r} from the stored arguments "
                              f"({type(e).__name__}: {first_line(e, 200)})") from None


def checkpoint_config(ckpt: dict) -> Config:
    """The run configuration stored in a checkpoint; one this vitforge cannot read is a `CheckpointError`."""
    try:
        return from_dict(ckpt["config"])
    except VitforgeError as e:
        raise CheckpointError(f"{ckpt['path']}: its stored config is not valid here ({first_line(e, 240)})") from None


def load_model(path: str | Path, *, device: str | torch.device = "cpu", weights: str = "eval", prefer: str = "best"):
    """Rebuild the model of a checkpoint (or run directory) with its weights, in eval mode.

    Args:
        path: checkpoint file or run directory.
        device: where to put the model.
        weights: "eval" (EMA if the run evaluated with it) or "raw".
        prefer: which file of a run directory: "best" or "last".

    Returns:
        (model, meta) with meta = {"classes", "preprocess", "config", "model_name", "model_kwargs", "path", ...}.
    """
    ckpt = load_checkpoint(path, prefer)
    model = checkpoint_model(ckpt)
    state = eval_state_dict(ckpt) if weights == "eval" else ckpt["model"]
    load_state_strict(model, state, ckpt["path"])
    model.to(device).eval()
    meta = {k: ckpt.get(k) for k in ("classes", "preprocess", "config", "model_name", "model_kwargs", "path",
                                     "metrics", "provenance", "progress")}
    return model, meta
