"""Export a checkpoint for deployment, each format checked against PyTorch at export time.

    safetensors   weights (`.safetensors`) + JSON config beside them: model name/kwargs, classes, preprocessing;
                  `load_safetensors_model` rebuilds the model from the two files alone
    onnx          dynamic batch axis; onnxruntime output vs PyTorch on two batch sizes (max |delta| <= tol)
    torchscript   `torch.jit.trace` of the eval-mode model; same check on two batch sizes

Every export returns a report {"format", "files", "max_abs_diff", "tol", "ok", "check", ...}; `vitforge export`
exits non-zero when `ok` is false (the files are kept for inspection).
"""

from __future__ import annotations

from pathlib import Path

from vitforge.checkpoint import load_model, resolve
from vitforge.errors import VitforgeError
from vitforge.export.onnx import export_onnx
from vitforge.export.torchscript import export_torchscript
from vitforge.export.weights import export_safetensors

FORMATS = ("safetensors", "onnx", "torchscript")
SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt"}


def default_output(checkpoint: str | Path, fmt: str) -> Path:
    """RUN/export/model.<ext> for a run directory, else the checkpoint's path with the format's suffix."""
    src = Path(checkpoint).expanduser()
    if src.is_dir():
        return src / "export" / f"model{SUFFIX[fmt]}"
    path = resolve(src)
    return path.with_name(f"{path.stem}.{fmt}{SUFFIX[fmt]}") if fmt == "torchscript" else path.with_suffix(SUFFIX[fmt])


def export_model(model, meta: dict, fmt: str, out: str | Path, *, overwrite: bool = False, tol: float = 1e-4,
                 batch_size: int = 2) -> dict:
    """Export an eval-mode model whose `meta` holds model_name, model_kwargs, classes and preprocess.

    Args:
        model: the model (rebuilt by `vitforge.checkpoint.load_model` or `vitforge.models.build.build_model`).
        meta: checkpoint metadata (see `load_model`).
        fmt: safetensors, onnx or torchscript.
        out: output file.
        overwrite: replace existing output files.
        tol: largest accepted |logit difference| between the export and PyTorch (fp32).
        batch_size: batch of the example input; the check also runs batch_size + 1 (dynamic batch axis).

    Raises:
        VitforgeError: unknown format, or an output file exists without `overwrite`.
    """
    if fmt not in FORMATS:
        raise VitforgeError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not tol > 0:
        raise VitforgeError(f"--tol: must be > 0, got {tol}")
    if batch_size < 1:
        raise VitforgeError(f"--batch-size: must be >= 1, got {batch_size}")
    out = Path(out)
    run = {"onnx": export_onnx, "torchscript": export_torchscript}.get(fmt, export_safetensors)
    return run(model, meta, out, overwrite=overwrite, tol=tol, batch_size=batch_size)


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False,
                      tol: float = 1e-4, batch_size: int = 2) -> dict:
    """Load a checkpoint (or a run's best.pt) on the CPU in fp32 and `export_model` it (default output:
    `default_output`)."""
    if fmt not in FORMATS:
        raise VitforgeError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, meta = load_model(checkpoint, device="cpu")
    path = Path(out) if out else default_output(checkpoint, fmt)
    report = export_model(model, meta, fmt, path, overwrite=overwrite, tol=tol, batch_size=batch_size)
    return {"checkpoint": meta["path"], **report}


__all__ = ["FORMATS", "default_output", "export_checkpoint", "export_model"]
