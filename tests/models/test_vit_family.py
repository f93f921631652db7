"""ViT family (issue 3): parameter counts, timm parity, class attention, seed layouts, verification, contract."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
import torch.nn as nn

from vitforge.eval.verify import _block_report, check_attention, run_verify_attention
from vitforge.models.cct import ConvTokenizer
from vitforge.models.convert import from_timm, load_timm_state_dict
from vitforge.models.layers import Attention, DropPath, drop_path_rates, set_attention_impl
from vitforge.models.layers.class_attention import ClassAttention, ClassAttentionBlock, ClassTokenBlock
from vitforge.models.layers.rel_pos_bias import RelPosBias2d, relative_position_index
from vitforge.models.registry import create_model, list_models, model_factory
from vitforge.models.vit import VisionTransformer

FAMILY_MODULES = {"vitforge.models.vit", "vitforge.models.deit", "vitforge.models.cait", "vitforge.models.cct"}
FAMILY = [n for n in list_models() if model_factory(n).__module__ in FAMILY_MODULES]


@functools.cache
def _cached(name: str, kwargs: tuple) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **dict(kwargs))


def build(name: str, **kwargs) -> nn.Module:
    """A fresh copy of a seeded model; construction (the slow part on CPU) happens once per (name, kwargs)."""
    return copy.deepcopy(_cached(name, tuple(sorted(kwargs.items()))))


def n_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def sample_input(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


# ---- counts -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("minivit_cifar", {}, 674_890),
        ("deit_kd_cifar", {}, 10_603_508),
        ("cct_7_3x1_cifar", {}, 3_760_139),
        ("cct_7_3x1_cifar", {"n_conv_layers": 2}, 3_853_259),  # CCT-7/3x2, README 3.853M
        ("vit_lite_7_4_cifar", {}, 3_716_874),
        ("deit_tiny_distilled_224", {}, 5_910_800),  # = timm deit_tiny_distilled_patch16_224
        ("cait_xxs24_224", {}, 11_956_264),  # = timm cait_xxs24_224
    ],
)
def test_parameter_counts(name, kwargs, expected):
    model = build(name, **kwargs)
    assert n_params(model) == expected
    assert n_params(model, trainable_only=True) == expected  # fixed tables are buffers, not frozen parameters


# ---- parity with timm ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_224", "cait_xxs24_224"])
def test_timm_parity(name):
    torch.manual_seed(0)
    ours, theirs = from_timm(name)
    with torch.no_grad():  # move every weight off its init (zero biases, LayerScale 1e-5) so all paths matter
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    load_timm_state_dict(ours, theirs.state_dict())
    assert n_params(ours) == n_params(theirs)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = theirs(x)
        for impl in ("sdpa", "manual"):
            set_attention_impl(ours, impl)
            out = ours(x)
            assert out.shape == ref.shape == (1, 1000)
            assert (out - ref).abs().max().item() < 1e-5, impl


def test_converter_names_the_bad_keys():
    from vitforge.errors import CheckpointError

    model = build("vit_demo")
    state = model.state_dict()
    state["blocks.0.gamma_9"] = state.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
        load_timm_state_dict(model, state)


# ---- attention paths ----------------------------------------------------------------------------------------------
def test_attention_manual_equals_sdpa_fp32():
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4).eval()
    x, bias = torch.randn(2, 10, 64), torch.randn(4, 10, 10)
    outs = []
    for impl in ("manual", "sdpa"):
        attn.impl = impl
        outs.append(attn(x, bias))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_class_attention_manual_equals_sdpa_fp32():
    torch.manual_seed(0)
    attn = ClassAttention(64, num_heads=4).eval()
    x, bias = torch.randn(2, 10, 64), torch.randn(4, 1, 10)
    outs = []
    for impl in ("manual", "sdpa"):
        attn.impl = impl
        outs.append(attn(x, bias))
    assert outs[0].shape == (2, 1, 64)
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_deit_kd_model_manual_equals_sdpa():
    torch.manual_seed(0)
    model = build("deit_kd_cifar").eval()
    with torch.no_grad():
        for rp in model.rel_pos:  # non-zero relative biases so the bias path is exercised
            for p in rp.parameters():
                p.normal_(0, 0.5)
        x = sample_input(model, 2)
        set_attention_impl(model, "manual")
        a = model(x)
        set_attention_impl(model, "sdpa")
        b = model(x)
    assert (a - b).abs().max().item() < 1e-5


# ---- class attention ----------------------------------------------------------------------------------------------
def _paired_class_blocks(dim=32, heads=4, ls=0.7):
    cait = ClassAttentionBlock(dim, num_heads=heads, init_values=ls).eval()
    seed = ClassTokenBlock(dim, num_heads=heads, init_values=ls).eval()
    with torch.no_grad():
        for p in cait.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        a, b = cait.attn, seed.attn
        b.qkv.weight.copy_(torch.cat([a.q.weight, a.k.weight, a.v.weight]))
        b.qkv.bias.copy_(torch.cat([a.q.bias, a.k.bias, a.v.bias]))
        for name in ("norm1", "attn.proj", "ls1", "norm2", "mlp", "ls2"):
            seed.get_submodule(name).load_state_dict(cait.get_submodule(name).state_dict())
    return cait, seed


@pytest.mark.parametrize("with_bias", [False, True])
def test_cait_class_attention_equals_full_attention_cls_row(with_bias):
    torch.manual_seed(0)
    cait, seed = _paired_class_blocks()
    x = torch.randn(3, 17, 32)
    bias = torch.randn(4, 17, 17) if with_bias else None
    with torch.no_grad():
        y_cait = cait(x, bias[:, :1] if with_bias else None)  # CaiT only needs the CLS rows of the bias
        y_seed = seed(x, bias)
    assert (y_cait - y_seed).abs().max().item() < 1e-5
    assert (y_cait[:, 0] - x[:, 0]).abs().max().item() > 1e-2  # the CLS token did change
    assert torch.equal(y_cait[:, 1:], x[:, 1:]) and torch.equal(y_seed[:, 1:], x[:, 1:])


def _block_io(model: nn.Module, block_type: type, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen = []
    hooks = [m.register_forward_hook(lambda _m, i, o: seen.append((i[0], o))) for m in model.modules()
             if isinstance(m, block_type)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_deit_kd_class_blocks_leave_dist_and_patches_bit_identical():
    torch.manual_seed(0)
    model = build("deit_kd_cifar").train()  # dropout and drop path active: still untouched
    seen = _block_io(model, ClassTokenBlock, sample_input(model, 2))
    assert len(seen) == 4
    for inp, out in seen:
        assert out.shape == inp.shape == (2, 66, 256)
        assert torch.equal(out[:, 1:], inp[:, 1:])
        assert not torch.equal(out[:, 0], inp[:, 0])


def test_cait_token_only_blocks_leave_patches_bit_identical():
    torch.manual_seed(0)
    model = build("cait_xxs24_224", img_size=64).eval()
    seen = _block_io(model, ClassAttentionBlock, sample_input(model, 1))
    assert len(seen) == 2
    for inp, out in seen:
        assert inp.shape == (1, 1 + 16, 192)
        assert torch.equal(out[:, 1:], inp[:, 1:])


# ---- distillation token -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [("deit_tiny_distilled_224", {"img_size": 32}), ("deit_kd_cifar", {})])
def test_distilled_eval_is_mean_of_heads(name, kwargs):
    torch.manual_seed(0)
    model = build(name, **kwargs)
    x = sample_input(model, 2)
    out_train = model.train()(x)
    assert isinstance(out_train, tuple) and len(out_train) == 2
    assert out_train[0].shape == out_train[1].shape == (2, model.num_classes)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        k = model.num_cls_tokens
        cls = model.head(model.head_norm(feats[:, 0]))
        dist = model.head_dist(model.head_dist_norm(feats[:, k]))
        out = model(x)
    assert torch.allclose(out, (cls + dist) / 2, atol=1e-6)
    assert not torch.allclose(cls, dist, atol=1e-3)  # two genuinely different heads


def test_distilled_no_deit_tokens_share_weight_decay_exemption():
    model = build("deit_kd_cifar")
    nwd = model.no_weight_decay()
    assert {"cls_token", "dist_token", "pos_embed", "rel_pos.0.table", "rel_pos.11.special_to_patch"} <= nwd
    params = dict(model.named_parameters())
    assert nwd <= set(params)


# ---- seed layouts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["learned", "sincos", "none"])
def test_pos_embed_kinds_and_mean_of_cls_tokens(pos):
    torch.manual_seed(0)
    tiny = dict(img_size=8, patch_size=2, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    model = VisionTransformer(**tiny, num_cls_tokens=3, cls_combine="mean", pos_embed=pos).eval()
    base = n_params(VisionTransformer(**tiny, num_cls_tokens=3, cls_combine="mean", pos_embed="none"))
    assert n_params(model) - base == (19 * 16 if pos == "learned" else 0)
    if pos == "sincos":
        assert model.pos_embed.shape == (1, 19, 16) and torch.count_nonzero(model.pos_embed[0, :3]) == 0
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model(x), model.head(feats[:, :3].mean(dim=1)), atol=1e-6)
    assert model.head.in_features == 16


def test_rel_pos_index_symmetry_and_centre():
    idx = relative_position_index(8, 8)
    centre = (8 - 1) * (2 * 8 - 1) + (8 - 1)
    assert idx.shape == (64, 64) and centre == 112
    assert torch.equal(idx + idx.T, torch.full_like(idx, 2 * centre))
    assert torch.equal(idx.diagonal(), torch.full((64,), centre))
    assert idx.min() == 0 and idx.max() == 15 * 15 - 1
    assert idx[0, 9] == (0 - 1 + 7) * 15 + (0 - 1 + 7)  # patch (0,0) vs patch (1,1): offset (-1, -1)


def test_rel_pos_bias_block_layout_and_zero_init():
    rp = RelPosBias2d(grid_size=(8, 8), num_heads=8, num_special=2)
    assert n_params(rp) == 3_880
    assert torch.count_nonzero(rp()) == 0
    with torch.no_grad():
        for p in rp.parameters():
            p.normal_()
    bias = rp()
    assert bias.shape == (8, 66, 66)
    assert torch.equal(bias[:, 2:, 2:], rp.table[:, rp.index])
    assert torch.equal(bias[:, :2, 2:], rp.special_to_patch) and torch.equal(bias[:, 2:, :2], rp.patch_to_special)
    assert torch.equal(bias[:, :2, :2], rp.special_to_special)


def test_minivit_sincos_buffer_layout():
    model = build("minivit_cifar")
    pe = model.pos_embed
    assert "pos_embed" not in dict(model.named_parameters()) and pe.shape == (1, 66, 96)
    assert torch.count_nonzero(pe[0, :2]) == 0  # the two CLS rows
    tok = 2 + 1 * 8 + 2  # patch at row h=1, column w=2
    assert math.isclose(pe[0, tok, 0].item(), math.sin(2.0), abs_tol=1e-6)  # dims 0..47 encode w
    assert math.isclose(pe[0, tok, 1].item(), math.cos(2.0), abs_tol=1e-6)
    assert math.isclose(pe[0, tok, 2].item(), math.sin(2.0 * 10000 ** (-2 / 48)), abs_tol=1e-6)
    assert math.isclose(pe[0, tok, 48].item(), math.sin(1.0), abs_tol=1e-6)  # dims 48..95 encode h
    assert math.isclose(pe[0, tok, 49].item(), math.cos(1.0), abs_tol=1e-6)


def test_minivit_seed_layout():
    model = build("minivit_cifar")
    blk = model.blocks[0]
    assert model.cls_token.shape == (1, 2, 96) and torch.count_nonzero(model.cls_token) == 0
    assert blk.attn.qkv.bias is None and blk.attn.proj.bias is not None
    assert blk.mlp.fc1.bias is None and blk.mlp.fc2.bias is None
    assert model.head.in_features == 192 and blk.attn.attn_drop.p == 0.1
    assert model(sample_input(model, 2)).shape == (2, 10)


def test_deit_kd_conv_stem_and_drop_path_schedule():
    model = build("deit_kd_cifar")
    pe = model.patch_embed
    assert pe.conv.bias is None and pe.proj.in_features == 256 * 16
    assert pe(torch.randn(2, 3, 32, 32)).shape == (2, 64, 256)
    rates = [blk.drop_path1.p for blk in model.blocks]
    assert rates == pytest.approx([i * 0.15 / 11 for i in range(12)])
    assert drop_path_rates(0.1, 7) == pytest.approx(torch.linspace(0, 0.1, 7).tolist())
    assert [type(b).__name__ for b in model.blocks[7:9]] == ["Block", "ClassTokenBlock"]


def test_cct_tokenizer_lengths_and_seqpool():
    assert ConvTokenizer(embed_dim=32, n_conv_layers=1).num_tokens(32) == 256
    assert ConvTokenizer(embed_dim=32, n_conv_layers=2).num_tokens(32) == 64
    for n_conv, n_tok in ((1, 256), (2, 64)):
        assert ConvTokenizer(embed_dim=32, n_conv_layers=n_conv)(torch.randn(2, 3, 32, 32)).shape == (2, n_tok, 32)
    model = build("cct_7_3x1_cifar").eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
        w = model.pool.weights(feats)
    assert feats.shape == (2, 256, 256) and w.shape == (2, 256, 1)
    assert torch.allclose(w.sum(dim=1), torch.ones(2, 1), atol=1e-6)


def test_cait_layerscale_init():
    model = build("cait_xxs24_224")
    gammas = [m.gamma for m in model.modules() if hasattr(m, "gamma")]
    assert len(gammas) == 2 * (24 + 2)
    assert all(torch.all(g == 1e-5) for g in gammas)


# ---- attention verification ---------------------------------------------------------------------------------------
def test_verify_attention_minivit():
    report = run_verify_attention("minivit_cifar", batch_size=2)
    assert report["ok"] and len(report["blocks"]) == 9 and report["input_size"] == [3, 32, 32]
    for blk in report["blocks"]:
        assert blk["Q"] == blk["K"] == blk["V"] == [2, 12, 66, 8]
        assert blk["A"] == [2, 12, 66, 66] and blk["O"] == [2, 66, 96]
        assert blk["ok"] and blk["softmax_max_err"] < 1e-4
    assert report["max_err"] == max(b["softmax_max_err"] for b in report["blocks"])


def test_verify_attention_cait_covers_talking_heads_and_class_attention():
    model = build("cait_xxs24_224", img_size=32)
    model.train()
    report = check_attention(model, torch.randn(1, 3, 32, 32))
    assert report["ok"] and len(report["blocks"]) == 26
    assert report["blocks"][0]["A"] == [1, 4, 4, 4]  # 2x2 patches, no CLS in stage 1
    assert report["blocks"][-1]["name"] == "blocks_token_only.1.attn"
    assert report["blocks"][-1]["Q"] == [1, 4, 1, 48] and report["blocks"][-1]["A"] == [1, 4, 1, 5]
    assert model.training and all(m.record is None for m in model.modules() if hasattr(m, "record"))


def test_verify_attention_reports_failures_and_plain_models():
    good = {"Q": (2, 4, 5, 8), "K": (2, 4, 5, 8), "V": (2, 4, 5, 8), "A": (2, 4, 5, 5), "O": (2, 5, 32)}
    assert _block_report("a", {**good, "softmax_max_err": 1e-6})["ok"]
    assert not _block_report("a", {**good, "softmax_max_err": 1e-3})["ok"]
    assert not _block_report("a", {**good, "A": (2, 4, 5, 6), "softmax_max_err": 0.0})["ok"]
    assert not _block_report("a", {})["ok"]
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    report = check_attention(cnn, torch.randn(1, 3, 8, 8))
    assert report["ok"] and report["blocks"] == [] and "note" in report


def test_verify_attention_cli_json_and_exit_codes(monkeypatch, capsys):
    from vitforge.commands.cli import main

    assert main(["verify-attention", "minivit_cifar", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["blocks"]) == 9 and report["blocks"][0]["A"] == [2, 12, 66, 66]
    assert main(["verify-attention", "minivit_cifar", "depth=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("  ok\n") == 2 and out.rstrip().endswith("attention check passed")
    monkeypatch.setattr("vitforge.eval.verify.SOFTMAX_TOL", 0.0)  # no row sum is exactly 1 in float32: all fail
    assert main(["verify-attention", "minivit_cifar", "depth=2"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("attention check FAILED")


def test_attention_check_runs_at_the_first_training_step(tmp_path, monkeypatch):
    from vitforge.config import load_config
    from vitforge.errors import VitforgeError
    from vitforge.train.trainer import train

    args = ["model.name=vit_demo", "data.train=digits", "data.limit=80", "data.batch_size=16", "train.max_steps=2",
            "train.epochs=1",
            "train.device=cpu", "run.progress=none", "train.threads=1", f"run.dir={tmp_path}"]
    run = train(load_config(None, [*args, "run.name=ok"]))
    report = json.loads((run / "attention_check.json").read_text())
    assert report["ok"] and len(report["blocks"]) == 4 and report["blocks"][0]["Q"][0] == 2
    assert "attention check: 4 blocks" in (run / "train.log").read_text()
    monkeypatch.setattr("vitforge.eval.verify.SOFTMAX_TOL", 0.0)
    with pytest.raises(VitforgeError, match=r"train.verify_attention: the attention check failed in 4 block\(s\)"):
        train(load_config(None, [*args, "run.name=bad"]))
    assert not json.loads((tmp_path / "bad" / "attention_check.json").read_text())["ok"]


def test_drop_path_drops_whole_samples_and_rescales_survivors():
    torch.manual_seed(0)
    dp = DropPath(0.25)
    x = torch.ones(4000, 3, 5)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    kept = (per_sample != 0).all(1)
    assert ((per_sample == 0).all(1) | kept).all()  # all of a sample or none of it
    assert torch.equal(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.03 and abs(y.mean().item() - 1.0) < 0.05  # unbiased
    assert torch.equal(dp.eval()(x), x) and torch.equal(DropPath(0.0).train()(x), x)


# ---- classifier contract over the family -------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY)
def test_family_contract_forward_backward_reset(name):
    torch.manual_seed(0)
    big = _cached(name, ()).pretrained_cfg["input_size"][-1] > 64  # 224 models: same code at 64 px, batch 1
    model = build(name, drop_path_rate=0.1, **({"img_size": 64} if big else {}))
    batch = 1 if big else 2
    x = sample_input(model, batch)
    out = model.train()(x)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().square().mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}
    model.reset_classifier(5)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (batch, 5)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert torch.equal(model(x), feats)
