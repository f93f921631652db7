"""A CPU run uses no more intra-op threads than the cores it may use, and keeps a count the user chose."""

from __future__ import annotations

import torch

from vitforge import runtime
from vitforge.config import load_config
from vitforge.train.setup import build

TINY = ["model.name=vit_demo", "data.train=digits", "data.limit=64", "data.val_split=0", "data.batch_size=16",
        "train.device=cpu", "run.progress=none"]


def test_cpu_run_caps_threads_at_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
        torch.set_num_threads(2)
        build(load_config(None, TINY))
        assert torch.get_num_threads() == 1  # PyTorch's default (machine cores) lowered to the usable cores
        torch.set_num_threads(2)
        build(load_config(None, [*TINY, "train.threads=2"]))
        assert torch.get_num_threads() == 2  # an explicit train.threads is the user's choice
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
        torch.set_num_threads(1)
        build(load_config(None, TINY))
        assert torch.get_num_threads() == 1  # never raised
    finally:
        torch.set_num_threads(before)


def test_cap_cpu_threads_returns_the_count_in_effect(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
        torch.set_num_threads(2)
        assert runtime.cap_cpu_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
