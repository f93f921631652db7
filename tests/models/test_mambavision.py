"""MambaVision: faithfulness to NVlabs/MambaVision `mambavision/models/mamba_vision.py` (parameter counts of the
README, checkpoint keys, block order, init and quirks), the selective scan, ONNX export, on CPU.

Big variants are built on the `meta` device (shapes only, no memory, no compute); numerics use small models.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitforge.models.layers import Attention, ssm_scan
from vitforge.models.layers.ssm_scan import resolve_impl, selective_scan_fn
from vitforge.models.mambavision import (
    ConvBlock,
    MambaVisionBlock,
    MambaVisionMixer,
    attention_indices,
    window_partition,
    window_reverse,
)
from vitforge.models.registry import create_model

VARIANTS = ["mambavision_t", "mambavision_t2", "mambavision_s", "mambavision_b", "mambavision_l", "mambavision_l2"]
OFFICIAL_PARAMS = dict(zip(VARIANTS, [31_794_248, 35_104_008, 50_140_584, 97_685_288, 227_961_048, 241_554_824]))
# Attention block indices of stage 3 and stage 4: the last floor(n/2) blocks of each hybrid stage.
ATTENTION_TABLE = {
    "mambavision_t": ([4, 5, 6, 7], [2, 3]),
    "mambavision_t2": ([6, 7, 8, 9, 10], [2, 3]),
    "mambavision_s": ([4, 5, 6], [3, 4]),
    "mambavision_b": ([5, 6, 7, 8, 9], [3, 4]),
    "mambavision_l": ([5, 6, 7, 8, 9], [3, 4]),
    "mambavision_l2": ([6, 7, 8, 9, 10, 11], [3, 4]),
}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
MIXER_KEYS = ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight",
              "conv1d_x.weight", "conv1d_z.weight")


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs).eval()


def tiny_model(**kwargs) -> nn.Module:
    """The CIFAR variant's topology at width 16 (all block kinds, windows, mixer and attention), fast on CPU."""
    torch.manual_seed(0)
    return create_model("mambavision_cifar", dim=16, in_dim=8, num_heads=(1, 1, 2, 4), **kwargs).eval()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- 1-3: parameter counts, key layout, block types ----------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_are_official(name):
    assert n_params(meta_model(name)) == OFFICIAL_PARAMS[name]


def test_stage_parameter_breakdown_of_t():
    m = meta_model("mambavision_t")
    assert n_params(m.patch_embed) == 24_128
    assert [n_params(lv.blocks) for lv in m.levels] == [115_680, 1_385_280, 9_085_440, 18_122_240]
    assert [n_params(lv.downsample) for lv in m.levels[:3]] == [115_200, 460_800, 1_843_200]
    assert n_params(m.norm) + n_params(m.head) == 642_280


def official_keys(depths, attn, layer_scale: bool) -> set[str]:
    """The key set of an official checkpoint, written from `mamba_vision.py`'s module names (not from our modules)."""
    keys = {"patch_embed.conv_down.0.weight", "patch_embed.conv_down.3.weight", "head.weight", "head.bias"}
    keys |= {f"patch_embed.conv_down.{i}.{k}" for i in (1, 4) for k in BN} | {f"norm.{k}" for k in BN}
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            if i < 2:
                keys |= {p + f"{c}.{k}" for c in ("conv1", "conv2") for k in ("weight", "bias")}
                keys |= {p + f"{n}.{k}" for n in ("norm1", "norm2") for k in BN}
                continue
            keys |= {p + f"{n}.{k}" for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2") for k in ("weight", "bias")}
            mixer = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias") if j in attn[i - 2] else MIXER_KEYS
            keys |= {p + "mixer." + k for k in mixer}
            keys |= {p + "gamma_1", p + "gamma_2"} if layer_scale else set()
        if i < len(depths) - 1:
            keys.add(f"levels.{i}.downsample.reduction.0.weight")
    return keys


@pytest.mark.parametrize("name, depths, layer_scale", [
    ("mambavision_t", (1, 3, 8, 4), False),
    ("mambavision_s", (3, 3, 7, 5), False),
    ("mambavision_b", (3, 3, 10, 5), True),
])
def test_state_dict_keys_match_the_official_layout(name, depths, layer_scale):
    sd = meta_model(name).state_dict()
    assert set(sd) == official_keys(depths, ATTENTION_TABLE[name], layer_scale)
    assert not [k for k in sd if "conv1d" in k and k.endswith("bias")]  # Q1
    if name == "mambavision_t":
        p = "levels.2.blocks.0.mixer."
        shapes = {k: tuple(sd[p + k].shape) for k in MIXER_KEYS}
        assert shapes == {"in_proj.weight": (320, 320), "x_proj.weight": (36, 160), "dt_proj.weight": (160, 20),
                          "dt_proj.bias": (160,), "A_log": (160, 8), "D": (160,), "out_proj.weight": (320, 320),
                          "conv1d_x.weight": (160, 1, 3), "conv1d_z.weight": (160, 1, 3)}


@pytest.mark.parametrize("name", VARIANTS)
def test_attention_blocks_come_last_as_in_the_table(name):
    m = meta_model(name)
    for lv in m.levels[:2]:
        assert all(isinstance(b, ConvBlock) for b in lv.blocks)
    for lv, expected in zip(m.levels[2:], ATTENTION_TABLE[name]):
        kinds = [isinstance(b.mixer, Attention) for b in lv.blocks]
        assert [i for i, a in enumerate(kinds) if a] == expected
        assert all(isinstance(b.mixer, MambaVisionMixer) for b in lv.blocks if not isinstance(b.mixer, Attention))
        assert kinds == sorted(kinds)  # every mixer block before every attention block


def test_attention_indices_rule():
    assert [list(attention_indices(n)) for n in (1, 2, 3, 4, 5)] == [[], [1], [2], [2, 3], [3, 4]]


# ---- 4: shapes per level (the `vitforge info` rule: top-level children, ModuleLists expanded one level) ----------
def info_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    shapes, handles = {}, []
    for name, child in model.named_children():
        expand = isinstance(child, nn.ModuleList)
        subs = [(f"{name}.{i}", c) for i, c in enumerate(child)] if expand else [(name, child)]
        for n, c in subs:
            handles.append(c.register_forward_hook(lambda mod, a, out, n=n: shapes.update({n: tuple(out.shape)})))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


@pytest.mark.parametrize("hw, trace", [
    ((224, 224), [(80, 56, 56), (160, 28, 28), (320, 14, 14), (640, 7, 7), (640, 7, 7)]),
    ((512, 224), [(80, 128, 56), (160, 64, 28), (320, 32, 14), (640, 16, 7), (640, 16, 7)]),  # windows padded
    ((32, 32), [(80, 8, 8), (160, 4, 4), (320, 2, 2), (640, 1, 1), (640, 1, 1)]),  # 2x2 -> 14x14, 1x1 -> 7x7
])
def test_t_shapes_per_level(hw, trace):
    """MambaVision-T shape trace at 224; each level reports its output after its downsample."""
    shapes = info_shapes(meta_model("mambavision_t"), torch.empty(2, 3, *hw, device="meta"))
    names = ["patch_embed", "levels.0", "levels.1", "levels.2", "levels.3"]
    assert [shapes[n] for n in names] == [(2, *t) for t in trace]
    assert shapes["norm"] == (2, 640, *trace[-1][1:])
    assert shapes["avgpool"] == (2, 640, 1, 1) and shapes["head"] == (2, 1000)


def test_vitforge_info_reports_the_stage_shapes_of_t():
    """`vitforge info mambavision_t` (library side): the T trace, levels reported after their downsample."""
    from vitforge.commands.inspect import model_info

    info = model_info("mambavision_t")
    shapes = {s["name"]: tuple(s["output_shape"]) for s in info["stages"]}
    assert info["params"] == 31_794_248
    assert [shapes[n] for n in ("patch_embed", "levels.0", "levels.1", "levels.2", "levels.3", "norm", "head")] == [
        (1, 80, 56, 56), (1, 160, 28, 28), (1, 320, 14, 14), (1, 640, 7, 7), (1, 640, 7, 7), (1, 640, 7, 7), (1, 1000)]


@pytest.mark.parametrize("hw", [(32, 32), (40, 24), (17, 45)])
def test_small_model_runs_at_any_size(hw):
    m = tiny_model()
    with torch.no_grad():
        y = m(torch.randn(2, 3, *hw))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_cifar_variant_stage_maps():
    shapes = info_shapes(meta_model("mambavision_cifar"), torch.empty(1, 3, 32, 32, device="meta"))
    assert shapes["patch_embed"] == (1, 32, 32, 32)
    assert [shapes[f"levels.{i}"][2:] for i in range(4)] == [(16, 16), (8, 8), (4, 4), (4, 4)]
    m = meta_model("mambavision_cifar")
    assert [lv.window_size for lv in m.levels[2:]] == [8, 4]  # = stage-3/4 resolution: one unpadded window
    assert [lv.window_size for lv in meta_model("mambavision_cifar", img_size=64).levels[2:]] == [16, 8]
    assert n_params(m) == 2_750_426


# ---- 5: windows -----------------------------------------------------------------------------------------------------
def test_window_partition_reverse_is_identity_and_raster_ordered():
    B, C, H, W, ws = 2, 3, 8, 12, 4
    b, c, h, w = torch.meshgrid(*(torch.arange(n) for n in (B, C, H, W)), indexing="ij")
    x = (b * 1_000_000 + c * 10_000 + h * 100 + w).double()
    win = window_partition(x, ws)
    assert win.shape == (B * (H // ws) * (W // ws), ws * ws, C)
    assert torch.equal(window_reverse(win, ws, H, W), x)
    nH, nW = H // ws, W // ws
    for k in range(win.shape[0]):  # windows row-major over the grid, tokens row-major inside a window
        bb, i, j = k // (nH * nW), (k % (nH * nW)) // nW, k % nW
        for t in range(ws * ws):
            r, s = divmod(t, ws)
            assert win[k, t, 1].item() == bb * 1_000_000 + 10_000 + (i * ws + r) * 100 + (j * ws + s)


def test_windows_are_independent_and_padding_is_cropped():
    m = tiny_model()
    level = m.levels[2]  # window 8
    x = torch.randn(1, 64, 12, 10)  # stage-3 width 4·16; padded to 16x16: 4 windows
    with torch.no_grad():
        ref = level._windowed(x)
        x2 = x.clone()
        x2[:, :, 0, 0] += 1.0  # a pixel of window (0, 0)
        out = level._windowed(x2)
    assert ref.shape == x.shape
    changed = (out - ref).abs().amax(1)[0] > 0  # (H, W)
    assert changed[:8, :8].any() and not changed[8:, :].any() and not changed[:, 8:].any()


# ---- 6: the scan forms ----------------------------------------------------------------------------------------------
def scan_inputs(layout="bnl", b=2, d=6, L=37, n=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    bc = {"bnl": (b, n, L), "dn": (d, n), "bgnl": (b, 2, n, L)}[layout]
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 2 - 0.1
    return dict(u=r(b, d, L), delta=0.5 * r(b, d, L), A=A, B=r(*bc), C=r(*bc), D=r(d), z=r(b, d, L),
                delta_bias=0.3 * r(d))


def naive_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """mamba_ssm's `selective_scan_ref` semantics literally, scalar by scalar (selective (b, n, L) B and C)."""
    b_, d_, L = u.shape
    y = torch.zeros(b_, d_, L, dtype=torch.float64)
    u, delta, A, B, C = (t.tolist() for t in (u, delta, A, B, C))
    for b in range(b_):
        for d in range(d_):
            h = [0.0] * len(A[0])
            for t in range(L):
                dl = delta[b][d][t] + (delta_bias[d].item() if delta_bias is not None else 0.0)
                dl = math.log1p(math.exp(dl)) if softplus else dl
                for k in range(len(h)):
                    h[k] = math.exp(dl * A[d][k]) * h[k] + dl * B[b][k][t] * u[b][d][t]
                y[b, d, t] = sum(C[b][k][t] * h[k] for k in range(len(h)))
    y = y + torch.tensor(u, dtype=torch.float64) * D[:, None] if D is not None else y
    return y * F.silu(z) if z is not None else y


@pytest.mark.parametrize("use_z, use_bias, softplus", [(True, True, True), (False, False, False), (True, False, True),
                                                       (False, True, False)])
def test_reference_scan_matches_the_equations(use_z, use_bias, softplus):
    a = scan_inputs(b=2, d=3, L=9, n=4)
    z, db = (a["z"] if use_z else None), (a["delta_bias"] if use_bias else None)
    y = selective_scan_fn(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], z, db, softplus, impl="loop")
    want = naive_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], z, db, softplus)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


FAST_FORMS = [("doubling", 16), ("chunked", 1), ("chunked", 5), ("chunked", 16), ("chunked", 64)]


@pytest.mark.parametrize("layout", ["bnl", "dn", "bgnl"])
@pytest.mark.parametrize("use_z, use_bias, softplus", [(True, True, True), (False, False, False), (False, True, True),
                                                       (True, False, False)])
def test_scan_forms_agree_float64(layout, use_z, use_bias, softplus):
    a = scan_inputs(layout)
    kw = dict(D=a["D"], z=a["z"] if use_z else None, delta_bias=a["delta_bias"] if use_bias else None,
              delta_softplus=softplus, return_last_state=True)
    ref, h_ref = selective_scan_fn(a["u"], a["delta"], a["A"], a["B"], a["C"], impl="loop", **kw)
    for impl, chunk in FAST_FORMS:
        y, h = selective_scan_fn(a["u"], a["delta"], a["A"], a["B"], a["C"], impl=impl, chunk_size=chunk, **kw)
        assert (y - ref).abs().max() <= 1e-10 * ref.abs().max(), (impl, chunk)
        assert (h - h_ref).abs().max() <= 1e-10 * h_ref.abs().max(), (impl, chunk)


@pytest.mark.parametrize("use_z, use_bias, softplus", [(True, True, True), (False, True, True), (True, False, False),
                                                       (False, False, True)])
@pytest.mark.parametrize("impl, chunk", [("loop", 0), *FAST_FORMS])
def test_scan_forms_float32_within_1e5_relative(use_z, use_bias, softplus, impl, chunk):
    a = scan_inputs(L=150, d=8, n=8)
    if not softplus:  # raw delta must stay positive (the kernel's contract when softplus is off)
        a["delta"] = a["delta"].abs()
        a["delta_bias"] = a["delta_bias"].abs()
    z, db = (a["z"] if use_z else None), (a["delta_bias"] if use_bias else None)
    ref = selective_scan_fn(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], z, db, softplus, impl="loop")
    f = {k: v.float() for k, v in a.items()}
    y = selective_scan_fn(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], f["z"] if use_z else None,
                          f["delta_bias"] if use_bias else None, softplus, impl=impl, chunk_size=chunk or 16)
    assert y.dtype == torch.float32
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_scan_runs_in_float32_and_casts_back():
    a = {k: v.float() for k, v in scan_inputs(L=20).items()}
    args = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], None, a["delta_bias"], True)
    y32 = selective_scan_fn(*args, impl="doubling")
    y16 = selective_scan_fn(a["u"].bfloat16(), *args[1:], impl="doubling")
    assert y16.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not reach the recurrence
        y_ac = selective_scan_fn(*args, impl="doubling")
    assert y_ac.dtype == torch.float32 and torch.equal(y_ac, y32)
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()  # only the bf16 rounding of u and of y


@pytest.mark.parametrize("impl, chunk", [("doubling", 0), ("chunked", 3)])
def test_gradcheck_fast_forms(impl, chunk):
    a = scan_inputs(b=1, d=2, L=7, n=2, seed=1)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    inputs = tuple(a[k].clone().requires_grad_() for k in names)

    def fn(u, delta, A, B, C, D, z, db):
        return selective_scan_fn(u, delta, A, B, C, D, z, db, True, impl=impl, chunk_size=chunk or 16)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def test_chunked_gradients_stay_finite_with_large_steps():
    """Large δ makes S_t - S_τ (τ > t) huge and positive: masking after exp would give inf * 0 = NaN gradients."""
    a = scan_inputs(b=1, d=3, L=40, n=4)
    grads = {}
    for impl in ("loop", "chunked"):
        delta = (a["delta"] + 40.0).requires_grad_()
        y = selective_scan_fn(a["u"], delta, a["A"], a["B"], a["C"], a["D"], None, None, True, impl=impl,
                              chunk_size=16)
        y.sum().backward()
        grads[impl] = delta.grad
    assert torch.isfinite(grads["chunked"]).all()
    torch.testing.assert_close(grads["chunked"], grads["loop"])


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_dispatcher_rules():
    u, long = torch.randn(1, 2, 3), torch.randn(1, 2, ssm_scan.LOOP_MAX_TRAIN_LEN + 1)
    assert resolve_impl("auto", long, needs_grad=False) == "loop"  # CPU inference
    assert resolve_impl("auto", u, needs_grad=True) == "loop"  # CPU training, short windows
    assert resolve_impl("auto", long, needs_grad=True) == "doubling"  # CPU training, long windows
    assert resolve_impl("chunked", u) == "chunked"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fast", u)
    if not ssm_scan.kernel_available():
        with pytest.raises(RuntimeError, match="mamba_ssm"):
            resolve_impl("cuda", u)
    picked = []

    def traced(x):
        picked.append(resolve_impl("auto", x))
        return x * 2

    torch.jit.trace(traced, u, check_trace=False)
    assert picked == ["doubling"]  # graph capture: never the kernel, never an unrolled loop


# ---- 7: the mixer ---------------------------------------------------------------------------------------------------
def random_mixer(dim=32, seed=0) -> MambaVisionMixer:
    torch.manual_seed(seed)
    m = MambaVisionMixer(dim).double()
    with torch.no_grad():
        for p in m.parameters():
            if p is not m.A_log:
                p.normal_(0, 0.3)
        m.dt_proj.bias.normal_(0.5, 0.5)
    return m


def mixer_by_the_equations(m: MambaVisionMixer, u: torch.Tensor, bias_times: int) -> torch.Tensor:
    """The MambaVisionMixer written out independently: fused in_proj, 'same' convs, δ = softplus(W r + k·b), z
    concatenated."""
    h, R, N = m.D.shape[0], m.dt_rank, m.d_state
    xz = u @ m.in_proj.weight.T  # (B, L, C)
    x, z = xz[..., :h].transpose(1, 2), xz[..., h:].transpose(1, 2)  # (B, h, L)
    x = F.silu(F.conv1d(x, m.conv1d_x.weight, padding=1, groups=h))
    z = F.silu(F.conv1d(z, m.conv1d_z.weight, padding=1, groups=h))
    dbl = x.transpose(1, 2) @ m.x_proj.weight.T  # (B, L, R + 2N)
    r, Bs, Cs = dbl[..., :R], dbl[..., R:R + N], dbl[..., R + N:]
    delta = (r @ m.dt_proj.weight.T + bias_times * m.dt_proj.bias).transpose(1, 2)
    y = naive_scan(x, delta, -torch.exp(m.A_log), Bs.transpose(1, 2), Cs.transpose(1, 2), m.D, None, None, True)
    return torch.cat([y, z], dim=1).transpose(1, 2) @ m.out_proj.weight.T


def test_mixer_uses_dt_bias_twice_and_concatenates_z():
    m = random_mixer(dim=16)
    u = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        out = m(u)
        torch.testing.assert_close(out, mixer_by_the_equations(m, u, bias_times=2), rtol=1e-10, atol=1e-10)
        assert (out - mixer_by_the_equations(m, u, bias_times=1)).abs().max() > 1e-3  # the test can tell


@pytest.mark.parametrize("impl", ["loop", "doubling", "chunked"])
def test_mixer_causality(impl):
    """Convs see t-1, t, t+1; the scan only the past: output t ignores tokens >= t+2 and depends on t+1 and t-3."""
    m = random_mixer()
    m.scan_impl = impl
    L, t = 12, 6
    u = torch.randn(1, L, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = m(u)
        far = u.clone()
        far[:, t + 2:] += torch.randn_like(far[:, t + 2:])
        assert torch.allclose(m(far)[:, : t + 1], ref[:, : t + 1], rtol=0, atol=1e-12)
        for s in (t + 1, t - 3):
            near = u.clone()
            near[:, s] += 1.0
            assert (m(near)[:, t] - ref[:, t]).abs().max() > 1e-6, s


# ---- 8-9: initialisation, drop path, layer scale --------------------------------------------------------------------
def test_init_pass():
    torch.manual_seed(0)
    m = create_model("mambavision_cifar")
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in linears if lin.bias is not None)  # dt_proj too (Q3)
    mixers = [mod for mod in m.modules() if isinstance(mod, MambaVisionMixer)]
    assert mixers and all(torch.count_nonzero(mx.dt_proj.bias) == 0 for mx in mixers)
    for mx in mixers:
        N = mx.d_state
        assert torch.allclose(-torch.exp(mx.A_log), -torch.arange(1, N + 1.0).expand_as(mx.A_log))
        assert torch.equal(mx.D, torch.ones_like(mx.D))
    w = m.levels[3].blocks[0].mlp.fc1.weight
    assert 0.018 < w.std().item() < 0.022
    norms = [mod for mod in m.modules() if isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d))]
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) and not n.bias.any() for n in norms)


def test_standalone_mixer_keeps_mamba_dt_init():
    torch.manual_seed(0)
    dt = F.softplus(MambaVisionMixer(64).dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


def block_rates(model: nn.Module) -> list[float]:
    return [b.drop_path.p for lv in model.levels for b in lv.blocks]


@pytest.mark.parametrize("name, rate, total", [("mambavision_t", 0.2, 16), ("mambavision_b", 0.3, 21)])
def test_drop_path_linspace_over_all_blocks(name, rate, total):
    rates = block_rates(meta_model(name))
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, rate, total), rtol=0, atol=1e-7)
    assert block_rates(meta_model(name, drop_path_rate=0.5))[-1] == pytest.approx(0.5)


@pytest.mark.parametrize("name", VARIANTS)
def test_layer_scale_only_for_b_l_l2(name):
    m = meta_model(name)
    hybrid = [b for b in m.modules() if isinstance(b, MambaVisionBlock)]
    has = {isinstance(b.gamma_1, nn.Parameter) and isinstance(b.gamma_2, nn.Parameter) for b in hybrid}
    assert has == {name in ("mambavision_b", "mambavision_l", "mambavision_l2")}
    assert all(b.gamma is None for b in m.modules() if isinstance(b, ConvBlock))


def test_layer_scale_init_value():
    m = create_model("mambavision_cifar", dim=8, in_dim=8, layer_scale=1e-5)
    gammas = [g for n, g in m.named_parameters() if n.endswith(("gamma_1", "gamma_2"))]
    assert len(gammas) == 2 * 6 and all(torch.equal(g, torch.full_like(g, 1e-5)) for g in gammas)


# ---- the classifier contract, training, export ----------------------------------------------------------------------
def test_classifier_contract():
    m = tiny_model()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (3, 128, 4, 4)
        assert m.forward_head(feats, pre_logits=True).shape == (3, 128)
        m.reset_classifier(5)
        assert m(x).shape == (3, 5)
        m.reset_classifier(0)
        assert m(x).shape == (3, 128)
    names = dict(m.named_parameters())
    nwd = m.no_weight_decay()
    assert nwd <= set(names) and nwd == {n for n in names if n.endswith(("mixer.A_log", "mixer.D"))} and len(nwd) == 6
    assert m.pretrained_cfg["input_size"] == (3, 32, 32) and m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert meta_model("mambavision_s", img_size=(256, 192)).pretrained_cfg["input_size"] == (3, 256, 192)
    assert meta_model("mambavision_s").pretrained_cfg["crop_pct"] == 0.93


def test_cifar_variant_trains_a_few_steps():
    torch.manual_seed(0)
    m = create_model("mambavision_cifar").train()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.grad is not None for n, p in m.named_parameters() if "mixer" in n)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_export_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    m = tiny_model(depths=(1, 1, 2, 2))  # one mixer and one attention block per hybrid stage; auto scan -> doubling
    buf = io.BytesIO()
    # dynamo=False: the TorchScript-based exporter (the dynamo one needs onnxscript, not a dependency here).
    torch.onnx.export(m, (torch.randn(2, 3, 40, 24),), buf, dynamo=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 40, 24)  # another batch size than at export; 40x24 pads the stage-3/4 windows
    with torch.no_grad():
        want = m(x).numpy()
    got = sess.run(None, {"x": x.numpy()})[0]
    assert got.shape == (3, 10)
    assert abs(got - want).max() <= 1e-4


RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "cifar10" / "mambavision.yaml"
CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10" / "train.parquet"


def test_recipe_loads():
    from vitforge.config import load_config

    cfg = load_config(RECIPE)
    assert cfg.model.name == "mambavision_cifar" and cfg.data.val_split == 5000


@pytest.mark.skipif(not CIFAR10.is_file(), reason="needs ../shared/data/cifar10/train.parquet")
def test_recipe_trains_on_cifar10_parquet(tmp_path):
    """The recipe end to end on real CIFAR-10 images: the first 300 rows of train.parquet, 2 steps of 16."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from vitforge.config import load_config
    from vitforge.train.trainer import train

    source = pq.ParquetFile(CIFAR10)
    rows = next(source.iter_batches(batch_size=300))
    subset = tmp_path / "cifar10_300.parquet"
    pq.write_table(pa.Table.from_batches([rows], schema=source.schema_arrow), subset)  # keeps the class names
    overrides = [f"data.train={subset}", "data.val_split=100", "data.batch_size=16", "train.max_steps=2",
                 "train.epochs=1", "train.device=cpu", "schedule.warmup_epochs=0", f"run.dir={tmp_path}",
                 "run.name=mv", "run.tensorboard=false", "run.progress=none"]
    run = train(load_config(RECIPE, overrides))
    summary = json.loads((Path(run) / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final"]["val_n"] == 100
    assert math.isfinite(summary["final"]["train_loss"]) and math.isfinite(summary["final"]["val_loss"])



@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_cli_exports_mambavision_t_to_onnx_with_parity(tmp_path, capsys):
    """`vitforge export RUN --format onnx` on the full-size mambavision_t (224 px): onnxruntime agrees within 1e-4."""
    pytest.importorskip("onnxruntime")
    from vitforge.checkpoint import save_checkpoint
    from vitforge.commands.cli import main
    from vitforge.config import load_config, to_dict

    torch.manual_seed(0)
    model = create_model("mambavision_t", num_classes=5)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "best.pt", {
        "model_name": "mambavision_t", "model_kwargs": {"num_classes": 5}, "classes": list("abcde"),
        "preprocess": {"img_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "interpolation": "bicubic", "crop_pct": 0.875},
        "config": to_dict(load_config(None, ["model.name=mambavision_t"])), "model": model.state_dict(),
        "eval_weights": "model"})
    assert main(["export", str(run), "--format", "onnx", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and r["max_abs_diff"] <= 1e-4 and r["input_shape"] == [3, 224, 224]
    assert (run / "export" / "model.onnx").stat().st_size > 4 * 30_000_000  # all 31.8M float32 weights inside
