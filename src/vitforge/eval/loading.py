"""Every model source that inference accepts, behind one call: `load_for_inference(path)` -> (model, meta).

    run directory           checkpoints/best.pt (else last.pt)
    checkpoint file         a vitforge checkpoint (`vitforge.checkpoint.load_model`)
    exported model folder   model.safetensors + config.json (`vitforge export --format folder`; a Hugging Face
                            model repository layout)
    x.safetensors           with x.json beside it (`vitforge export --format safetensors`)
    x.onnx                  run through onnxruntime (`vitforge export --format onnx`; config in its metadata)

Exported models are read without executing anything from the files: safetensors holds only tensors, the configs are
JSON, and the model is rebuilt from the registered model name and its arguments. An ONNX graph runs in onnxruntime.
`meta` always has classes, preprocess, config, model_name, model_kwargs, path, metrics, params and source (one of
"checkpoint", "folder", "safetensors", "onnx").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_weights

from vitforge.checkpoint import check_model_fields, load_model, rebuild_model
from vitforge.errors import CheckpointError, first_line
from vitforge.models.build import count_params
from vitforge.models.pretrained import dtype_kind

EXPORT_FORMAT = "vitforge-export"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REQUIRED = ("model_name", "model_kwargs", "classes", "preprocess")


def source_kind(path: str | Path) -> str:
    """"folder", "safetensors", "onnx" or "checkpoint" (run directories and checkpoint files) for a model path."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / CONFIG_FILE).is_file() and not (p / "checkpoints").is_dir():
        return "folder"
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".onnx":
        return "onnx"
    return "checkpoint"


def read_export_config(path: Path, text: str | None = None) -> dict:
    """The JSON config of an export, checked for the keys a model needs. Raises `CheckpointError` naming `path`."""
    try:
        config = json.loads(path.read_text() if text is None else text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable export config ({first_line(e, 120)})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: not a vitforge export config (no \"format\": \"{EXPORT_FORMAT}\")")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise CheckpointError(f"{path}: export config lacks {', '.join(missing)}")
    check_model_fields(config, str(path))
    return config


def _meta(config: dict, path: Path, source: str, params: int) -> dict:
    return {"classes": list(config["classes"]), "preprocess": dict(config["preprocess"]),
            "config": config.get("config"), "model_name": config["model_name"],
            "model_kwargs": dict(config["model_kwargs"]), "path": str(path), "metrics": config.get("metrics"),
            "provenance": config.get("exported"), "params": params, "source": source}


def load_safetensors_export(weights: str | Path, config_file: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Rebuild (model in eval mode on the CPU, meta) from safetensors weights and their JSON config.

    Args:
        weights: the .safetensors file.
        config_file: its config (default: `weights` with .json, or config.json for model.safetensors in a folder).
    """
    weights = Path(weights).expanduser()
    if config_file is None:
        folder_cfg = weights.parent / CONFIG_FILE
        config_file = folder_cfg if weights.name == WEIGHTS_FILE and folder_cfg.is_file() else weights.with_suffix(
            ".json")
    config_file = Path(config_file)
    if not weights.is_file() or not config_file.is_file():
        raise CheckpointError(f"{weights}: needs both {weights.name} and {config_file.name}")
    config = read_export_config(config_file)
    model = rebuild_model(config["model_name"], config["model_kwargs"], str(config_file))
    try:
        _check_dtypes(model, weights, config["model_name"])
        missing, unexpected = load_weights(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights}: not readable safetensors weights for {config['model_name']} "
                              f"({first_line(e, 160)})") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit {config['model_name']}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    source = "folder" if config_file.name == CONFIG_FILE else "safetensors"
    return model.eval(), _meta(config, weights.parent if source == "folder" else weights, source,
                               count_params(model)[0])


def _check_dtypes(model: nn.Module, weights: Path, name: str) -> None:
    """Tensors of another kind than the model's (integers where floats belong) are refused, not silently cast;
    read from the safetensors header alone."""
    own = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        for k in f.keys():
            if k in own:
                code = f.get_slice(k).get_dtype()  # "F32", "BF16", "I64", "BOOL", ...
                kind = ("float" if code.startswith(("F", "BF")) else "bool" if code == "BOOL" else
                        "complex" if code.startswith("C") else "int")
                if kind != dtype_kind(own[k]):
                    raise CheckpointError(f"{weights} does not fit {name}: dtype mismatch at {k}: file {code} vs "
                                          f"model {own[k].dtype}")


class OnnxModel(nn.Module):
    """An ONNX export (input "images", output "logits") behind the nn.Module call the evaluation code makes:
    float tensor (B, C, S, S) -> logits tensor (B, K) on the input's device."""

    def __init__(self, session, params: int):
        super().__init__()
        self.session = session
        self.num_params = params
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().numpy()
        out = self.session.run(["logits"], {"images": x})[0]
        return torch.from_numpy(out).to(images.device)


def load_onnx_export(path: str | Path, *, threads: int | None = None) -> tuple[nn.Module, dict]:
    """(OnnxModel on onnxruntime's CPU provider, meta) for an .onnx file written by `vitforge export`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}")
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise CheckpointError(f"{path}: running ONNX models needs onnx and onnxruntime: pip install "
                              "'vitforge[export]'") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)  # metadata and shapes; the session reads the weights
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # protobuf / onnxruntime raise many types for a bad file
        raise CheckpointError(f"{path}: not a readable ONNX model ({first_line(e, 160)})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "vitforge" not in props:
        raise CheckpointError(f"{path}: no vitforge metadata (export it with `vitforge export --format onnx`)")
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (["images"], ["logits"]):
        raise CheckpointError(f"{path}: expected input 'images' and output 'logits', got {names[0]} -> {names[1]}")
    config = read_export_config(path, props["vitforge"])
    params = config.get("params")
    if params is None:  # an export older than the params field: count the graph's stored tensors
        params = sum(int(torch.Size(t.dims).numel()) for t in proto.graph.initializer)
    return OnnxModel(session, params), _meta(config, path, "onnx", params)


def load_for_inference(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on `device`, meta) for any model path (see the module docstring).

    Raises:
        CheckpointError: the path is missing or unreadable, or its weights do not fit its model (named).
    """
    kind = source_kind(path)
    p = Path(path).expanduser()
    if p.is_dir() and kind == "checkpoint" and not (p / "checkpoints").is_dir():
        raise CheckpointError(f"{p}: neither a run directory (checkpoints/) nor an exported model folder "
                              f"({CONFIG_FILE} + {WEIGHTS_FILE})")
    if kind == "folder":
        model, meta = load_safetensors_export(Path(path).expanduser() / WEIGHTS_FILE)
    elif kind == "safetensors":
        model, meta = load_safetensors_export(path)
    elif kind == "onnx":
        return load_onnx_export(path)
    else:
        model, meta = load_model(path, device=device)
        meta.update(params=count_params(model)[0], source="checkpoint")
        return model, meta
    return model.to(device), meta
