"""Sharpness-aware minimisation (Foret et al. 2021) as two functions around the usual backward pass.

    grads of L(w)  ->  e = rho·g/||g|| (ASAM: rho·|w|²·g/|| |w|·g ||)  ->  w += e  ->  grads of L(w + e)  ->  w -= e
    -> optimizer step with the second gradients.

Works with gradient accumulation (the perturbation uses the accumulated gradient of the whole step), AMP (gradients
are unscaled first) and clipping (applied to the second gradients by the caller).
"""

from __future__ import annotations

import contextlib

import torch


@torch.no_grad()
def perturb(params: list[torch.nn.Parameter], rho: float, adaptive: bool) -> list[torch.Tensor | None]:
    """Move each parameter to w + e(w) and return the perturbations (to undo them later)."""
    grads = [p.grad for p in params]
    scaled = [(p.abs() * g if adaptive else g) for p, g in zip(params, grads, strict=True) if g is not None]
    if not scaled:
        return [None] * len(params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
    scale = rho / (norm + 1e-12)
    eps: list[torch.Tensor | None] = []
    for p, g in zip(params, grads, strict=True):
        if g is None:
            eps.append(None)
            continue
        e = (p.pow(2) * g if adaptive else g) * scale.to(p.dtype)
        p.add_(e)
        eps.append(e)
    return eps


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], eps: list[torch.Tensor | None]) -> None:
    for p, e in zip(params, eps, strict=True):
        if e is not None:
            p.sub_(e)


def grads_finite(params: list[torch.nn.Parameter]) -> bool:
    """True when every gradient is finite (one host sync; only used with fp16 loss scaling)."""
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


@contextlib.contextmanager
def frozen_norm_stats(model: torch.nn.Module):
    """Batch-norm layers keep their running statistics during SAM's second pass (momentum 0), so each batch updates
    them once, as in a plain step."""
    saved = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum
