"""Fixed sin-cos tables: values from the formula, layout [w half | h half], raster token order."""

from __future__ import annotations

import math

import pytest
import torch

from vitforge.models.layers.pos_embed import sincos_1d, sincos_2d


def test_1d_table_by_hand():
    """dim 4: frequencies 10000^0 = 1 and 10000^(-2/4) = 0.01; even columns sin, odd columns cos."""
    got = sincos_1d(torch.tensor([0, 1, 2]), 4)
    want = torch.tensor([[math.sin(p), math.cos(p), math.sin(0.01 * p), math.cos(0.01 * p)] for p in (0, 1, 2)])
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_2d_table_concatenates_column_then_row_codes():
    gh, gw, dim = 2, 3, 8
    t = sincos_2d(gh, gw, dim)
    assert t.shape == (gh * gw, dim)
    for h in range(gh):
        for w in range(gw):
            row = t[h * gw + w]  # raster order: token h·gw + w
            torch.testing.assert_close(row[:4], sincos_1d(torch.tensor([w]), 4)[0])
            torch.testing.assert_close(row[4:], sincos_1d(torch.tensor([h]), 4)[0])


def test_minivit_table():
    """8 x 8 grid, D 96: 48 column channels then 48 row channels; token (0, 0) is [0, 1, 0, 1, ...]."""
    t = sincos_2d(8, 8, 96)
    assert t.shape == (64, 96)
    assert torch.equal(t[0, 0::2], torch.zeros(48)) and torch.equal(t[0, 1::2], torch.ones(48))
    torch.testing.assert_close(t[8 * 3 + 5, 0], torch.tensor(math.sin(5.0)))  # column 5: first channel sin(w)
    torch.testing.assert_close(t[8 * 3 + 5, 48], torch.tensor(math.sin(3.0)))  # row 3: first row channel sin(h)


def test_widths_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match="^sin-cos width must be even, got 5$"):
        sincos_1d(torch.arange(3), 5)
    with pytest.raises(ValueError, match="^2-D sin-cos width must be divisible by 4, got 6$"):
        sincos_2d(2, 2, 6)
