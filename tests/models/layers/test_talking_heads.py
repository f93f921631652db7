"""`TalkingHeadAttention` (CaiT): head mixing before and after the softmax, by hand and against timm."""

from __future__ import annotations

import torch
from timm.models.cait import TalkingHeadAttn

from vitforge.models.layers.talking_heads import TalkingHeadAttention


def test_equals_the_formula_written_out():
    torch.manual_seed(0)
    m = TalkingHeadAttention(12, num_heads=3).double().eval()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    B, N, D, h, d = 2, 5, 12, 3, 4
    qkv = x @ m.qkv.weight.T + m.qkv.bias
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, N, h, d).transpose(1, 2) for i in range(3))
    logits = (q @ k.transpose(-1, -2)) * d**-0.5  # (B, h, N, N)
    logits = torch.einsum("gh,bhnm->bgnm", m.proj_l.weight, logits) + m.proj_l.bias[None, :, None, None]
    a = logits.softmax(-1)
    a = torch.einsum("gh,bhnm->bgnm", m.proj_w.weight, a) + m.proj_w.bias[None, :, None, None]
    want = (a @ v).transpose(1, 2).reshape(B, N, D) @ m.proj.weight.T + m.proj.bias
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-12)


def test_same_function_and_keys_as_timm():
    torch.manual_seed(1)
    ours = TalkingHeadAttention(16, num_heads=4, qkv_bias=True).eval()
    ref = TalkingHeadAttn(16, num_heads=4, qkv_bias=True).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_record_checks_the_softmax_before_the_post_mix():
    torch.manual_seed(2)
    m = TalkingHeadAttention(8, num_heads=2).eval()
    m.record = {}
    m(torch.randn(3, 4, 8))
    r = m.record
    assert r["Q"] == r["K"] == r["V"] == (3, 2, 4, 4) and r["A"] == (3, 2, 4, 4) and r["O"] == (3, 4, 8)
    assert r["softmax_max_err"] < 1e-6
