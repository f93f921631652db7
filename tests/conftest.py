"""Shared test set-up: one intra-op thread per test process (tiny ops are slower with more threads, and CI runs
two pytest workers on two cores), a private cache directory, and small synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)
SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train.parquet"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VITFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "vitforge-cache"))


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 12, size: int = 16,
                      seed: int = 0, ext: str = "png") -> Path:
    """root/<class>/<i>.<ext> with class-dependent colours (learnable), RGB."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), dtype=np.float64)
            base[..., k % 3] = 180
            img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i:03d}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "train")


@pytest.fixture
def cifar_parquet() -> Path:
    if not SHARED_CIFAR.exists():
        pytest.skip(f"{SHARED_CIFAR} not present")
    return SHARED_CIFAR


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
