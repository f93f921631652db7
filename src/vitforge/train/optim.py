"""Optimizers, parameter groups and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn

from vitforge.config import Config, OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig, layer_id=None, num_layers: int | None = None) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups (biases, norms, 1-D tensors, `no_weight_decay()`).

    With `cfg.layer_decay` and a `layer_id(name) -> int` function, each layer gets its own group whose
    `lr_scale` = layer_decay ** (num_layers - layer_id), the fine-tuning recipe of BEiT/timm.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = cfg.no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias") or _matches(name, skip))
        layer = layer_id(name) if (cfg.layer_decay and layer_id) else 0
        scale = cfg.layer_decay ** (num_layers - layer) if (cfg.layer_decay and layer_id) else 1.0
        key = (no_decay, layer)
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                                    "lr_scale": scale, "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def _matches(name: str, skip: set[str]) -> bool:
    return name in skip or any(name.startswith(s + ".") or name.endswith("." + s) for s in skip)


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, SGD (Nesterov) or LAMB (timm's implementation). Fused kernels on CUDA unless disabled."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    if cfg.name == "adamw":
        return torch.optim.AdamW(clean, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=fused or None)
    if cfg.name == "sgd":
        return torch.optim.SGD(clean, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, fused=fused or None)
    from timm.optim import Lamb

    return Lamb(clean, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_at(step: int, *, total: int, warmup: int, peak: float, cfg: ScheduleConfig, head_steps: int = 0,
          head_lr: float | None = None) -> float:
    """The learning rate at optimizer step `step` (0-based): the whole schedule, in one place.

    The first `head_steps` steps (the head-only phase of two-phase fine-tuning) run at a constant `head_lr` (or
    `peak`). The rest is its own schedule: linear warmup over `warmup` steps from warmup_start·peak, then the decay
    shape (`cfg.name`: cosine, linear or constant) down to `cfg.min_lr` at step `total`.
    """
    if step < head_steps:
        return head_lr or peak
    step, total = step - head_steps, total - head_steps
    if warmup > 0 and step < warmup:
        start = cfg.warmup_start * peak
        return start + (peak - start) * step / warmup
    if cfg.name == "constant" or total <= warmup:
        return peak
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.name == "linear":
        return cfg.min_lr + (peak - cfg.min_lr) * (1 - t)
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * t))


def lr_schedule(cfg: Config, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """`lr_at` with this run's settings (optim.lr, schedule.*, train.head_epochs/head_lr) turned into steps:
    a function of the optimizer step alone."""
    return functools.partial(lr_at, total=total_steps, warmup=int(round(cfg.schedule.warmup_epochs * steps_per_epoch)),
                             peak=cfg.optim.lr, cfg=cfg.schedule, head_steps=cfg.train.head_epochs * steps_per_epoch,
                             head_lr=cfg.train.head_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
