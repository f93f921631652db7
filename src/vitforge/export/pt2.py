"""`torch.export` (PyTorch 2's export format, the successor of TorchScript): an `ExportedProgram` with a dynamic
batch axis, saved with `torch.export.save`, reloaded and checked against PyTorch on batches of 1, B and B + 1.

The archive holds the eval-mode graph (images (B, C, S, S) -> logits (B, K)), its weights and the export config
(extra file `vitforge.json`). Load it with `torch.export.load(path).module()` — only archives you trust: the loader
unpickles parts of the file. vitforge itself loads a .pt2 only to check the one it has just written; to share a model
use `--format folder` (safetensors + JSON, nothing executed on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from vitforge.errors import VitforgeError, first_line
from vitforge.export.verify import quiet_tracing, start_export

EXTRA_FILE = "vitforge.json"
MAX_BATCH = 4096


def export_pt2(model: nn.Module, meta: dict, out: Path, *, overwrite: bool = False, tol: float = 1e-4,
               batch_size: int = 2) -> dict:
    """Write `out` (.pt2) with a symbolic batch dimension, reload it and compare its logits with the model's."""
    p = start_export(model, meta, [out], overwrite=overwrite, batch_size=batch_size, tol=tol, single=True)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with quiet_tracing(), torch.no_grad():
            program = torch.export.export(p.module, (p.inputs[0],), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise VitforgeError(f"--format pt2: {meta.get('model_name', 'the model')} cannot be captured by "
                            f"torch.export: {first_line(e)} (safetensors and onnx may still work)") from e
    torch.export.save(program, out, extra_files={EXTRA_FILE: json.dumps(p.config)})
    with quiet_tracing(), torch.no_grad():
        loaded = torch.export.load(out).module()  # the archive just written here, not a user's file
        ours = [loaded(x) for x in p.inputs]
    check = f"reloaded ExportedProgram vs PyTorch, batches {p.batches} (batch axis 1..{MAX_BATCH})"
    return p.result("pt2", [out], ours, check, "torch.export")
