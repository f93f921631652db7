"""Normalisation constants and the version, each defined once: ImageNet statistics agree with timm and torchvision,
CIFAR-10's with the training images, the version with pyproject.toml."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import timm.data
import torchvision
from PIL import Image

from vitforge import __version__, constants
from vitforge.version import __version__ as version


def test_imagenet_statistics_are_the_ones_pretrained_weights_expect():
    assert constants.IMAGENET_MEAN == timm.data.IMAGENET_DEFAULT_MEAN
    assert constants.IMAGENET_STD == timm.data.IMAGENET_DEFAULT_STD
    tv = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert list(constants.IMAGENET_MEAN) == tv.mean and list(constants.IMAGENET_STD) == tv.std
    assert constants.IMAGENET_NORM == {"mean": constants.IMAGENET_MEAN, "std": constants.IMAGENET_STD}


def test_cifar10_statistics_match_the_training_images(cifar_parquet):
    """Per-channel mean/std (0-1 scale) of every 10th training image, within 0.003 of the values written down (this
    JPEG copy differs from the PNG original by compression noise)."""
    rows = pq.read_table(cifar_parquet, columns=["img"]).column("img").to_pylist()[::10]
    x = np.stack([np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows]) / 255.0
    assert np.abs(x.mean(axis=(0, 1, 2)) - constants.CIFAR10_MEAN).max() < 3e-3
    assert np.abs(x.std(axis=(0, 1, 2)) - constants.CIFAR10_STD).max() < 3e-3
    assert constants.CIFAR10_NORM == {"mean": constants.CIFAR10_MEAN, "std": constants.CIFAR10_STD}


def test_one_version_string():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert __version__ == version == project["version"]
