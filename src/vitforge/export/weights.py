"""safetensors weights + a JSON config beside them; `load_safetensors_model` rebuilds the model from both files
(`vitforge.eval.loading`, shared with `predict`, `eval` and `serve`).

`safetensors.torch.save_model` (rather than `save_file`) deduplicates tensors that share storage, so models with
tied parameters export too. The check rebuilds the model from the two files and compares its logits with the
original's (an exact round trip gives 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_model

from vitforge.eval.loading import load_safetensors_export
from vitforge.export.verify import LogitsModule, reference, start_export
from vitforge.outputs import usual_mode


def config_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def export_safetensors(model: nn.Module, meta: dict, out: Path, *, overwrite: bool = False, tol: float = 1e-4,
                       batch_size: int = 2) -> dict:
    """Write `out` (.safetensors) and `out` with .json, rebuild the model from them and compare logits."""
    cfg_file = config_path(out)
    p = start_export(model, meta, [out, cfg_file], overwrite=overwrite, batch_size=batch_size, tol=tol,
                     as_float=False)
    save_model(model, str(out), metadata={"vitforge": json.dumps({k: p.config[k] for k in ("model_name", "classes")})})
    usual_mode(out)  # safetensors writes 0600; an export is meant to be shared like any file the user writes
    cfg_file.write_text(json.dumps(p.config, indent=2) + "\n")
    rebuilt, _ = load_safetensors_model(out)
    return p.result("safetensors", [out, cfg_file], reference(LogitsModule(rebuilt), p.inputs),
                    f"model rebuilt from the files vs original, batches {p.batches}", "n/a")


def load_safetensors_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild (model in eval mode, meta) from `x.safetensors` and `x.json` (registered model names only);
    `vitforge.eval.loading.load_safetensors_export`, which `predict`, `eval` and `serve` use too."""
    return load_safetensors_export(path)
