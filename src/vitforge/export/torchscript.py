"""TorchScript export by tracing the eval-mode model, checked against PyTorch on two batch sizes.

Tracing (not scripting): the models use Python-level shape logic and optional paths (attention recording, grad
checkpointing) that `torch.jit.script` cannot compile, while a trace records exactly the eval-mode inference graph.
Tensor sizes read from `x.shape` are traced as operations, so the batch axis stays dynamic; the check on a second
batch size proves it. Shape-dependent Python branches (e.g. "resize the position grid if H != img_size") are frozen
for the checkpoint's input size, which is the only size the exported model is meant for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from vitforge.export.verify import quiet_tracing, start_export

EXTRA_FILE = "vitforge.json"


def export_torchscript(model: nn.Module, meta: dict, out: Path, *, overwrite: bool = False, tol: float = 1e-4,
                       batch_size: int = 2) -> dict:
    """Write a traced TorchScript archive (config in its extra file `vitforge.json`), reload it and check it."""
    p = start_export(model, meta, [out], overwrite=overwrite, batch_size=batch_size, tol=tol)
    with quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(p.module, p.inputs[0], check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={EXTRA_FILE: json.dumps(p.config)})
        loaded = torch.jit.load(str(out), map_location="cpu")  # the archive just written here
        ours = [loaded(x) for x in p.inputs]
    return p.result("torchscript", [out], ours, f"reloaded TorchScript vs PyTorch, batches {p.batches}", "traced")


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """(module, export config) of an archive written by `export_torchscript`."""
    extra = {EXTRA_FILE: ""}
    with quiet_tracing():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[EXTRA_FILE])
