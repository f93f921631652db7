"""How a model's inputs are made (`Preprocess`, stored in every checkpoint) and how a run chooses it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vitforge.config import DataConfig
from vitforge.constants import IMAGENET_MEAN, IMAGENET_STD
from vitforge.data.dataset import FeatureSource, Split
from vitforge.data.decoded import decode_split, native_size


@dataclass
class Preprocess:
    """How a model's inputs are made; stored in every checkpoint."""

    img_size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    kind: str = "image"  # "image": uint8 RGB normalised here; "features": float tensors used as they are (HSI)

    def to_dict(self) -> dict:
        return asdict(self)


def channel_stats(images: torch.Tensor, limit: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-1 scale) of up to `limit` uint8 images (N, 3, H, W), spread over the whole set
    (sources are often sorted by class)."""
    x = images[:: max(1, -(-len(images) // limit))].float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def resolve_preprocess(cfg: DataConfig, split: Split, model_cfg: dict, *, pretrained: bool,
                       device_cache: bool, cache_dir: Path | None) -> Preprocess:
    """Input size and normalisation: explicit config > the model's pretrained config > training-set statistics
    (small images) > ImageNet's. Feature tensors (hyperspectral patches) are used as they are."""
    if isinstance(split.source, FeatureSource):
        return Preprocess(int(split.source.features.shape[-1]), [0.0] * 3, [1.0] * 3, kind="features")
    size = cfg.img_size or int(model_cfg.get("input_size", (3, 0, 0))[-1]) or native_size(split.source) or 224
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:
        if pretrained and "mean" in model_cfg:
            m, s = list(model_cfg["mean"]), list(model_cfg["std"])
        elif device_cache:
            c = decode_split(split, size=None, device=torch.device("cpu"), cache_dir=cache_dir)
            m, s = channel_stats(c.images)
        else:
            m, s = IMAGENET_MEAN, IMAGENET_STD
        mean, std = mean or m, std or s
    interp = model_cfg.get("interpolation", cfg.interpolation) if pretrained else cfg.interpolation
    crop = model_cfg.get("crop_pct", cfg.crop_pct) if pretrained and cfg.crop_pct == 1.0 else cfg.crop_pct
    return Preprocess(int(size), [float(v) for v in mean], [float(v) for v in std], interp, float(crop))
