"""ONNX export with a dynamic batch axis, checked with onnxruntime against PyTorch.

Uses the TorchScript-based exporter (`dynamo=False`): the torch.export-based one needs the `onnxscript` package,
which vitforge does not depend on. Scaled-dot-product attention exports as plain MatMul/Softmax ops at opset >= 14,
so no model needs the manual attention path for ONNX (checked for every ViT-family model in tests/test_export.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

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

OPSET = 17


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise VitforgeError("--format onnx needs the onnx and onnxruntime packages: pip install 'vitforge[export]'") \
            from None
    return onnx, onnxruntime


def export_onnx(model: nn.Module, meta: dict, out: Path, *, overwrite: bool = False, tol: float = 1e-4,
                batch_size: int = 2, opset: int = OPSET) -> dict:
    """Write `out` (.onnx, input "images" (batch, C, S, S), output "logits" (batch, K)) and check it."""
    import torch

    onnx, ort = _require_onnx()
    guard_outputs([out], overwrite)
    module = LogitsModule(model).float()
    shape = input_shape(model, meta)
    inputs = example_inputs(shape, batch_size)
    ref = reference(module, inputs)  # before exporting: the export must not be able to change what it is compared to
    try:  # on a failed operator the exporter's C++ prints the whole graph to stdout
        with quiet_tracing(), torch.no_grad(), _stdout_to_devnull():
            torch.onnx.export(module, (inputs[0],), str(out), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as e:  # e.g. an operator ONNX has no form for
        out.unlink(missing_ok=True)
        raise VitforgeError(f"--format onnx: {meta.get('model_name', 'the model')} cannot be exported to ONNX "
                            f"opset {opset}: {first_line(e)} (safetensors and torchscript still work)") from e
    _add_metadata(onnx, out, export_config(meta, shape))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ours = [session.run(["logits"], {"images": x.numpy()})[0] for x in inputs]
    diff = max_abs_diff(ours, ref)
    check = f"onnxruntime {ort.__version__} vs PyTorch, batches {[len(x) for x in inputs]}, opset {opset}"
    return report("onnx", [out], diff, tol, check, shape, _attention_impl(model))


@contextlib.contextmanager
def _stdout_to_devnull():
    """Point file descriptor 1 at /dev/null (C++ writes bypass `sys.stdout`), then restore it."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _add_metadata(onnx, path: Path, config: dict) -> None:
    """Store the export config (classes, preprocessing, ...) as ONNX metadata_props["vitforge"]."""
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "vitforge", json.dumps(config)
    onnx.save(proto, str(path))


def _attention_impl(model: nn.Module) -> str:
    impls = {m.impl for m in model.modules() if hasattr(m, "impl") and hasattr(m, "record")}
    return ",".join(sorted(impls)) or "n/a"
