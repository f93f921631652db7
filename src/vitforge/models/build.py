"""Build the model a config describes (and rebuild it from a checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from vitforge.config import Config
from vitforge.errors import ConfigError
from vitforge.models.registry import create_model


def model_kwargs(cfg: Config, *, num_classes: int) -> dict:
    """Constructor arguments implied by the config: model.args + classes + input size + drop path + head dropout.

    Raises:
        ConfigError: `model.head_dropout` for a model other than a timm:/tv: backbone.
    """
    kwargs = dict(cfg.model.args)
    kwargs["num_classes"] = num_classes
    if cfg.data.img_size is not None:
        kwargs.setdefault("img_size", cfg.data.img_size)
    if cfg.model.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    if cfg.model.head_dropout is not None:
        if not cfg.model.name.startswith(("timm:", "tv:")):
            raise ConfigError(f"model.head_dropout: only for timm:<name> and tv:<name> backbones; {cfg.model.name} "
                              f"sets its dropout through model.args (e.g. model.args.drop_rate)")
        kwargs["head_dropout"] = cfg.model.head_dropout
    if Path(cfg.data.train).suffix.lower() in (".mat", ".npy"):  # hyperspectral patches fix the input geometry
        kwargs.setdefault("img_size", cfg.data.hsi.patch_size)
        kwargs.setdefault("pca_bands", cfg.data.hsi.pca_components)
    return kwargs


def build_model(name: str, kwargs: dict) -> nn.Module:
    """`create_model` plus the arguments recorded on the module (checkpoints store them with the name)."""
    model = create_model(name, **kwargs)
    model.vitforge_kwargs = dict(kwargs)  # type: ignore[attr-defined]
    return model


def model_input_cfg(model: nn.Module) -> dict:
    """The model's preprocessing hints (`input_size`, `mean`, `std`, `interpolation`, `crop_pct`) if it has them."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return dict(cfg)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)
