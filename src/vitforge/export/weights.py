"""safetensors weights + a JSON config beside them; `load_safetensors_model` rebuilds the model from both files.

`safetensors.torch.save_model` (rather than `save_file`) deduplicates tensors that share storage, so models with
tied parameters export too. The check rebuilds the model from the two files and compares its logits with the
original's (an exact round trip gives 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from vitforge.errors import CheckpointError
from vitforge.export.verify import (
    LogitsModule,
    example_inputs,
    export_config,
    guard_outputs,
    input_shape,
    max_abs_diff,
    reference,
    report,
)
from vitforge.models.build import build_model
from vitforge.outputs import usual_mode


def config_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def export_safetensors(model: nn.Module, meta: dict, out: Path, *, overwrite: bool = False, tol: float = 1e-4,
                       batch_size: int = 2) -> dict:
    """Write `out` (.safetensors) and `out` with .json, rebuild the model from them and compare logits."""
    from safetensors.torch import save_model

    cfg_file = config_path(out)
    guard_outputs([out, cfg_file], overwrite)
    shape = input_shape(model, meta)
    config = export_config(meta, shape)
    save_model(model, str(out), metadata={"vitforge": json.dumps({k: config[k] for k in ("model_name", "classes")})})
    usual_mode(out)  # safetensors writes 0600; an export is meant to be shared like any file the user writes
    cfg_file.write_text(json.dumps(config, indent=2) + "\n")
    inputs = example_inputs(shape, batch_size)
    rebuilt, _ = load_safetensors_model(out)
    diff = max_abs_diff(reference(LogitsModule(rebuilt), inputs), reference(LogitsModule(model), inputs))
    return report("safetensors", [out, cfg_file], diff, tol, "model rebuilt from the files vs original, batches "
                  f"{[len(x) for x in inputs]}", shape, "n/a")


def load_safetensors_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild (model in eval mode, config) from `x.safetensors` and `x.json` (registered model names only)."""
    from safetensors.torch import load_model

    path = Path(path)
    cfg_file = config_path(path)
    if not path.is_file() or not cfg_file.is_file():
        raise CheckpointError(f"{path}: needs both {path.name} and {cfg_file.name}")
    config = json.loads(cfg_file.read_text())
    model = build_model(config["model_name"], config["model_kwargs"])
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {config['model_name']}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model.eval(), config
