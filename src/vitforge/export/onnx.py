"""ONNX export with a dynamic batch axis, checked with onnxruntime against PyTorch.

Two exporters, tried in this order (`exporter="auto"`):
    dynamo   `torch.onnx.export(dynamo=True)`: captures the model with `torch.export` and translates it with
             `onnxscript` (opset 18); the exporter PyTorch develops. Every registered ViT-family model takes this path.
    legacy   `torch.onnx.export(dynamo=False)`: the TorchScript-tracing exporter (opset 17), used when the dynamo
             exporter raises or its file fails the parity check; the report says why (`fallback`).
Both write one self-contained file (weights inside, not in a `.onnx.data` beside it) with input "images"
(batch, C, S, S), output "logits" (batch, K) and the export config as metadata_props["vitforge"], and both are
checked the same way: onnxruntime vs PyTorch on batches of 1, B and B + 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from vitforge.errors import VitforgeError, first_line
from vitforge.export.verify import quiet_tracing, start_export

OPSET = 17  # legacy exporter
OPSET_DYNAMO = 18  # the lowest opset the dynamo exporter emits
EXPORTERS = ("auto", "dynamo", "legacy")
log = logging.getLogger(__name__)


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise VitforgeError("--format onnx needs the onnx and onnxruntime packages: pip install 'vitforge[export]'") \
            from None
    return onnx, onnxruntime


def _export_dynamo(module: nn.Module, example: torch.Tensor, out: Path) -> int:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError:
        raise RuntimeError("the dynamo exporter needs onnxscript: pip install 'vitforge[export]'") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    with quiet_tracing(), torch.no_grad(), _stdout_to_devnull():
        torch.onnx.export(module, (example,), str(out), input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), opset_version=OPSET_DYNAMO, dynamo=True,
                          external_data=False, verbose=False)
    return OPSET_DYNAMO


def _export_legacy(module: nn.Module, example: torch.Tensor, out: Path) -> int:
    with quiet_tracing(), torch.no_grad(), _stdout_to_devnull():  # a failed operator prints the whole graph
        torch.onnx.export(module, (example,), str(out), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    return OPSET


def export_onnx(model: nn.Module, meta: dict, out: Path, *, overwrite: bool = False, tol: float = 1e-4,
                batch_size: int = 2, exporter: str = "auto") -> dict:
    """Write `out` (.onnx) and check it; `exporter`: auto (dynamo, else legacy), dynamo or legacy.

    The report adds "exporter" (the path that wrote the file) and "fallback" (why dynamo was not used, or None).
    """
    onnx, ort = _require_onnx()
    if exporter not in EXPORTERS:
        raise VitforgeError(f"--onnx-exporter: must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    p = start_export(model, meta, [out], overwrite=overwrite, batch_size=batch_size, tol=tol, single=True)
    name = meta.get("model_name", "the model")
    config = json.dumps(p.config)
    fallback = None
    for path in (("dynamo", "legacy") if exporter == "auto" else (exporter,)):
        try:
            opset = (_export_dynamo if path == "dynamo" else _export_legacy)(p.module, p.inputs[0], out)
        except Exception as e:  # exporters raise many types (UserError, OnnxExporterError, RuntimeError, ...)
            out.unlink(missing_ok=True)
            reason = f"{path} exporter failed: {first_line(e, 200)}"
            if path == "dynamo" and exporter == "auto":
                fallback = reason
                log.info("%s: %s; trying the legacy exporter", name, reason)
                continue
            raise VitforgeError(f"--format onnx: {name} cannot be exported to ONNX ({reason}); safetensors, pt2 "
                                "and folder still work") from e
        _add_metadata(onnx, out, config)
        try:  # onnxruntime may refuse the graph (an operator it lacks at this opset) or a batch size (fixed axis)
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            ours, failed = [session.run(["logits"], {"images": x.numpy()})[0] for x in p.inputs], None
        except Exception as e:
            ours, failed = None, first_line(e, 200)
        diff = p.diff(ours)
        if path == "dynamo" and exporter == "auto" and not diff <= tol:
            fallback = f"dynamo export failed the check: {failed or f'off by {diff:.3e} (> {tol:.0e})'}"
            log.info("%s: %s; trying the legacy exporter", name, fallback)
            continue
        check = (f"onnxruntime {ort.__version__} vs PyTorch, batches {p.batches}, opset {opset}, {path} exporter"
                 + (f"; onnxruntime failed: {failed}" if failed else ""))
        return {**p.result("onnx", [out], ours, check, _attention_impl(model)),
                "exporter": path, "fallback": fallback}
    raise AssertionError("unreachable: the legacy exporter either returns or raises")


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


def _add_metadata(onnx, path: Path, config: str) -> None:
    """Store the export config JSON (classes, preprocessing, ...) as ONNX metadata_props["vitforge"]."""
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "vitforge", config
    onnx.save(proto, str(path))


def _attention_impl(model: nn.Module) -> str:
    impls = {m.impl for m in model.modules() if hasattr(m, "impl") and hasattr(m, "record")}
    return ",".join(sorted(impls)) or "n/a"
