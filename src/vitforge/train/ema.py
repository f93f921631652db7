"""Exponential moving average of a model's weights and float buffers, with a decay warm-up.

Warm-up rules (the n-th update, n = 0, 1, ...; the configured decay is an upper bound):
    tf     d_n = min(decay, (1 + n) / (10 + n))          TensorFlow's `tf.train.ExponentialMovingAverage` with
                                                         `num_updates`; the initial weights keep a share of
                                                         prod_k d_k = 9!·n!/(n + 9)! after n updates (~1e-11 at 48)
    power  d_n = min(decay, 1 - (1 + n / gamma)^-power)  timm `timm/utils/model_ema.py` `ModelEmaV3.get_decay`
                                                         (after Katherine Crowson); d_0 = 0: the first update copies
    off    d_n = decay                                   after n updates the initial weights keep decay^n
                                                         (0.999^48 = 95%: a short run's average is the init)
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

WARMUPS = ("tf", "power", "off")


def warmup_decay(decay: float, n: int, rule: str = "tf", *, power: float = 0.75, gamma: float = 1.0) -> float:
    """Decay for the n-th update (0-based) under a warm-up `rule` (see the module docstring)."""
    if rule == "tf":
        return min(decay, (1 + n) / (10 + n))
    if rule == "power":
        return min(decay, 1.0 - (1.0 + n / gamma) ** -power)
    if rule == "off":
        return decay
    raise ValueError(f"unknown EMA warm-up rule {rule!r}; expected one of {', '.join(WARMUPS)}")


class ModelEma(nn.Module):
    """A frozen copy whose float tensors track ema = d·ema + (1-d)·model after each update.

    The update count is a buffer (`num_updates`), so it is saved with the EMA weights and a resumed run continues
    the warm-up exactly where it stopped.

    Args:
        model: the model being trained (unwrapped), in its initial state.
        warmup: "tf", "power" or "off" (see the module docstring); True/False mean "tf"/"off".
        power, gamma: parameters of the "power" rule.
    """

    def __init__(self, model: nn.Module, warmup: str | bool = "tf", *, power: float = 0.75,
                 gamma: float = 1.0) -> None:
        super().__init__()
        rule = {True: "tf", False: "off"}.get(warmup, warmup) if isinstance(warmup, bool) else warmup
        warmup_decay(0.5, 0, rule)  # rejects an unknown rule here, not at the first update
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.rule, self.power, self.gamma = rule, power, gamma
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def effective_decay(self, decay: float) -> float:
        """The decay the next update will use."""
        return warmup_decay(decay, int(self.num_updates), self.rule, power=self.power, gamma=self.gamma)

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
