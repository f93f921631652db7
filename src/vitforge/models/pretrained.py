"""Initial weights from a local file: a vitforge checkpoint, safetensors, or a torch state dict (.pth/.bin/.pt).

The classifier may differ (a new dataset has other classes): head tensors whose shape does not match are left at
their fresh initialisation and reported. Every other mismatch is an error naming the file and the keys, because
weights of a different architecture would otherwise load "successfully" and train from garbage.

Nothing read here can run code: safetensors files hold raw tensors only, and every torch file goes through
`load_torch_file` (`torch.load(weights_only=True)`, PyTorch's restricted unpickler: tensors, numbers, strings,
lists, tuples and dicts, plus the few data-only types of `TORCH_SAFE_GLOBALS`).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.torch_version import TorchVersion

from vitforge.errors import CheckpointError, first_line

log = logging.getLogger("vitforge")
HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.", "head.fc.")
CHECKPOINT_FORMAT = "vitforge-checkpoint"  # the marker `vitforge.checkpoint` writes into every checkpoint
STATE_KEYS = ("state_dict", "model", "model_state_dict", "module")  # where weights files keep their tensors

_NP_RECONSTRUCT = np.zeros(0).__reduce_ex__(2)[0]  # the function numpy's ndarray pickles call (numpy._core...)

# The one allow-list of globals `torch.load(weights_only=True)` may meet in a vitforge read, beyond PyTorch's own
# (tensors, storages, OrderedDict, primitives). Each entry rebuilds plain data and reaches no other callable:
TORCH_SAFE_GLOBALS: list = [
    # numpy arrays: last.pt of vitforge before checkpoint format 2 kept numpy's MT19937 RNG state (624 uint32 keys)
    # as an ndarray. `_reconstruct(ndarray, shape, dtype)` allocates an empty array that `ndarray.__setstate__` fills
    # from raw bytes. Only uint32 arrays build at all: setting a dtype's state needs the dtype's own class allowed,
    # and UInt32DType is the only one listed (so no object arrays, whose items could be anything).
    _NP_RECONSTRUCT,
    (_NP_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),  # the name numpy 1.x wrote into its pickles
    np.ndarray,
    np.dtype,  # np.dtype("u4", False, True): a dtype from its type code
    type(np.dtype(np.uint32)),  # numpy >= 1.20 pickles rebuild the dtype as its own class (UInt32DType)
    # TorchVersion: a `str` subclass; earlier checkpoints stored torch.__version__ itself in their provenance.
    TorchVersion,
    # argparse.Namespace: timm's and DeiT's training scripts store their command line in checkpoints (timm's own
    # loader allows it too); it is rebuilt empty and its attributes set from a dict of plain values.
    argparse.Namespace,
]


def load_torch_file(path: str | Path, label: str, *, what: str = "torch file", map_location: str = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with `TORCH_SAFE_GLOBALS` allowed for this call only.

    Args:
        path: a file written by `torch.save` (zip or legacy format).
        label: how errors name the file, e.g. the path or "model.pretrained: <path>".
        what: what the file should be, for the error message ("checkpoint", "weights file").

    Raises:
        CheckpointError: one line naming `label` and the problem: a global outside the allow-list (a pickle that
            would run code or build a class), or a file that is not a readable torch file.
    """
    if not zipfile.is_zipfile(path) and not _is_legacy_torch_file(path):
        raise CheckpointError(f"{label}: not a readable {what} (not a torch.save file: neither its zip layout nor "
                              f"its legacy header)")
    allowed = torch.serialization.get_safe_globals()
    added = [g for g in TORCH_SAFE_GLOBALS if g not in allowed]  # leave entries the caller registered in place
    try:
        with torch.serialization.safe_globals(added), warnings.catch_warnings():
            # torch warns (on stderr) about pickle protocols above 2 in a crafted file before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler refused something
        raise CheckpointError(f"{label}: refused to load: {_refusal(e)}; vitforge loads only tensors, numbers, "
                              f"strings, lists and dicts from a torch file and never runs code from it") from None
    except Exception as e:  # zip, storage and legacy-format errors come in many types
        raise CheckpointError(f"{label}: not a readable {what} ({first_line(e, 120)})") from None


# torch.save's legacy (pre-1.6, non-zip) format starts with pickle protocol 2 and torch's magic number
# (torch/serialization.py: MAGIC_NUMBER = 0x1950a86a20f9469cfc6c, saved as a 10-byte LONG1).
_LEGACY_TORCH_HEADER = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_legacy_torch_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_TORCH_HEADER)) == _LEGACY_TORCH_HEADER


def _refusal(e: Exception) -> str:
    """The useful line of PyTorch's multi-line weights_only message, e.g. 'it needs the global posix.system'."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it needs the global {m.group(1)}"
    m = re.search(r"but got <class '([\w.]+)'>", text)  # an allowed global building an object of another class
    if m:
        return f"it builds a {m.group(1)}"
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(boiler)]
    return (lines[0] if lines else type(e).__name__)[:160]


def tensor_dict(obj: Any, label: str, what: str = "weights") -> dict[str, torch.Tensor]:
    """`obj` if it is a dict of str -> tensor, else a one-line `CheckpointError` naming `label` and the culprit."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{label}: {what} are a {type(obj).__name__}, not a dict of tensors")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{label}: {what} entry {str(k)[:80]!r} is a {type(v).__name__}, not a tensor")
    return obj


def read_weights(path: str | Path, label: str) -> Any:
    """The object stored in a weights file: a dict of tensors for .safetensors, whatever plain data for torch files.
    Raises `CheckpointError` (naming `label`) for a broken safetensors header or a refused/unreadable torch file."""
    p = Path(path)
    if p.suffix == ".safetensors" or (not zipfile.is_zipfile(p) and _looks_like_safetensors(p)):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:  # header, dtype, size errors
            raise CheckpointError(f"{label}: not a readable safetensors file ({first_line(e, 160)})") from None
    return load_torch_file(p, label, what="weights file")


def _looks_like_safetensors(p: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and then a JSON object ('{')."""
    with open(p, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: str | Path, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (see `state_dict_of`). Raises `CheckpointError` naming the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"model.pretrained: file not found: {p}")
    label = f"model.pretrained: {p}"
    return state_dict_of(read_weights(p, label), label, keys)


def state_dict_of(obj: Any, label: str, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
    """The state dict in what a weights file held: a vitforge checkpoint gives the weights it evaluates with, a
    wrapping dict the first of `keys` it has, a plain state dict itself ('module.' prefixes of DDP removed).

    Raises:
        CheckpointError: no dict of tensors found (the message starts with `label`).
    """
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        for key in ("model", "ema") if obj.get("eval_weights") == "ema" and obj.get("ema") else ("model",):
            tensor_dict(obj.get(key), label, f"its {key!r} weights")
        return eval_state_dict(obj)
    for key in keys:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{label}: no state dict of tensors found")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def eval_state_dict(ckpt: dict) -> dict:
    """The weights to evaluate: the EMA weights when the run evaluated with them, else the raw model."""
    if ckpt.get("eval_weights") == "ema" and ckpt.get("ema"):
        return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    return ckpt["model"]


def dtype_kind(t: torch.Tensor) -> str:
    """'float', 'complex', 'bool' or 'int': weights of another kind (int8 codes where floats belong, say) are not the
    same weights in another precision, so they never load; float16/bfloat16 into float32 does."""
    if t.is_floating_point():
        return "float"
    if t.is_complex():
        return "complex"
    return "bool" if t.dtype == torch.bool else "int"


def load_state_strict(model: nn.Module, state: dict, source: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming the file and the first mismatching keys."""
    tensor_dict(state, source)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    kind = [k for k in own if k in state and k not in shape and dtype_kind(own[k]) != dtype_kind(state[k])]
    if missing or unexpected or shape or kind:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[0]}")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if kind:
            k = kind[0]
            parts.append(f"dtype mismatch at {k}: checkpoint {state[k].dtype} vs model {own[k].dtype}")
        name = getattr(model, "vitforge_name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit model {name}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_pretrained(model: nn.Module, path: str | Path, *, convert=None) -> dict:
    """Load `path` into `model` (strict except for a re-sized classifier). Returns {"loaded", "reset"} key lists.

    Args:
        convert: optional function(state_dict, model) -> state_dict mapping a foreign key layout to the model's.
    """
    state = read_state_dict(path)
    if convert is not None:
        state = convert(state, model)
    own = model.state_dict()
    reset = [k for k in own if k.startswith(HEAD_PREFIXES) and k in state and state[k].shape != own[k].shape]
    reset += [k for k in own if k.startswith(HEAD_PREFIXES) and k not in state]
    state = {k: v for k, v in state.items() if k not in reset and not (k.startswith(HEAD_PREFIXES) and k not in own)}
    missing = [k for k in own if k not in state and k not in reset]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    kind = [k for k in state if k in own and k not in shape and dtype_kind(state[k]) != dtype_kind(own[k])]
    if missing or unexpected or shape or kind:
        name = getattr(model, "vitforge_name", type(model).__name__)
        detail = (f" missing {len(missing)} e.g. {missing[:2]}" if missing else "") + (
            f" unexpected {len(unexpected)} e.g. {unexpected[:2]}" if unexpected else "") + (
            f" shape mismatch at {shape[0]}: {tuple(state[shape[0]].shape)} vs {tuple(own[shape[0]].shape)}"
            if shape else "") + (
            f" dtype mismatch at {kind[0]}: {state[kind[0]].dtype} vs {own[kind[0]].dtype}" if kind else "")
        raise CheckpointError(f"model.pretrained: {path} does not fit model {name}:{detail}")
    model.load_state_dict(state, strict=False)
    if reset:
        log.info("pretrained %s: classifier re-initialised for the new classes (%s)", path, ", ".join(reset))
    return {"loaded": sorted(state), "reset": sorted(reset)}
