"""Attention training on a CPU with dropout: the manual path computes what PyTorch's SDPA math fallback computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitforge.models.layers import attention as A


def _run(layer, x, bias, seed, manual_for_cpu_dropout, monkeypatch):
    monkeypatch.setattr(A, "MANUAL_FOR_CPU_DROPOUT", manual_for_cpu_dropout)
    torch.manual_seed(seed)
    xx = x.clone().requires_grad_(True)
    out = layer(xx, bias)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()] + [xx.grad.clone()]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_dropout_path_matches_torch_sdpa_same_draws(monkeypatch, with_bias):
    torch.manual_seed(0)
    layer = A.Attention(24, num_heads=3, attn_drop=0.3, proj_drop=0.1, impl="sdpa").train()
    x = torch.randn(5, 7, 24)
    bias = torch.randn(1, 3, 7, 7) if with_bias else None
    ours, g_ours = _run(layer, x, bias, 11, True, monkeypatch)
    ref, g_ref = _run(layer, x, bias, 11, False, monkeypatch)  # PyTorch's math fallback, same seed
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    for a, b in zip(g_ours, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    other, _ = _run(layer, x, bias, 12, True, monkeypatch)  # the dropout draws do depend on the seed
    assert not torch.allclose(ours, other, atol=1e-3)


def test_cpu_dropout_takes_the_manual_path_only_when_training_with_dropout(monkeypatch):
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 5, 16)
    with_drop = A.Attention(16, num_heads=2, attn_drop=0.1, impl="sdpa")
    with_drop.train()(x)
    assert calls == []  # training on a CPU with dropout: manual path
    with_drop.eval()(x)
    assert calls == [0.0]  # evaluation: no dropout, PyTorch's SDPA
    A.Attention(16, num_heads=2, attn_drop=0.0, impl="sdpa").train()(x)
    assert calls == [0.0, 0.0]  # no attention dropout: PyTorch's SDPA
    monkeypatch.setattr(A, "MANUAL_FOR_CPU_DROPOUT", False)
    with_drop.train()(x)
    assert calls == [0.0, 0.0, 0.1]
