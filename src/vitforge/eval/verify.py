"""Attention verification: per attention module, the shapes of Q, K, V, A, O and the softmax check.

The check asked of a from-scratch ViT in AnanasClassic/ViT_SE_project (README: logged Q, K, V, A, O shapes and
softmax rows summing to 1 within 1e-4); for `minivit_cifar` Q, K, V are (B, 12, 66, 8) and A is (B, 12, 66, 66).

Every hand-written attention module (`Attention`, `ClassAttention`, `TalkingHeadAttention`) has a `record` slot:
when it holds a dict, the next forward takes the explicit-softmax path and writes the shapes and
max |row-sum(A) − 1| into it. `check_attention` switches the slot on everywhere, runs one batch, and restores the
model (records off, train/eval mode as before).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitforge.models.registry import create_model

SOFTMAX_TOL = 1e-4
_KEYS = ("Q", "K", "V", "A", "O", "softmax_max_err")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module with a `record` slot, in registration order."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "record")]


def _shapes_consistent(r: dict) -> bool:
    """Q (B, h, Nq, d), K/V (B, h, N, d), A (B, h, Nq, N), O (B, Nq, h·d)."""
    (B, h, nq, d), k, v, a, o = r["Q"], r["K"], r["V"], r["A"], r["O"]
    return k == v and k[:2] == (B, h) and a == (B, h, nq, k[2]) and o == (B, nq, h * v[3]) and k[3] == d


def _block_report(name: str, record: dict) -> dict:
    if not all(key in record for key in _KEYS):
        return {"name": name, "ok": False, "error": "did not run in the forward pass"}
    ok = record["softmax_max_err"] < SOFTMAX_TOL and _shapes_consistent(record)
    shapes = {key: list(record[key]) for key in ("Q", "K", "V", "A", "O")}
    return {"name": name, **shapes, "softmax_max_err": record["softmax_max_err"], "ok": ok}


def check_attention(model: nn.Module, images: torch.Tensor) -> dict:
    """Run one batch with attention recording on and check every attention module.

    Args:
        model: any classifier; modules without a `record` slot are not checked.
        images: a batch (B, C, H, W) on the model's device.

    Returns:
        {"ok", "blocks": [{"name", "Q", "K", "V", "A", "O", "softmax_max_err", "ok"}], "max_err"}; a model without
        hand-written attention gives {"ok": True, "blocks": [], "max_err": 0.0, "note": ...}.
    """
    modules = attention_modules(model)
    if not modules:
        return {"ok": True, "blocks": [], "max_err": 0.0, "note": "no hand-written attention modules to check"}
    was_training, saved = model.training, [m.record for _, m in modules]
    try:
        for _, m in modules:
            m.record = {}
        model.eval()
        with torch.no_grad():
            model(images)
        blocks = [_block_report(name, m.record) for name, m in modules]
    finally:
        for (_, m), rec in zip(modules, saved, strict=True):
            m.record = rec
        model.train(was_training)
    errs = [b["softmax_max_err"] for b in blocks if "softmax_max_err" in b]
    return {"ok": all(b["ok"] for b in blocks), "blocks": blocks, "max_err": max(errs, default=0.0)}


def run_verify_attention(
    model_name: str, *, batch_size: int = 2, model_args: dict | None = None, seed: int = 0
) -> dict:
    """Build `model_name` and check its attention on one random batch of its own input size.

    Args:
        model_name: a registered name (or `timm:<name>`).
        batch_size: images in the batch.
        model_args: constructor overrides (`num_classes`, `img_size`, ...).
        seed: seeds the weights and the batch.

    Returns:
        The `check_attention` report plus "model" and "input_size".
    """
    torch.manual_seed(seed)
    model = create_model(model_name, **(model_args or {}))
    input_size = tuple(model.pretrained_cfg["input_size"])
    images = torch.randn(batch_size, *input_size)
    return {"model": model_name, "input_size": list(input_size), **check_attention(model, images)}
