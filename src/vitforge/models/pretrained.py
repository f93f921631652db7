"""Initial weights from a local file: a vitforge checkpoint, safetensors, or a torch state dict (.pth/.bin/.pt).

The classifier may differ (a new dataset has other classes): head tensors whose shape does not match are left at
their fresh initialisation and reported. Every other mismatch is an error naming the file and the keys, because
weights of a different architecture would otherwise load "successfully" and train from garbage.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from vitforge.errors import CheckpointError, first_line

log = logging.getLogger("vitforge")
HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.", "head.fc.")
CHECKPOINT_FORMAT = "vitforge-checkpoint"  # the marker `vitforge.checkpoint` writes into every checkpoint


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file. A vitforge checkpoint gives the weights it evaluates with."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"model.pretrained: file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:
            raise CheckpointError(f"model.pretrained: {p}: not a readable safetensors file "
                                  f"({first_line(e)})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"model.pretrained: {p}: not a readable weights file "
                              f"({first_line(e, 120)})") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return eval_state_dict(obj)
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"model.pretrained: {p}: no state dict of tensors found")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def eval_state_dict(ckpt: dict) -> dict:
    """The weights to evaluate: the EMA weights when the run evaluated with them, else the raw model."""
    if ckpt.get("eval_weights") == "ema" and ckpt.get("ema"):
        return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    return ckpt["model"]


def load_state_strict(model: nn.Module, state: dict, source: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming the file and the first mismatching keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[0]}")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
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
    if missing or unexpected or shape:
        name = getattr(model, "vitforge_name", type(model).__name__)
        detail = (f" missing {len(missing)} e.g. {missing[:2]}" if missing else "") + (
            f" unexpected {len(unexpected)} e.g. {unexpected[:2]}" if unexpected else "") + (
            f" shape mismatch at {shape[0]}: {tuple(state[shape[0]].shape)} vs {tuple(own[shape[0]].shape)}"
            if shape else "")
        raise CheckpointError(f"model.pretrained: {path} does not fit model {name}:{detail}")
    model.load_state_dict(state, strict=False)
    if reset:
        log.info("pretrained %s: classifier re-initialised for the new classes (%s)", path, ", ".join(reset))
    return {"loaded": sorted(state), "reset": sorted(reset)}
