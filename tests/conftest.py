"""Shared test set-up: one intra-op thread per test process (tiny ops are slower with more threads, and CI runs
two pytest workers on two cores), a private cache directory, and small synthetic datasets."""

from __future__ import annotations

import io
import json
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


def write_cifar_like_parquet(path: Path, n: int = 160, classes: int = 10) -> Path:
    """A Hugging Face image parquet (img struct {bytes, path} + label, class names in the schema metadata) of
    32x32 JPEGs whose colour depends on the class."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    rows = []
    for i, k in enumerate(labels):
        img = (rng.integers(0, 60, (32, 32, 3)) + k * 19).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        rows.append({"bytes": buf.getvalue(), "path": f"{k}/{i:04d}.jpg"})
    names = [f"class{k}" for k in range(classes)]
    meta = {"info": {"features": {"img": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}}
    table = pa.table({"img": rows, "label": labels.astype(np.int64)})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), path)
    return path
