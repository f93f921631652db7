"""The model side of the server: one model or an ensemble, loaded as `vitforge predict` loads it, fed through the
evaluation stream's own preprocessing (`ImageInputs`) and TTA views (`tta_probs`), so a served prediction equals
`vitforge predict` on the same file.

    p = Predictor(["runs/a", "runs/b/export/model"], tta="flip", weights=[2, 1])
    x = p.prepare(open_image(data))      # per model: normalised float (3, S_m, S_m)
    probs = p.forward([x, ...])          # (N, K) float32, weighted mean of each model's TTA-averaged softmax
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from vitforge.data.preprocess import Preprocess
from vitforge.data.streams import ImageInputs
from vitforge.errors import CheckpointError, VitforgeError
from vitforge.eval.ensemble import check_classes, normalize_weights
from vitforge.eval.loading import load_for_inference
from vitforge.eval.predict import autocast_factory
from vitforge.eval.tta import View, check_tta_name, keep_views, trained_invariances, tta_probs, tta_views
from vitforge.runtime import inference_device

log = logging.getLogger("vitforge.serve")


@dataclass
class ServedModel:
    """One loaded model with its own preprocessing and view set."""

    checkpoint: str  # path, as `check_classes` names it
    model: nn.Module
    meta: dict
    inputs: ImageInputs
    views: list[View]
    weight: float

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


class Predictor:
    """Load every model once; `prepare` one image at a time (any thread), `forward` batches (one thread at a time).

    Args:
        sources: run directories, checkpoints, exported folders, .safetensors or .onnx files (several = ensemble).
        tta: view set (`vitforge.eval.tta.TTA_SETS`), averaged per model as `vitforge predict --tta` does.
        weights: one ensemble weight per source (normalised); None = equal.
        device: auto, cpu, cuda, cuda:N or mps.
        max_batch: largest number of images per forward pass (bigger batches are split).

    Raises:
        VitforgeError: an unreadable or mismatching model, a hyperspectral model, bad weights or TTA name (named).
    """

    def __init__(self, sources: list[str], *, tta: str = "none", weights=None, device: str = "auto",
                 max_batch: int = 32):
        if not sources:
            raise VitforgeError("give at least one model: a run directory, checkpoint, exported folder or .onnx")
        check_tta_name(tta)
        w = normalize_weights(weights, len(sources))
        self.device = inference_device(device)
        self.autocast = autocast_factory(self.device)
        self.tta, self.max_batch = tta, max_batch
        self.models: list[ServedModel] = []
        for src, weight in zip(sources, w, strict=True):
            model, meta = load_for_inference(src, device=self.device)
            pre = Preprocess(**meta["preprocess"])
            if pre.kind != "image":
                raise CheckpointError(f"{meta['path']}: the model takes {pre.kind} tensors (e.g. hyperspectral "
                                      "patches), not images; it cannot be served as an image classifier")
            inputs = ImageInputs(pre, self.device)
            every = tta_views(tta, mean=inputs.mean, std=inputs.std)
            views = keep_views(every, **trained_invariances(meta))
            if len(views) < len(every):
                log.warning("%s was trained without flips or random crops: --tta %s uses %d view(s): %s",
                            meta["path"], tta, len(views), ", ".join(v.name for v in views))
            self.models.append(ServedModel(meta["path"], model, meta, inputs, views, weight))
            check_classes([(m.checkpoint, m.classes) for m in self.models])
        self.classes = self.models[0].classes
        self._lock = threading.Lock()

    def prepare(self, img) -> list[torch.Tensor]:
        """An RGB PIL image -> one normalised (3, S, S) tensor per model (each model's own size and statistics)."""
        return [m.inputs(img) for m in self.models]

    @torch.no_grad()
    def forward(self, items: list[list[torch.Tensor]]) -> np.ndarray:
        """Probabilities (N, K) for N prepared images, in chunks of at most `max_batch`."""
        out = []
        ctx = self.autocast or contextlib.nullcontext
        with self._lock:
            for start in range(0, len(items), self.max_batch):
                chunk = items[start:start + self.max_batch]
                total = None
                for j, m in enumerate(self.models):
                    x = torch.stack([item[j] for item in chunk])
                    with ctx():
                        _, avg = tta_probs(m.model, x, m.views)
                    total = avg * m.weight if total is None else total + avg * m.weight
                out.append(total.float().cpu().numpy())
        return np.concatenate(out)

    def info(self) -> dict:
        """What `GET /v1/model` reports: names, classes, input, preprocessing, validation metrics, parameters."""
        models = []
        for m in self.models:
            pre = m.meta["preprocess"]
            models.append({"name": m.meta["model_name"], "source": m.meta["source"], "path": m.meta["path"],
                           "params": int(m.meta["params"]), "input_size": int(pre["img_size"]), "preprocess": pre,
                           "metrics": m.meta.get("metrics"), "weight": m.weight,
                           "tta_views": [v.name for v in m.views]})
        one = len(models) == 1
        return {"name": models[0]["name"] if one else f"ensemble({', '.join(m['name'] for m in models)})",
                "classes": self.classes, "num_classes": len(self.classes), "input_size": models[0]["input_size"],
                "preprocess": models[0]["preprocess"], "params": sum(m["params"] for m in models),
                "metrics": models[0]["metrics"] if one else None, "tta": self.tta, "device": str(self.device),
                "models": models}
