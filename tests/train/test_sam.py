"""SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021) and ASAM
(Kwon et al., ICML 2021): the perturbation, its undoing, the two-pass gradient, BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vitforge.train import sam


def params_with_grads(*shapes, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64))
        p.grad = torch.randn(*s, generator=g, dtype=torch.float64)
        ps.append(p)
    return ps


def test_perturbation_is_rho_times_the_unit_gradient_over_all_parameters():
    ps = params_with_grads((3, 4), (5,), (2, 2, 2))
    w0 = [p.detach().clone() for p in ps]
    norm = torch.sqrt(sum((p.grad**2).sum() for p in ps))  # one norm over every parameter, not per tensor
    eps = sam.perturb(ps, rho=0.05, adaptive=False)
    for p, w, e in zip(ps, w0, eps, strict=True):
        torch.testing.assert_close(e, 0.05 * p.grad / norm, rtol=1e-6, atol=0)  # the norm is taken in float32
        torch.testing.assert_close(p.detach(), w + e, rtol=0, atol=0)
    assert torch.sqrt(sum((e**2).sum() for e in eps)).item() == pytest.approx(0.05, rel=1e-6)
    sam.restore(ps, eps)
    for p, w in zip(ps, w0, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-15)


def test_adaptive_perturbation_by_hand():
    """ASAM: e = rho·w²·g / || |w|·g ||."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    p.grad = torch.tensor([3.0, 1.0, -4.0], dtype=torch.float64)
    norm = torch.tensor([3.0, 2.0, 2.0]).norm().item()  # |w|·g = (3, -2, -2) up to sign: sqrt(17)
    (e,) = sam.perturb([p], rho=0.1, adaptive=True)
    want = 0.1 * torch.tensor([1.0 * 3.0, 4.0 * 1.0, 0.25 * -4.0], dtype=torch.float64) / norm
    torch.testing.assert_close(e, want, rtol=1e-6, atol=0)


def test_parameters_without_gradients_are_left_alone():
    a, b = params_with_grads((4,), (4,))
    b.grad = None
    b0 = b.detach().clone()
    eps = sam.perturb([a, b], rho=1.0, adaptive=False)
    assert eps[1] is None and torch.equal(b.detach(), b0)
    assert eps[0].norm().item() == pytest.approx(1.0)
    a.grad = None
    a0 = a.detach().clone()
    assert sam.perturb([a, b], rho=1.0, adaptive=False) == [None, None] and torch.equal(a.detach(), a0)


def test_two_pass_step_uses_the_gradient_at_the_perturbed_point():
    """L(w) = ½ wᵀAw: the second pass must see A(w + ρ·Aw/||Aw||) and leave the weights at w."""
    torch.manual_seed(0)
    M = torch.randn(4, 4, dtype=torch.float64)
    A = M @ M.T + torch.eye(4, dtype=torch.float64)
    w = nn.Parameter(torch.randn(4, dtype=torch.float64))
    w0 = w.detach().clone()
    loss = lambda: 0.5 * w @ A @ w  # noqa: E731
    loss().backward()
    g1 = A @ w0
    torch.testing.assert_close(w.grad, g1)
    eps = sam.perturb([w], rho=0.2, adaptive=False)
    w.grad = None
    loss().backward()
    sam.restore([w], eps)
    torch.testing.assert_close(w.grad, A @ (w0 + 0.2 * g1 / g1.norm()), rtol=1e-6, atol=0)
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=1e-15)


def test_grads_finite():
    a, b = params_with_grads((3,), (2,))
    assert sam.grads_finite([a, b])
    b.grad[1] = float("inf")
    assert not sam.grads_finite([a, b])
    b.grad[1] = float("nan")
    assert not sam.grads_finite([a, b])
    a.grad, b.grad = None, None
    assert sam.grads_finite([a, b])


def test_batch_norm_statistics_are_frozen_during_the_second_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4, momentum=None)).train()
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    bn1, bn2 = model[1], model[3]
    before = [b.running_mean.clone() for b in (bn1, bn2)] + [b.running_var.clone() for b in (bn1, bn2)]
    with sam.frozen_norm_stats(model):
        assert bn1.momentum == 0.0 and bn2.momentum == 0.0
        model(x)
    after = [b.running_mean for b in (bn1, bn2)] + [b.running_var for b in (bn1, bn2)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert bn1.momentum == 0.1 and bn2.momentum is None  # restored
    model(x)
    assert not torch.equal(bn1.running_mean, before[0])  # outside the context a forward updates them again


def test_momentum_is_restored_after_an_error():
    model = nn.BatchNorm1d(3, momentum=0.3)
    with pytest.raises(RuntimeError, match="boom"), sam.frozen_norm_stats(model):
        raise RuntimeError("boom")
    assert model.momentum == 0.3
