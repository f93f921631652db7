"""Export a checkpoint for deployment, each format checked against PyTorch at export time.

    folder        a model folder to share, laid out as a Hugging Face model repository: model.safetensors +
                  config.json + README.md model card (+ figures); `predict`, `eval` and `serve` load it, nothing in
                  it is executed (`vitforge.export.folder`)
    pt2           `torch.export` ExportedProgram (`torch.export.save`), dynamic batch axis: the recommended PyTorch
                  format (`vitforge.export.pt2`)
    onnx          dynamic batch axis; dynamo exporter, legacy exporter as the fallback; onnxruntime vs PyTorch
    safetensors   weights (`.safetensors`) + JSON config beside them (`--format folder` is the same plus a card)
    torchscript   legacy: `torch.jit.trace` of the eval-mode model. TorchScript is deprecated upstream in favour of
                  torch.export; kept for existing deployments that load .pt archives with `torch.jit.load`

Every export returns a report {"format", "files", "max_abs_diff", "tol", "ok", "check", ...}; `vitforge export`
exits non-zero when `ok` is false (the files are kept for inspection).
"""

from __future__ import annotations

from pathlib import Path

from vitforge.checkpoint import load_model, resolve
from vitforge.errors import VitforgeError
from vitforge.export.folder import export_folder
from vitforge.export.onnx import export_onnx
from vitforge.export.pt2 import export_pt2
from vitforge.export.torchscript import export_torchscript
from vitforge.export.weights import export_safetensors
from vitforge.progress import Progress

FORMATS = ("folder", "pt2", "onnx", "safetensors", "torchscript")
SUFFIX = {"folder": "", "pt2": ".pt2", "safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt"}
EXPORTERS = {"folder": export_folder, "pt2": export_pt2, "onnx": export_onnx, "safetensors": export_safetensors,
             "torchscript": export_torchscript}
OPTIONS = {"onnx": ("exporter",), "folder": ("data", "evaluate")}  # format-specific keyword arguments


def default_output(checkpoint: str | Path, fmt: str) -> Path:
    """RUN/export/model.<ext> (RUN/export/model/ for folder) for a run directory, else beside the checkpoint."""
    src = Path(checkpoint).expanduser()
    if src.is_dir():
        return src / "export" / f"model{SUFFIX[fmt]}"
    path = resolve(src)
    if fmt == "folder":
        return path.with_name(f"{path.stem}_model")
    return path.with_name(f"{path.stem}.{fmt}{SUFFIX[fmt]}") if fmt == "torchscript" else path.with_suffix(SUFFIX[fmt])


def export_model(model, meta: dict, fmt: str, out: str | Path, *, overwrite: bool = False, tol: float = 1e-4,
                 batch_size: int = 2, **options) -> dict:
    """Export an eval-mode model whose `meta` holds model_name, model_kwargs, classes and preprocess.

    Args:
        model: the model (rebuilt by `vitforge.checkpoint.load_model` or `vitforge.models.build.build_model`).
        meta: checkpoint metadata (see `load_model`).
        fmt: one of FORMATS.
        out: output file (a directory for folder).
        overwrite: replace existing output files.
        tol: largest accepted |logit difference| between the export and PyTorch (fp32).
        batch_size: batch of the example input; the check also runs batch_size + 1 (dynamic batch axis).
        options: format options: `exporter` (onnx: auto, dynamo, legacy); `data`, `evaluate` (folder: the card's
            evaluation data, or none).

    Raises:
        VitforgeError: unknown format, or an output file exists without `overwrite`.
    """
    if fmt not in FORMATS:
        raise VitforgeError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not tol > 0:
        raise VitforgeError(f"--tol: must be > 0, got {tol}")
    if batch_size < 1:
        raise VitforgeError(f"--batch-size: must be >= 1, got {batch_size}")
    unknown = sorted(set(options) - set(OPTIONS.get(fmt, ())))
    if unknown:
        raise VitforgeError(f"--format {fmt}: takes no option {', '.join(unknown)}")
    return EXPORTERS[fmt](model, meta, Path(out), overwrite=overwrite, tol=tol, batch_size=batch_size, **options)


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False,
                      tol: float = 1e-4, batch_size: int = 2, **options) -> dict:
    """Load a checkpoint (or a run's best.pt) on the CPU in fp32 and `export_model` it (default output:
    `default_output`)."""
    if fmt not in FORMATS:
        raise VitforgeError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = Path(out) if out else default_output(checkpoint, fmt)
    with Progress(f"export {fmt}", unit="step") as bar:
        bar.stage(f"export {fmt}: loading {checkpoint}")
        model, meta = load_model(checkpoint, device="cpu")
        bar.stage(f"export {fmt}: writing {path} and checking parity")
        report = export_model(model, meta, fmt, path, overwrite=overwrite, tol=tol, batch_size=batch_size, **options)
    return {"checkpoint": meta["path"], **report}


__all__ = ["FORMATS", "default_output", "export_checkpoint", "export_model"]
