"""Classification losses. Every criterion is called as `criterion(outputs, target, images)`.

`outputs` is a logits tensor (B, K), or a tuple of logits for multi-head models in training mode (e.g. a distilled
ViT returns (cls_logits, dist_logits)). `target` is either class indices (B,) or soft targets (B, K) produced by
Mixup/CutMix (which already include label smoothing). `images` is the (possibly mixed) batch the model saw; a
distillation criterion feeds it to its teacher.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of -sum_k target_k log softmax(logits)_k (optionally class-weighted)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if weight is not None:
        logp = logp * weight
    return -(target * logp).sum(dim=-1).mean()


class ClassificationLoss(nn.Module):
    """Cross-entropy with label smoothing on hard targets, soft-target CE on mixed targets.

    For a tuple of head outputs (a multi-head model trained without a teacher) the loss is the mean over heads.

    Args:
        label_smoothing: smoothing for hard targets (mixed targets carry their own); the trainer may change it
            between epochs (smoothing schedule).
        weight: optional per-class weights (K,) for imbalanced data.
    """

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dtype.is_floating_point:
            return soft_cross_entropy(logits, target, self.weight)
        return F.cross_entropy(logits.float(), target, weight=self.weight, label_smoothing=self.label_smoothing)

    def forward(self, outputs, target: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            return sum(self.single(o, target) for o in outputs) / len(outputs)
        return self.single(outputs, target)
