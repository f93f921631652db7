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
from vitforge.export.verify import (
    LogitsModule,
    example_inputs,
    export_config,
    guard_outputs,
    input_shape,
    max_abs_diff,
    quiet_tracing,
    reference,
    report,
)

EXTRA_FILE = "vitforge.json"
MAX_BATCH = 4096


def export_pt2(model: nn.Module, meta: dict, out: Path, *, overwrite: bool = False, tol: float = 1e-4,
               batch_size: int = 2) -> dict:
    """Write `out` (.pt2) with a symbolic batch dimension, reload it and compare its logits with the model's."""
    guard_outputs([out], overwrite)
    module = LogitsModule(model).float()
    shape = input_shape(model, meta)
    inputs = example_inputs(shape, batch_size, single=True)
    ref = reference(module, inputs)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with quiet_tracing(), torch.no_grad():
            program = torch.export.export(module, (inputs[0],), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise VitforgeError(f"--format pt2: {meta.get('model_name', 'the model')} cannot be captured by "
                            f"torch.export: {first_line(e)} (safetensors and onnx may still work)") from e
    config = export_config(meta, shape, model)
    torch.export.save(program, out, extra_files={EXTRA_FILE: json.dumps(config)})
    with quiet_tracing(), torch.no_grad():
        loaded = torch.export.load(out).module()  # the archive just written here, not a user's file
        ours = [loaded(x) for x in inputs]
    diff = max_abs_diff(ours, ref)
    check = f"reloaded ExportedProgram vs PyTorch, batches {[len(x) for x in inputs]} (batch axis 1..{MAX_BATCH})"
    return report("pt2", [out], diff, tol, check, shape, "torch.export")
