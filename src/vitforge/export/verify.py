"""What every export shares: the module that is exported, example inputs, the parity comparison, file guards."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from vitforge.checkpoint import provenance
from vitforge.outputs import check_output


class LogitsModule(nn.Module):
    """The deployed function: images (B, C, S, S) -> logits (B, K) in eval mode.

    Models with several heads (DeiT: CLS + distillation) return their mean, as `vitforge eval` does.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()  # the wrapper too: exporters restore the top module's mode onto every submodule afterwards

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if isinstance(out, (tuple, list)):
            out = torch.stack(list(out)).mean(0)
        return out


def input_shape(model: nn.Module, meta: dict) -> tuple[int, int, int]:
    """(C, S, S): channels from the model's config (3 by default), size from the checkpoint's preprocessing."""
    chans = int(getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0])
    size = int(meta["preprocess"]["img_size"])
    return chans, size, size


def example_inputs(shape: tuple[int, int, int], batch_size: int, seed: int = 0, *, single: bool = False
                   ) -> list[torch.Tensor]:
    """Normalised-scale random batches of batch_size and batch_size + 1 (the second exercises a dynamic batch), and
    with `single` a batch of 1 too (a graph with a symbolic batch axis may still specialise on size 1)."""
    g = torch.Generator().manual_seed(seed)
    sizes = (batch_size, batch_size + 1, 1) if single and batch_size > 1 else (batch_size, batch_size + 1)
    return [torch.randn(b, *shape, generator=g) for b in sizes]


@torch.no_grad()
def reference(module: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [module(x).float() for x in inputs]


def max_abs_diff(ours: list, ref: list[torch.Tensor]) -> float:
    """Largest |a - b| over paired outputs (numpy arrays or tensors); shape mismatches are infinite."""
    worst = 0.0
    for a, b in zip(ours, ref, strict=True):
        a = torch.as_tensor(a).float()
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, (a - b).abs().max().item())
    return worst


def guard_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse to replace existing files without `overwrite`; create the parent folders."""
    for p in paths:
        check_output(p, overwrite=overwrite)
        p.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def quiet_tracing():
    """Silence tracer/deprecation chatter: shape-dependent Python branches are constants for the fixed input size,
    and the parity check on a second batch size is what proves the export correct."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def report(fmt: str, files: list[Path], diff: float, tol: float, check: str, shape, attention: str) -> dict:
    return {"format": fmt, "files": [str(f) for f in files], "max_abs_diff": diff, "tol": tol,
            "ok": bool(diff <= tol), "check": check, "input_shape": list(shape), "attention": attention}


def export_config(meta: dict, shape, model: nn.Module | None = None) -> dict:
    """What a deployment needs besides the weights: how to rebuild the model and how to feed it (and, given the
    model, its parameter count)."""
    params = {"params": sum(p.numel() for p in model.parameters())} if model is not None else {}
    return {**params, "format": "vitforge-export", "version": 1, "model_name": meta["model_name"],
            "model_kwargs": meta["model_kwargs"], "classes": list(meta["classes"]), "preprocess": meta["preprocess"],
            "input_shape": list(shape), "input": "float32 (B, C, S, S), RGB scaled to [0, 1] then (x - mean) / std",
            "output": "logits (B, K) in `classes` order", "source_checkpoint": meta.get("path"),
            "metrics": meta.get("metrics"), "config": meta.get("config"), "exported": provenance()}


@dataclass
class Parity:
    """One export's check, prepared before anything is written: the exported function, its example inputs, the
    original's outputs on them (computed first, so the export cannot change what it is compared to) and the export
    config. `start_export` builds it; a format writes its files, runs its reloaded copy on `inputs` and calls
    `result`."""

    module: LogitsModule
    shape: tuple[int, int, int]
    inputs: list[torch.Tensor]
    ref: list[torch.Tensor]
    config: dict
    tol: float

    @property
    def batches(self) -> list[int]:
        return [len(x) for x in self.inputs]

    def diff(self, ours: list | None) -> float:
        """Largest |ours - original| over `inputs`; None (the export could not even run) is infinite."""
        return float("inf") if ours is None else max_abs_diff(ours, self.ref)

    def result(self, fmt: str, files: list[Path], ours: list | None, check: str, attention: str) -> dict:
        """The export report: `ours` (the reloaded export's outputs on `inputs`, or None) against the original's."""
        return report(fmt, files, self.diff(ours), self.tol, check, self.shape, attention)


def start_export(model: nn.Module, meta: dict, files: list[Path], *, overwrite: bool, batch_size: int, tol: float,
                 single: bool = False, as_float: bool = True) -> Parity:
    """Refuse to replace `files` without `overwrite`, then prepare the parity check of `model` (see `Parity`).

    `single` adds a batch of 1 (graphs with a symbolic batch axis); `as_float` exports a float32 copy of the function
    (traced and compiled formats; safetensors and folder store the weights as they are).
    """
    guard_outputs(files, overwrite)
    module = LogitsModule(model)
    if as_float:
        module = module.float()
    shape = input_shape(model, meta)
    inputs = example_inputs(shape, batch_size, single=single)
    return Parity(module, shape, inputs, reference(module, inputs), export_config(meta, shape, model), tol)
