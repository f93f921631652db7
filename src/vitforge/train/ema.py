"""Exponential moving average of a model's weights and float buffers."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma(nn.Module):
    """A frozen copy whose float tensors track ema = d·ema + (1-d)·model after each update.

    Args:
        model: the model being trained (unwrapped).
        warmup: use min(d, (1 + n)/(10 + n)) for the n-th update, so a short run's average is not dominated by
            the random initial weights (TensorFlow's num_updates rule).
    """

    def __init__(self, model: nn.Module, warmup: bool = True) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def effective_decay(self, decay: float) -> float:
        n = int(self.num_updates)
        return min(decay, (1 + n) / (10 + n)) if self.warmup else decay

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        d = self.effective_decay(decay)
        ema_t = list(self.module.state_dict().values())
        src_t = list(model.state_dict().values())
        floats = [(e, s) for e, s in zip(ema_t, src_t, strict=True) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [s.detach() for _, s in floats], 1.0 - d)
        for e, s in zip(ema_t, src_t, strict=True):
            if not e.is_floating_point():
                e.copy_(s)
        self.num_updates += 1


def ema_decay_at(epoch: int, epochs: int, start: float, end: float | None) -> float:
    """Decay for `epoch`: constant `start`, or a linear ramp start -> end over the run.

    The ramp is the one of the CIFAR-10 KD ViT in kiki101robo/AIRL_VIT-and-SAM2 (`q1.ipynb`): 0.995 -> 0.9995 per
    epoch, e.g. 0.995 + 0.0045·epoch/(epochs − 1).
    """
    if end is None or epochs <= 1:
        return start
    return start + (end - start) * epoch / (epochs - 1)
