"""`Block`: pre-norm attention and MLP residuals with LayerScale, written out by hand and against timm's `Block`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as TimmBlock

from vitforge.models.layers.block import Block, LayerScale


def manual_block(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """x + γ1·proj(softmax(q kᵀ/√d) v) on LN1(x), then x + γ2·fc2(GELU(fc1(LN2(x)))), from the raw weights."""
    B, N, D = x.shape
    h = blk.attn.num_heads
    d = D // h
    g1 = blk.ls1.gamma if isinstance(blk.ls1, LayerScale) else 1.0
    g2 = blk.ls2.gamma if isinstance(blk.ls2, LayerScale) else 1.0
    y = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    qkv = y @ blk.attn.qkv.weight.T + (blk.attn.qkv.bias if blk.attn.qkv.bias is not None else 0)
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, N, h, d).transpose(1, 2) for i in range(3))
    a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    o = (a @ v).transpose(1, 2).reshape(B, N, D) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    x = x + g1 * o
    y = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    m = F.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return x + g2 * m


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
@pytest.mark.parametrize("init_values", [None, 0.5])
def test_equals_the_block_written_out(impl, init_values):
    torch.manual_seed(0)
    blk = Block(16, num_heads=4, mlp_ratio=2.0, init_values=init_values, attn_impl=impl).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(blk(x), manual_block(blk, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("init_values", [None, 1e-5])
def test_same_function_and_keys_as_timm_block(init_values):
    torch.manual_seed(1)
    ours = Block(24, num_heads=3, qkv_bias=True, init_values=init_values).eval()
    ref = TimmBlock(24, num_heads=3, qkv_bias=True, init_values=init_values).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_minivit_block_bias_switches_and_parameter_count():
    """D 96, MLP 192, no qkv/fc biases: LN 192 + qkv 27,648 + proj 9,312 + LN 192 + fc1 18,432 + fc2 18,432."""
    blk = Block(96, num_heads=12, mlp_ratio=2.0, qkv_bias=False, mlp_bias=False, norm_eps=1e-5)
    assert blk.attn.qkv.bias is None and blk.mlp.fc1.bias is None and blk.mlp.fc2.bias is None
    assert blk.attn.proj.bias is not None and blk.norm1.eps == 1e-5
    assert sum(p.numel() for p in blk.parameters()) == 74_208


def test_layer_scale_starts_at_init_values_and_scales_channels():
    ls = LayerScale(3, 0.1)
    assert torch.equal(ls.gamma.data, torch.full((3,), 0.1))
    with torch.no_grad():
        ls.gamma.copy_(torch.tensor([1.0, 2.0, -1.0]))
    assert torch.equal(ls(torch.ones(2, 4, 3)), torch.tensor([1.0, 2.0, -1.0]).expand(2, 4, 3))


def test_attention_bias_is_added_to_the_logits():
    torch.manual_seed(2)
    blk = Block(8, num_heads=2, attn_impl="manual").double().eval()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    big = torch.zeros(2, 4, 4, dtype=torch.float64)
    big[..., 0] = 1e4  # every query attends to token 0 only
    y = blk(x, big)
    blk.attn.impl = "sdpa"
    torch.testing.assert_close(blk(x, big), y, rtol=0, atol=1e-10)
    xn = F.layer_norm(x, (8,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    v0 = (xn[:, :1] @ blk.attn.qkv.weight[16:].T + blk.attn.qkv.bias[16:]) @ blk.attn.proj.weight.T
    h = x + v0 + blk.attn.proj.bias  # attention output = projected value of token 0, for every token
    y_attn_only = h + blk.mlp(blk.norm2(h))
    torch.testing.assert_close(y, y_attn_only, rtol=0, atol=1e-8)
