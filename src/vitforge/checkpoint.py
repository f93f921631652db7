"""Checkpoints: self-describing (config, classes, preprocessing, model name and arguments), written atomically.

A checkpoint alone rebuilds its model and preprocessing: `load_model(path)`.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
from pathlib import Path

import torch

from vitforge.errors import CheckpointError, first_line
from vitforge.models.build import build_model
from vitforge.models.pretrained import CHECKPOINT_FORMAT, eval_state_dict, load_state_strict
from vitforge.version import __version__

FORMAT = CHECKPOINT_FORMAT
VERSION = 1


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    return {"vitforge": __version__, "torch": torch.__version__, "git": git_sha(),
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
    """Read a vitforge checkpoint onto the CPU. Raises `CheckpointError` naming the file for anything else."""
    p = resolve(path, prefer)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors of many kinds
        raise CheckpointError(f"{p}: not a readable checkpoint ({first_line(e, 120)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a vitforge checkpoint (no '{FORMAT}' marker); for plain weights use "
                              f"model.pretrained={p}")
    ckpt["path"] = str(p)
    return ckpt


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
    model = build_model(ckpt["model_name"], ckpt["model_kwargs"])
    state = eval_state_dict(ckpt) if weights == "eval" else ckpt["model"]
    load_state_strict(model, state, ckpt["path"])
    model.to(device).eval()
    meta = {k: ckpt.get(k) for k in ("classes", "preprocess", "config", "model_name", "model_kwargs", "path",
                                     "metrics", "provenance", "progress")}
    return model, meta
