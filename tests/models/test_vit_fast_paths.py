"""The ViT speed-ups compute the same function as the straightforward forms they replace.

* conv-stem patch projection as a p x p stride-p convolution (was: unfold + transpose + Linear, same weights);
* class-attention blocks ask with the class-token queries only (was: full N x N attention, then keep the CLS rows);
* all blocks' relative-position biases in one gather (was: one gather + concatenations per block).

Each is compared with the old form written out here, outputs and gradients, in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitforge.eval.verify import check_attention
from vitforge.models.layers.attention import Attention
from vitforge.models.layers.class_attention import ClassTokenBlock
from vitforge.models.layers.rel_pos_bias import RelPosBias2d, stacked_biases
from vitforge.models.registry import create_model

SMALL_DEIT = dict(embed_dim=64, depth=4, num_heads=4, class_attn_depth=2)


def old_patch_embed(pe, x: torch.Tensor) -> torch.Tensor:
    t = pe.act(pe.bn(pe.conv(x)))
    return pe.proj(F.unfold(t, kernel_size=pe.patch_size, stride=pe.patch_size).transpose(1, 2))


def old_forward(model, x: torch.Tensor) -> torch.Tensor:
    """deit_kd_cifar's forward as first written: unfold stem, per-block bias, full attention in the CA blocks."""
    t = old_patch_embed(model.patch_embed, x)
    t = model.pos_drop(torch.cat([*model.prefix_tokens(x.shape[0]), t], dim=1) + model.pos_embed)
    for i, blk in enumerate(model.blocks):
        bias = model.rel_pos[i]()
        if isinstance(blk, ClassTokenBlock):
            k = blk.num_cls
            cls = t[:, :k] + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(t), bias)[:, :k]))
            cls = cls + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(cls))))
            t = torch.cat([cls, t[:, k:]], dim=1)
        else:
            t = blk(t, bias)
    return model.forward_head(model.norm(t))


def _perturbed(model):
    with torch.no_grad():  # zero-initialised biases would hide indexing mistakes
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _grads(model, out) -> list[torch.Tensor]:
    model.zero_grad()
    out.square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kwargs", [SMALL_DEIT, {}], ids=["small", "deit_kd_cifar"])
def test_deit_kd_forward_and_gradients_unchanged(kwargs):
    torch.manual_seed(0)
    model = _perturbed(create_model("deit_kd_cifar", **kwargs)).eval()
    x = torch.randn(3, 3, 32, 32)
    new, old = model(x), old_forward(model, x)
    assert (new - old).abs().max().item() < 1e-4 * old.abs().max().item()
    for g_new, g_old in zip(_grads(model, model(x)), _grads(model, old_forward(model, x)), strict=True):
        assert torch.allclose(g_new, g_old, rtol=1e-3, atol=1e-5 * g_old.abs().max().item())


def test_conv_stem_projection_equals_unfold_linear():
    torch.manual_seed(1)
    pe = create_model("deit_kd_cifar", **SMALL_DEIT).patch_embed.train()  # BN in batch-statistics mode
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(pe(x), old_patch_embed(pe, x), atol=1e-5)
    assert pe(x).shape == (4, 64, 64)


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_class_token_queries_equal_rows_of_full_attention(impl, qkv_bias):
    torch.manual_seed(2)
    attn = Attention(32, num_heads=4, qkv_bias=qkv_bias, impl=impl).eval()
    x, bias = torch.randn(2, 9, 32), torch.randn(4, 9, 9)
    for k in (1, 2):
        assert torch.allclose(attn(x, bias, num_queries=k), attn(x, bias)[:, :k], atol=1e-6)
        assert attn(x, num_queries=k).shape == (2, k, 32)


def test_attention_check_sees_class_token_queries():
    model = create_model("deit_kd_cifar", **SMALL_DEIT)
    report = check_attention(model, torch.randn(2, 3, 32, 32))
    assert report["ok"]
    assert [b["A"] for b in report["blocks"]] == [[2, 4, 66, 66]] * 2 + [[2, 4, 1, 66]] * 2


def test_stacked_biases_equal_per_block_biases():
    torch.manual_seed(3)
    mods = [RelPosBias2d(grid_size=(4, 4), num_heads=3, num_special=2) for _ in range(3)]
    for m in mods:
        _perturbed(m)
    assert torch.equal(stacked_biases(mods), torch.stack([m() for m in mods]))
    plain = [RelPosBias2d(grid_size=(3, 5), num_heads=2) for _ in range(2)]
    assert torch.equal(stacked_biases(plain), torch.stack([m() for m in plain]))
