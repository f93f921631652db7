"""Run a model over an evaluation stream and gather its logits from every rank (metrics: `vitforge.eval.metrics`)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from vitforge.eval.metrics import topk_metrics
from vitforge.runtime import gather_cat


@torch.no_grad()
def collect_logits(model: nn.Module, stream, *, autocast=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, K) float32, labels (N,), idx (N,)) over the whole stream, gathered from every rank.

    A model that returns several heads in eval mode is averaged (DeiT convention); models are put in eval mode.
    """
    was_training = model.training
    model.eval()
    outs, labels, idxs = [], [], []
    ctx = autocast or contextlib.nullcontext
    for x, y, idx in stream:
        with ctx():
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = torch.stack([o.float() for o in out]).mean(0)
        outs.append(out.float())
        labels.append(y)
        idxs.append(idx)
    model.train(was_training)
    dev = next(iter(model.parameters())).device
    # A rank whose shard is empty still joins the gather, with the right number of columns.
    k = outs[0].shape[1] if outs else int(getattr(model, "num_classes", 0) or getattr(
        getattr(model, "module", model), "num_classes", 0))
    logits = torch.cat(outs) if outs else torch.zeros(0, k, device=dev)
    lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=dev)
    idx = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long, device=dev)
    return gather_cat(logits), gather_cat(lab), gather_cat(idx)


def evaluate(model: nn.Module, stream, num_classes: int, *, autocast=None) -> dict:
    logits, labels, _ = collect_logits(model, stream, autocast=autocast)
    return topk_metrics(logits, labels, num_classes)
