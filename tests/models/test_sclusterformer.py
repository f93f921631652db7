"""SClusterFormer: faithfulness to Fang666666/HSIC_SClusterFormer (`models/SClusterFormer.py` and its modules:
parameter split, shapes, cluster attention, deformable conv, fusion) and the hyperspectral pipeline, on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from vitforge.data.hyperspectral import (
    extract_patches,
    load_array,
    load_hyperspectral,
    pca_whiten,
    stratified_split,
)
from vitforge.errors import DataError
from vitforge.eval.metrics import hsi_metrics
from vitforge.models.layers.cluster_attention import (
    ClusterAttention,
    cluster_dispatch,
    euclidean_similarity,
    set_cluster_impl,
)
from vitforge.models.layers.deform_conv import DeformConv2d, PseudoDeformConv3d
from vitforge.models.registry import create_model
from vitforge.models.sclusterformer import FreqSpectralAttention, FusionEncoder, dct_basis


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def hsi():
    torch.manual_seed(0)
    return create_model("sclusterformer_hsi").eval()


# ---- 1. parameter count and per-module split (official PaviaU configuration) -----------------------------------------
def test_hsi_parameter_count_and_split(hsi):
    assert n_params(hsi) == 1_966_865
    split = {
        "pca_stem": n_params(hsi.pca_stem), "emap_stem": n_params(hsi.emap_stem),
        "upper": [(n_params(e), n_params(s)) for e, s in zip(hsi.upper.embeds, hsi.upper.stages)],
        "lower": [(n_params(e), n_params(s)) for e, s in zip(hsi.lower.embeds, hsi.lower.stages)],
        "fusion": n_params(hsi.fusion), "head": n_params(hsi.head), "c": hsi.branch_weight.numel(),
    }
    assert split == {
        "pca_stem": 34_392, "emap_stem": 7_590,
        "upper": [(5_376, 561_412), (18_816, 107_778), (4_800, 45_890)],
        "lower": [(74_496, 561_412), (295_296, 107_778), (73_920, 45_890)],
        "fusion": 19_641, "head": 585, "c": 1,
    }
    # The per-module rows below leave out the per-stage LayerNorms: 2·(256 + 128 + 64) per branch.
    assert n_params(hsi.upper.norms) == n_params(hsi.lower.norms) == 896


@pytest.mark.parametrize("classes, total", [(16, 1_967_320), (22, 1_967_710)])
def test_hsi_parameter_count_other_scenes(classes, total):
    assert n_params(create_model("sclusterformer_hsi", num_classes=classes)) == total


# ---- 2. shape trace and the head structure ---------------------------------------------------------------------------
def test_hsi_shape_trace(hsi):
    shapes = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
             for name, m in [("pca_stem", hsi.pca_stem), ("emap_stem", hsi.emap_stem), ("fusion", hsi.fusion),
                             *((f"upper{i}", n) for i, n in enumerate(hsi.upper.norms)),
                             *((f"lower{i}", n) for i, n in enumerate(hsi.lower.norms))]]
    x = torch.randn(2, 1, 31, 13, 13)
    with torch.no_grad():
        logits = hsi(x)
        hsi.double_softmax = True
        probs = hsi(x)
        hsi.double_softmax = False
    for h in hooks:
        h.remove()
    assert shapes == {
        "pca_stem": (2, 1, 30, 13, 13), "emap_stem": (2, 30, 13, 13), "fusion": (2, 169, 64),
        "upper0": (2, 169, 256), "upper1": (2, 169, 128), "upper2": (2, 169, 64),
        "lower0": (2, 169, 256), "lower1": (2, 49, 128), "lower2": (2, 16, 64),
    }
    assert logits.shape == probs.shape == (2, 9)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert (probs > 0).all() and not torch.allclose(logits.sum(1), torch.ones(2))
    assert hsi.pretrained_cfg["input_size"] == (1, 31, 13, 13)


def test_hsi_rejects_wrong_layout(hsi):
    with pytest.raises(ValueError, match=r"\(B, 1, 31, H, W\)"):
        hsi(torch.randn(2, 31, 13, 13))


def test_forward_head_honours_three_weighted_outputs(hsi):
    feats = torch.randn(4, 3, 64)  # token means of (upper, lower, fusion)
    c = hsi.branch_weight.detach()
    with torch.no_grad():
        hsi.branch_weight.fill_(0.3)
        w = [0.3, 0.35, 0.35]
        outs = hsi.head(feats)
        expect_logits = sum(wi * outs[:, i] for i, wi in enumerate(w))
        expect_probs = sum(wi * outs[:, i].softmax(-1) for i, wi in enumerate(w))
        torch.testing.assert_close(hsi.forward_head(feats), expect_logits)
        # weights sum to 1, so the head of the weighted features is exactly the weighted logits
        torch.testing.assert_close(hsi.head(hsi.forward_head(feats, pre_logits=True)), expect_logits)
        hsi.double_softmax = True
        torch.testing.assert_close(hsi.forward_head(feats), expect_probs)
        hsi.double_softmax = False
        hsi.branch_weight.copy_(c)


def test_reset_classifier_and_no_weight_decay():
    torch.manual_seed(0)
    m = create_model("sclusterformer_rgb", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.head.out_features == 7
    m.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.forward_head(m.forward_features(x), pre_logits=True))
    nwd = m.no_weight_decay()
    names = dict(m.named_parameters())
    assert "branch_weight" in nwd and nwd <= set(names)
    assert sum(n.endswith("sim_alpha") for n in nwd) == sum(n.endswith("sim_beta") for n in nwd) == 4


# ---- 3. cluster attention unit tests (a)-(d) -------------------------------------------------------------------------
def _cluster_inputs(similarity: str, alpha: float = 1.0, beta: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    attn = ClusterAttention(16, heads=2, head_dim=8, similarity=similarity).eval()
    with torch.no_grad():
        attn.sim_alpha.fill_(alpha)
        attn.sim_beta.fill_(beta)
    x = torch.randn(3, 8 * 8, 16)
    return attn, x, attn.cluster_inputs(x, (8, 8))


@pytest.mark.parametrize("similarity", ["cos", "euclidean"])
def test_cluster_each_token_has_exactly_one_centre(similarity):  # (a)
    attn, _, (sim, value, vc) = _cluster_inputs(similarity)
    assert sim.shape == (3 * 2, 16, 64)
    _, mask, _ = cluster_dispatch(sim, value, vc)
    assert torch.equal(mask.sum(dim=1), torch.ones(6, 64))
    assert torch.equal(mask.argmax(dim=1), sim.argmax(dim=1))


@pytest.mark.parametrize("impl", ["matmul", "broadcast"])
def test_cluster_output_is_assigned_similarity_times_centre(impl):  # (b)
    _, _, (sim, value, vc) = _cluster_inputs("cos")
    out, mask, g = cluster_dispatch(sim, value, vc, impl=impl)
    best = sim.argmax(dim=1)  # (b, N)
    s_best = sim.gather(1, best[:, None]).squeeze(1)  # (b, N)
    g_best = g.gather(1, best[..., None].expand(-1, -1, g.shape[-1]))  # (b, N, d)
    torch.testing.assert_close(out, s_best[..., None] * g_best)
    # g_m = (v^c_m + sum over members of S v_n) / (1 + members)
    m, b = 5, 1
    members = mask[b, m].bool()
    expect = (vc[b, m] + (sim[b, m, members, None] * value[b, members]).sum(0)) / (1 + members.sum())
    torch.testing.assert_close(g[b, m], expect)


@pytest.mark.parametrize("impl", ["matmul", "broadcast"])
def test_euclidean_similarity_range(impl):  # (c)
    torch.manual_seed(0)
    c, t = torch.randn(4, 16, 24), torch.randn(4, 100, 24)
    t[:, :16] = c  # identical directions -> 1
    t[:, 16:32] = -3 * c  # opposite directions -> exp(-2)
    s = euclidean_similarity(c, t, impl=impl)
    assert s.shape == (4, 16, 100)
    assert s.min() >= math.exp(-2) - 1e-5 and s.max() <= 1 + 1e-6
    diag = torch.arange(16)
    torch.testing.assert_close(s[:, diag, diag], torch.ones(4, 16), atol=2e-3, rtol=0)
    torch.testing.assert_close(s[:, diag, diag + 16], torch.full((4, 16), math.exp(-2)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("similarity", ["cos", "euclidean"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_cluster_alpha_zero_ties_to_centre_zero(similarity, beta):  # (d)
    attn, x, (sim, value, vc) = _cluster_inputs(similarity, alpha=0.0, beta=beta)
    assert torch.equal(sim, torch.full_like(sim, beta))  # LeakyReLU(beta) for beta >= 0
    out, mask, _ = cluster_dispatch(sim, value, vc)
    assert mask[:, 0].all() and not mask[:, 1:].any()
    expect = beta * (vc[:, 0] + beta * value.sum(1)) / (1 + value.shape[1])  # (b, d), one vector per head
    torch.testing.assert_close(out, expect[:, None].expand_as(out))
    y = attn(x, (8, 8))
    torch.testing.assert_close(y, y[:, :1].expand_as(y))  # every token gets the same output


def _pool_4x4(t: torch.Tensor) -> torch.Tensor:
    """(B, 64, d) tokens of an 8 x 8 map -> (B, 16, d) centres."""
    B, N, d = t.shape
    return F.adaptive_avg_pool2d(t.transpose(1, 2).reshape(B, d, 8, 8), 4).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("similarity", ["cos", "euclidean"])
def test_cluster_attention_matches_per_head_reference(similarity):
    attn, x, _ = _cluster_inputs(similarity, seed=1)
    with torch.no_grad():
        y = attn(x, (8, 8))
        f, v = attn.f(x), attn.v(x)  # (B, N, E·d)
        heads = []
        for e in range(2):
            fe, ve = f[..., e * 8:(e + 1) * 8], v[..., e * 8:(e + 1) * 8]  # (B, N, d)
            c, vc = _pool_4x4(fe), _pool_4x4(ve)  # (B, 16, d)
            if similarity == "cos":
                s = F.normalize(c, dim=-1) @ F.normalize(fe, dim=-1).transpose(1, 2)
            else:
                s = torch.exp(-torch.cdist(F.normalize(c, dim=-1), F.normalize(fe, dim=-1)))
            heads.append(cluster_dispatch(F.leaky_relu(s, 0.2), ve, vc)[0])
        torch.testing.assert_close(y, attn.proj(torch.cat(heads, dim=-1)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("similarity", ["cos", "euclidean"])
def test_cluster_impls_agree_with_gradients(similarity):
    attn, x, _ = _cluster_inputs(similarity, seed=2)
    x.requires_grad_(True)
    results = []
    for impl in ("broadcast", "matmul"):
        assert set_cluster_impl(attn, impl) == 1
        y = attn(x, (8, 8))
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        results.append((y, gx))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-3, rtol=1e-3)


# ---- 4. deformable convolution ---------------------------------------------------------------------------------------
def _spec_deform_conv(m: DeformConv2d, x: torch.Tensor) -> torch.Tensor:
    """The port's sampler written from `deform_conv_v3.py`'s rules: pad by p, positions p0 + pn + offset clamped to
    the padded map, bilinear weights from floor/ceil neighbours, modulation, samples tiled into a (h·k, w·k) map,
    stride-k convolution."""
    k, p, s = m.kernel_size, m.padding, m.stride
    off = m.offset_conv(x)
    mask = torch.sigmoid(m.mask_conv(x)) if m.mask_conv is not None else 1.0
    B, C = x.shape[:2]
    Ho, Wo, N = off.shape[2], off.shape[3], k * k
    xp = F.pad(x, (p, p, p, p))
    Hp, Wp = xp.shape[-2:]
    grid_r, grid_c = torch.meshgrid(torch.arange(k) - k // 2, torch.arange(k) - k // 2, indexing="ij")
    pr = (1 + torch.arange(Ho) * s).view(1, 1, Ho, 1) + grid_r.reshape(1, N, 1, 1) + off[:, :N]
    pc = (1 + torch.arange(Wo) * s).view(1, 1, 1, Wo) + grid_c.reshape(1, N, 1, 1) + off[:, N:]
    r0, c0 = pr.detach().floor(), pc.detach().floor()
    r1, c1 = (r0 + 1).clamp(0, Hp - 1), (c0 + 1).clamp(0, Wp - 1)
    r0, c0, pr, pc = r0.clamp(0, Hp - 1), c0.clamp(0, Wp - 1), pr.clamp(0, Hp - 1), pc.clamp(0, Wp - 1)

    def at(r, c):  # (B, C, N, Ho, Wo)
        idx = (r.long() * Wp + c.long()).flatten(1)
        return xp.flatten(2).gather(2, idx[:, None].expand(-1, C, -1)).view(B, C, N, Ho, Wo)

    val = ((1 + r0 - pr) * (1 + c0 - pc)).unsqueeze(1) * at(r0, c0) + ((1 - r1 + pr) * (1 - c1 + pc)).unsqueeze(1) * at(
        r1, c1) + ((1 + r0 - pr) * (1 - c1 + pc)).unsqueeze(1) * at(r0, c1) + ((1 - r1 + pr) * (1 + c0 - pc)).unsqueeze(
        1) * at(r1, c0)
    val = val * (mask.unsqueeze(1) if torch.is_tensor(mask) else mask)
    tiled = val.view(B, C, k, k, Ho, Wo).permute(0, 1, 4, 2, 5, 3).reshape(B, C, Ho * k, Wo * k)
    return m.conv(tiled)


@pytest.mark.parametrize("k, stride", [(3, 1), (3, 2), (9, 1)])
def test_deform_conv_zero_offset_is_conv2d(k, stride):
    torch.manual_seed(0)
    m = DeformConv2d(4, 6, kernel_size=k, padding=1, stride=stride)
    with torch.no_grad():
        m.offset_conv.bias.zero_()  # weights start at zero; the biases keep PyTorch's random init
        m.mask_conv.bias.zero_()
    x = torch.randn(2, 4, 13, 13)
    y = m(x)
    assert y.shape[-2:] == m.offset_conv(x).shape[-2:]
    # padding p = 1 centres the k x k window on the pixel: an ordinary conv with padding (k - 1) / 2;
    # sigmoid(0) = 0.5 scales every sample
    ref = F.conv2d(x, m.conv.weight, stride=stride, padding=(k - 1) // 2)
    torch.testing.assert_close(y, 0.5 * ref, atol=1e-5, rtol=1e-5)
    plain = DeformConv2d(4, 6, kernel_size=k, padding=1, stride=stride, modulation=False)
    with torch.no_grad():
        plain.offset_conv.bias.zero_()
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.conv.weight, stride=stride, padding=(k - 1) // 2),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k, p, s, hw", [(3, 1, 1, (13, 13)), (9, 1, 1, (13, 11)), (3, 1, 2, (13, 14)),
                                         (5, 2, 1, (9, 9)), (5, 4, 2, (10, 9))])
def test_deform_conv_matches_port_sampler_with_offsets(k, p, s, hw):
    torch.manual_seed(0)
    m = DeformConv2d(3, 5, kernel_size=k, padding=p, stride=s, bias=True).double()
    with torch.no_grad():  # large offsets: samples land between pixels, on the border and outside the map
        m.offset_conv.weight.normal_(0, 1.0)
        m.mask_conv.weight.normal_(0, 0.5)
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    y = m(x)
    assert y.shape[-2:] == ((hw[0] - 1) // s + 1, (hw[1] - 1) // s + 1)  # the offset map's size
    torch.testing.assert_close(y, _spec_deform_conv(m, x))


def test_deform_conv_rejects_zero_padding():
    with pytest.raises(ValueError, match="padding"):
        DeformConv2d(3, 3, padding=0)


def test_pseudo_deform_conv3d_shapes_and_init():
    m = PseudoDeformConv3d(30)
    assert n_params(m) == 34_322  # 24,300 + 4,878 + 2,439 (deformable) + 2,700 + 3 + 2
    assert not m.spatial_conv.offset_conv.weight.any() and not m.spatial_conv.mask_conv.weight.any()
    assert m(torch.randn(2, 1, 30, 13, 13)).shape == (2, 1, 30, 13, 13)


# ---- 5. fusion encoder: upstream's batch concat/split == per sample --------------------------------------------------
def _official_fusion(fe: FusionEncoder, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Upstream's formulation: concat (upper, P(lower)) on the batch axis, LayerNorm, split the batch in halves,
    q from the second half, k/v from the first, heads, full-width scale, einsum attention, projection."""
    h = fe.heads
    tokens = fe.norm(torch.cat([upper, fe.token_proj(lower)], dim=0))  # (2B, N, D)
    x1, x2 = tokens.chunk(2, dim=0)
    q, k, v = fe.to_q(x2), fe.to_k(x1), fe.to_v(x1)
    q, k, v = (t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
    attn = (torch.einsum("bhid,bhjd->bhij", q, k) * upper.shape[-1] ** -0.5).softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).flatten(2)
    return fe.proj_drop(fe.proj(out))


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_fusion_encoder_equals_batch_concat_formulation(impl):
    torch.manual_seed(0)
    fe = FusionEncoder(64, n_lower=16, n_upper=169, heads=4, impl=impl).eval()
    assert n_params(fe) == 19_641
    upper, lower = torch.randn(3, 169, 64), torch.randn(3, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(fe(upper, lower), _official_fusion(fe, upper, lower), atol=1e-5, rtol=1e-5)
        # per sample: sample i alone gives the same output as inside the batch
        torch.testing.assert_close(fe(upper[1:2], lower[1:2]), fe(upper, lower)[1:2], atol=1e-5, rtol=1e-5)
    fe.record = {}
    fe(upper, lower)
    assert fe.record["A"] == (3, 4, 169, 169) and fe.record["O"] == (3, 169, 64) and fe.record["softmax_max_err"] < 1e-5


# ---- 6. FSA DCT filters ----------------------------------------------------------------------------------------------
def test_dct_filters_are_orthonormal_dct2():
    b = dct_basis(7).double()
    torch.testing.assert_close(b @ b.T, torch.eye(7, dtype=torch.float64), atol=1e-6, rtol=0)
    t = torch.arange(7, dtype=torch.float64)
    torch.testing.assert_close(b[0], torch.full((7,), 1 / math.sqrt(7), dtype=torch.float64))
    for u in range(1, 7):
        torch.testing.assert_close(b[u], math.sqrt(2 / 7) * torch.cos(math.pi * u * (t + 0.5) / 7), atol=1e-7, rtol=0)
    fsa = FreqSpectralAttention(30)
    assert fsa.dct_filters.shape == (30, 7, 7) and n_params(fsa) == 60
    torch.testing.assert_close(fsa.dct_filters[:15], torch.full((15, 7, 7), 1 / 7))  # (u, v) = (0, 0)
    torch.testing.assert_close(fsa.dct_filters[15:], torch.outer(b[0], b[1]).float().expand(15, 7, 7))  # (0, 1)


# ---- 7. RGB variant --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rgb():
    torch.manual_seed(0)
    return create_model("sclusterformer_rgb", num_classes=4, img_size=64)


def test_rgb_parameter_count(rgb):
    # the Kaggle model of rajanikant04/plant_disease_classification has 272,897: the same minus its
    # Conv1d(32 -> 4,096) plus Conv1d(64 -> 64 tokens)
    assert n_params(rgb) == 141_889 == 272_897 - (32 * 4096 + 4096) + (64 * 64 + 64)
    assert rgb.pretrained_cfg["input_size"] == (3, 64, 64)
    assert rgb.upper.out_grid == rgb.lower.out_grid == (16, 16)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_rgb_runs_and_trains_for_odd_batches(rgb, batch):
    rgb.train()
    x = torch.randn(batch, 3, 64, 64)
    out = rgb(x)
    assert out.shape == (batch, 4) and torch.isfinite(out).all()
    rgb.zero_grad()
    F.cross_entropy(out, torch.arange(batch) % 4).backward()
    missing = [n for n, p in rgb.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_rgb_samples_do_not_leak_across_the_batch():
    torch.manual_seed(0)
    m = create_model("sclusterformer_rgb", img_size=32).eval()  # 8 x 8 tokens: same code path, 4x cheaper
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        together = m(x)
        alone = torch.cat([m(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_rgb_stride1_configuration_makes_every_pixel_a_token():
    m = create_model("sclusterformer_rgb", img_size=16, first_kernel=3, first_stride=1, first_padding=1,
                     token_cap=None)
    assert m.upper.out_grid == (16, 16) and m.fusion.token_proj.in_channels == 256
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 4)


# ---- 8. hyperspectral pipeline ---------------------------------------------------------------------------------------
H, W, BANDS = 24, 20, 40


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Synthetic scene: 3 classes with different spectra, unlabelled pixels, a correlated-band cube."""
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (H, W)).astype(np.uint8)
    gt[0, 0] = 2  # a labelled corner pixel (its patch is mostly zero padding)
    spectra = rng.normal(size=(4, BANDS)).cumsum(axis=1)
    cube = spectra[gt] + 0.3 * rng.normal(size=(H, W, BANDS))
    emap = rng.normal(3.0, 2.0, (H, W))
    d = tmp_path_factory.mktemp("hsi")
    scipy.io.savemat(d / "cube.mat", {"small": np.ones((2, 2, 2)), "scene": cube})
    scipy.io.savemat(d / "gt.mat", {"scene_gt": gt})
    np.save(d / "emap.npy", emap)
    np.save(d / "cube.npy", cube)
    return d, cube, gt, emap


def test_hsi_patches_shapes_labels_and_padding(scene):
    d, cube, gt, emap = scene
    data = load_hyperspectral(d / "cube.mat", d / "gt.mat", extra_band=d / "emap.npy", train_fraction=0.1)
    n = int((gt > 0).sum())
    assert data.patches.shape == (n, 1, 31, 13, 13) and data.patches.dtype == np.float32
    assert data.labels.dtype == np.int64 and data.classes == ["1", "2", "3"]
    r, c = data.positions.T
    assert np.array_equal(data.labels, gt[r, c] - 1)
    pca = pca_whiten(cube, 30, seed=345)
    np.testing.assert_allclose(data.patches[:, 0, :30, 6, 6], pca[r, c], atol=1e-5)  # centre pixel, PCA bands
    emap_std = (emap - emap.mean()) / emap.std()
    np.testing.assert_allclose(data.patches[:, 0, 30, 6, 6], emap_std[r, c], atol=1e-5)  # last band = EMAP
    corner = data.patches[0, 0]  # pixel (0, 0): rows/cols 0..5 are zero padding
    assert data.positions[0].tolist() == [0, 0]
    assert not corner[:, :6].any() and not corner[:, :, :6].any() and corner[:, 6:, 6:].any()
    np.testing.assert_allclose(corner[:30, 6:, 6:], pca[:7, :7].transpose(2, 0, 1), atol=1e-6)
    assert data.tensors()[0].shape == (len(data.train_idx), 1, 31, 13, 13)


def test_hsi_pca_is_whitened(scene):
    _, cube, _, _ = scene
    pca = pca_whiten(cube, 30).reshape(-1, 30).astype(np.float64)
    np.testing.assert_allclose(pca.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.cov(pca, rowvar=False), np.eye(30), atol=1e-4)


def test_hsi_split_is_stratified_disjoint_and_seeded(scene):
    d, _, gt, _ = scene
    data = load_hyperspectral(d / "cube.npy", d / "gt.mat", train_fraction=0.2, seed=7)
    assert data.patches.shape[2] == 30  # no extra band
    tr, te = data.train_idx, data.test_idx
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(data.labels)
    counts, train_counts = np.bincount(data.labels), np.bincount(data.labels[tr], minlength=3)
    assert np.all(np.abs(train_counts - 0.2 * counts) <= 1)
    again = stratified_split(data.labels, 0.2, seed=7)
    assert np.array_equal(again[0], tr) and not np.array_equal(stratified_split(data.labels, 0.2, seed=8)[0], tr)


def test_hsi_error_messages_name_the_file(scene, tmp_path):
    d, cube, gt, _ = scene
    with pytest.raises(DataError, match="nope.mat: hyperspectral cube file not found"):
        load_hyperspectral(d / "nope.mat", d / "gt.mat")
    np.save(tmp_path / "gt_small.npy", gt[:10])
    with pytest.raises(DataError, match=r"gt_small.npy: ground truth is 10x20 but the cube .*cube.npy is 24x20"):
        load_hyperspectral(d / "cube.npy", tmp_path / "gt_small.npy")
    np.save(tmp_path / "flat.npy", cube[..., 0])
    with pytest.raises(DataError, match=r"flat.npy: hyperspectral cube must be 3-D, got shape \(24, 20\)"):
        load_hyperspectral(tmp_path / "flat.npy", d / "gt.mat")
    np.save(tmp_path / "emap_bad.npy", np.zeros((5, 5)))
    with pytest.raises(DataError, match=r"emap_bad.npy: extra band is \(5, 5\)"):
        load_hyperspectral(d / "cube.npy", d / "gt.mat", extra_band=tmp_path / "emap_bad.npy")
    with pytest.raises(DataError, match=r"gt.mat: no variable 'labels' \(found: scene_gt\)"):
        load_array(d / "gt.mat", ndim=2, what="ground truth", key="labels")
    with pytest.raises(DataError, match="cannot keep 50 PCA components of 40 bands"):
        load_hyperspectral(d / "cube.npy", d / "gt.mat", pca_components=50)


def test_hsi_mat_picks_largest_fitting_array(scene):
    d, cube, _, _ = scene
    np.testing.assert_array_equal(load_array(d / "cube.mat", ndim=3, what="cube"), cube)
    assert load_array(d / "cube.mat", ndim=3, what="cube", key="small").shape == (2, 2, 2)


def test_extract_patches_positions_are_row_major():
    gt = np.array([[0, 1], [2, 0]])
    image = np.arange(4, dtype=np.float32).reshape(2, 2, 1)
    patches, labels, pos = extract_patches(image, gt, patch_size=3)
    assert pos.tolist() == [[0, 1], [1, 0]] and labels.tolist() == [0, 1]
    np.testing.assert_array_equal(patches[0, 0], [[0, 0, 0], [0, 1, 0], [2, 3, 0]])


def test_hsi_metrics():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    m = hsi_metrics(y_true, y_pred, num_classes=4)
    assert m["oa"] == pytest.approx(6 / 8)
    assert m["per_class"] == pytest.approx([0.75, 0.5, 1.0, 0.0])  # class 3 absent -> 0, as upstream
    assert m["aa"] == pytest.approx((0.75 + 0.5 + 1.0 + 0.0) / 4)
    pe = (4 * 4 + 2 * 2 + 2 * 2) / 64  # chance agreement from the marginals
    assert m["kappa"] == pytest.approx((6 / 8 - pe) / (1 - pe))


def test_hsi_model_trains_on_pipeline_patches(scene, hsi):
    d, *_ = scene
    data = load_hyperspectral(d / "cube.npy", d / "gt.mat", extra_band=d / "emap.npy", train_fraction=0.1)
    x, y = torch.from_numpy(data.patches[:2]), torch.from_numpy(data.labels[:2])
    hsi.train().zero_grad()
    F.cross_entropy(hsi(x), y).backward()
    hsi.eval()
    assert hsi.pca_stem.deform_conv.spatial_conv.offset_conv.weight.grad.abs().sum() > 0
    assert hsi.emap_stem.deform_conv.mask_conv.weight.grad.abs().sum() > 0
