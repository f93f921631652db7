"""`create_mambavision_tiny/small/base`: the familiar entry-point names map to the official T/S/B variants."""

from __future__ import annotations

import pytest
import torch

import vitforge
from vitforge.models.mambavision import MambaVision
from vitforge.models.registry import create_model

ALIASES = [("create_mambavision_tiny", "mambavision_t", 31_794_248),
           ("create_mambavision_small", "mambavision_s", 50_140_584),
           ("create_mambavision_base", "mambavision_b", 97_685_288)]


@pytest.mark.parametrize("alias, official, params", ALIASES)
def test_alias_builds_the_official_variant(alias, official, params):
    fn = getattr(vitforge, alias)
    assert fn is getattr(vitforge.models.mambavision, alias)
    assert official in fn.__doc__ and f"{params:,}" in fn.__doc__
    with torch.device("meta"):
        m = fn()
        ref = create_model(official)
        small = fn(num_classes=10, drop_path_rate=0.0)
    assert isinstance(m, MambaVision)
    assert sum(p.numel() for p in m.parameters()) == params
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert small.head.out_features == 10


def test_tiny_alias_equals_mambavision_t_weight_for_weight():
    torch.manual_seed(0)
    a = vitforge.create_mambavision_tiny(num_classes=10, img_size=64)
    torch.manual_seed(0)
    b = create_model("mambavision_t", num_classes=10, img_size=64)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert a.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
