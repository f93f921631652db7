"""`DropPath`: whole samples dropped with probability p, survivors scaled by 1/(1-p); the linear rate schedule."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath as TimmDropPath

from vitforge.models.layers.drop_path import DropPath, drop_path_rates


def test_identity_in_eval_mode_and_at_rate_zero():
    x = torch.randn(4, 3, 5)
    assert DropPath(0.5).eval()(x) is x
    assert DropPath(0.0).train()(x) is x


def test_each_sample_is_dropped_whole_or_kept_and_rescaled():
    torch.manual_seed(0)
    p, n = 0.25, 4000
    x = torch.rand(n, 6, 7) + 0.5  # no zeros in the input
    y = DropPath(p).train()(x)
    kept = (y != 0).flatten(1)
    assert (kept.all(1) | (~kept).all(1)).all()  # a sample is never partly dropped
    k = kept.all(1)
    torch.testing.assert_close(y[k], x[k] / (1 - p), rtol=1e-6, atol=0)
    # fraction kept ~ Binomial(n, 0.75): mean 3000, sd 27.4; 5 sd either side
    assert abs(int(k.sum()) - 3000) < 5 * 27.4
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.02  # unbiased in expectation


def test_same_draws_as_timm_drop_path():
    x = torch.randn(64, 3, 4)
    torch.manual_seed(5)
    ours = DropPath(0.3).train()(x)
    torch.manual_seed(5)
    ref = TimmDropPath(0.3).train()(x)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rate, depth, want", [
    (0.1, 5, [0.0, 0.025, 0.05, 0.075, 0.1]),
    (0.15, 12, [0.15 * i / 11 for i in range(12)]),
    (0.2, 1, [0.2]),
    (0.2, 0, []),
])
def test_linear_schedule_over_depth(rate, depth, want):
    assert drop_path_rates(rate, depth) == pytest.approx(want)
