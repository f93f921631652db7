"""`Mlp`: Linear -> GELU -> Linear, against the matrix products written out and against timm's `Mlp`."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Mlp as TimmMlp

from vitforge.models.layers.mlp import Mlp


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # exact (erf) GELU


def test_equals_the_two_matrix_products():
    torch.manual_seed(0)
    mlp = Mlp(6, hidden_features=10, out_features=4).double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    w1, b1, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    want = gelu(x @ w1.T + b1) @ w2.T + b2
    got = mlp(x)
    assert got.shape == (2, 5, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias, keys", [
    (True, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]),
    (False, ["fc1.weight", "fc2.weight"]),
    ((False, True), ["fc1.weight", "fc2.weight", "fc2.bias"]),
])
def test_bias_switches_and_timm_key_names(bias, keys):
    mlp = Mlp(8, hidden_features=16, bias=bias)
    assert list(mlp.state_dict()) == keys
    assert sum(p.numel() for p in mlp.parameters()) == 2 * 8 * 16 + ("fc1.bias" in keys) * 16 + ("fc2.bias" in keys) * 8


def test_same_function_as_timm_mlp_with_the_same_weights():
    torch.manual_seed(1)
    ours = Mlp(12, hidden_features=24, bias=(False, True)).eval()
    ref = TimmMlp(12, hidden_features=24, bias=(False, True)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 7, 12)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_dropout_only_in_training():
    torch.manual_seed(2)
    mlp = Mlp(4, hidden_features=64, drop=0.5)
    x = torch.randn(1, 32, 4)
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))
    mlp.train()
    torch.manual_seed(3)
    a = mlp(x)
    torch.manual_seed(4)
    assert not torch.allclose(a, mlp(x))
