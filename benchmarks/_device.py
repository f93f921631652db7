"""Small helpers shared by the benchmarks: a short device tag for result names, and device synchronisation."""

from __future__ import annotations

import torch

from vitforge.runtime import synchronize as sync  # noqa: F401  (CUDA and MPS; the benchmarks' name)

KNOWN_GPUS = ("h100", "h200", "a100", "l40", "l4", "a10")


def device_tag(device: torch.device) -> str:
    """`cpu`, or the GPU family (`h100`, `h200`, ...) for result file names, `cuda` if unknown."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return next((k for k in KNOWN_GPUS if k in name), "cuda")
