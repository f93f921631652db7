"""Per-sample policies batched on the device (`vitforge.data.gpu_policies`) against torchvision.transforms.v2.

Reference = torchvision's own op kernel (`_AutoAugmentBase._apply_image_or_video_transform`, i.e. the functional ops
with nearest interpolation and zero fill) applied to one image at a time with the magnitude that sample drew.

Tolerance: geometric ops (shear, translate, rotate: same inverse matrix, same grid, nearest sampling) and the integer
ops (posterize, solarize, invert, autocontrast, equalize) must be exact. The colour blends (brightness, colour,
contrast, sharpness) truncate a float result to uint8, so a last-bit difference in the float arithmetic (a fused
versus a separate multiply-add, which differs between CPU vector units and GPU kernels) moves a value that lands next
to an integer by one grey level; they may differ by at most 1 grey level in at most 0.5% of values (on this CPU they
are exact). Float images: within 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from vitforge.config import AugConfig, DataConfig
from vitforge.data import gpu_policies as G
from vitforge.data.augment import step_generator
from vitforge.data.augmentations import build_device_policy
from vitforge.data.dataset import open_data
from vitforge.data.loader import DeviceLoader, WorkerLoader
from vitforge.data.preprocess import Preprocess
from vitforge.data.streams import StreamOptions, build_train_stream

CPU = torch.device("cpu")
COLOUR = {"Brightness", "Color", "Contrast", "Sharpness"}
SPACES = {"aa": (v2.AutoAugment._AUGMENTATION_SPACE, 10), "ta_wide": (v2.TrivialAugmentWide._AUGMENTATION_SPACE, 31)}
_REF = v2.AutoAugment()


def reference(img: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """torchvision's kernel for one op on one image (what AutoAugment/RandAugment/TrivialAugmentWide call)."""
    return _REF._apply_image_or_video_transform(img, name, magnitude, interpolation=v2.InterpolationMode.NEAREST,
                                                fill={"others": None})


def images(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): noise, low-contrast noise, constant images, one flat channel, smooth ramps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[2:5] = (x[2:5].float() * 0.25 + 60).to(torch.uint8)
    x[5] = 77
    x[6, 0] = 200
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x[7:10] = ((yy * 7 + xx * 3 + torch.arange(3)[:, None, None] * 40) % 256).to(torch.uint8)
    return x


def check_close(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if out.is_floating_point():
        assert (out - ref).abs().max().item() <= 1e-5, name
        return
    d = (out.int() - ref.int()).abs()
    if name in COLOUR:
        assert d.max().item() <= 1 and (d > 0).float().mean().item() <= 0.005, name
    else:
        assert torch.equal(out, ref), name


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_each_op_at_fixed_magnitudes_matches_torchvision(space, dtype):
    x = images(12)
    x = x if dtype == "uint8" else x.float() / 255
    table, num_bins = SPACES[space]
    values, signed = G.magnitude_table(table, num_bins, 32, 32)
    bins = sorted({0, 1, num_bins // 2, num_bins - 2, num_bins - 1, 20 % num_bins})  # 20/31 = a 90-degree rotation
    for name in [*table, "Invert"]:
        k = G.OP[name]
        for b in bins:
            for sign in (1, -1) if signed[k] else (1,):
                m = float(values[k, b]) * sign
                out = G.apply_ops(x, torch.full((len(x),), k), torch.full((len(x),), m, dtype=torch.float64))
                assert out.dtype == x.dtype and out.shape == x.shape
                check_close(out, torch.stack([reference(img, name, m) for img in x]), f"{name} {m}")


def test_magnitude_table_is_torchvisions():
    values, signed = G.magnitude_table(v2.TrivialAugmentWide._AUGMENTATION_SPACE, 31, 32, 32)
    assert values[G.OP["Rotate"], 20] == 90.0 and values[G.OP["TranslateX"], 30] == 32.0
    assert values[G.OP["Posterize"]].tolist()[:3] == [8.0, 8.0, 8.0] and values[G.OP["Posterize"], 30] == 2.0
    assert signed[G.OP["ShearX"]] and not signed[G.OP["Solarize"]] and values[G.OP["Identity"]].abs().sum() == 0
    values, _ = G.magnitude_table(v2.AutoAugment._AUGMENTATION_SPACE, 10, 32, 32)
    assert math.isclose(values[G.OP["TranslateX"], 9], 150 / 331 * 32, rel_tol=1e-6)


@pytest.mark.parametrize("policy", [G.AutoAugment("cifar10"), G.TrivialAugmentWide(), G.RandAugment(2, 9)],
                         ids=["autoaugment", "trivialaugment", "randaugment"])
def test_every_sample_gets_its_own_ops_like_torchvision(policy):
    """Batched application of the drawn stages == torchvision applied image by image with the same draws."""
    x = images(24)
    stages = policy.stages(len(x), 32, 32, step_generator(CPU, 3), CPU)
    out = x
    for op, mag in stages:
        out = G.apply_ops(out, op, mag, policy.ops)
    assert len({int(op) for op, _ in stages for op in op}) > 3  # the batch really mixes different ops
    for i, img in enumerate(x):
        ref = img
        for op, mag in stages:
            ref = reference(ref, G.OPS[int(op[i])], float(mag[i]))
        d = (out[i].int() - ref.int()).abs()
        assert d.max().item() <= 1 and (d > 0).float().mean().item() <= 0.005


def test_a_sample_does_not_depend_on_the_rest_of_the_batch():
    x = images(16)
    op = torch.arange(16) % len(G.OPS)
    mag = torch.linspace(-0.3, 0.9, 16, dtype=torch.float64)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    full = G.apply_ops(x, op, mag)
    assert torch.equal(G.apply_ops(x[perm], op[perm], mag[perm]), full[perm])
    assert torch.equal(G.apply_ops(x[3:5], op[3:5], mag[3:5]), full[3:5])


def test_same_generator_same_batch_different_seed_different_batch():
    x = images(32)
    for policy in (G.AutoAugment("cifar10"), G.TrivialAugmentWide(), G.RandAugment(2, 9), G.ColorJitter(0.4, 0.4, 0.4)):
        a = policy(x, step_generator(CPU, 0, 1, 2))
        assert torch.equal(a, policy(x, step_generator(CPU, 0, 1, 2)))
        assert not torch.equal(a, policy(x, step_generator(CPU, 0, 1, 3)))
        assert a.dtype == torch.uint8 and not torch.equal(a, x)


def _freq(t: torch.Tensor, k: int) -> float:
    return (t == k).double().mean().item()


def test_autoaugment_draws_sub_policies_with_their_probabilities():
    n = 100_000
    policy = G.AutoAugment("cifar10")
    (op0, mag0), (op1, _) = policy.stages(n, 32, 32, step_generator(CPU, 5), CPU)
    subs = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._get_policies(v2.AutoAugmentPolicy.CIFAR10)
    for stage, op in ((0, op0), (1, op1)):
        for name in {s[stage][0] for s in subs}:
            expected = sum(s[stage][1] for s in subs if s[stage][0] == name) / len(subs)
            sigma = math.sqrt(expected * (1 - expected) / n)
            assert abs(_freq(op, G.OP[name]) - expected) < 5 * sigma + 1e-9, (stage, name)
    # sub-policy 1 is (Rotate 0.7 bin 2, ...): |magnitude| = linspace(0, 30, 10)[2], each sign half the time
    rot = mag0[op0 == G.OP["Rotate"]]
    assert torch.allclose(rot.abs(), torch.full_like(rot, 30 * 2 / 9), atol=1e-5)
    assert abs((rot > 0).double().mean().item() - 0.5) < 0.05


def test_trivialaugment_and_randaugment_are_uniform_over_ops_and_bins():
    n = 70_000
    (op, mag), = G.TrivialAugmentWide().stages(n, 32, 32, step_generator(CPU, 6), CPU)
    counts = torch.bincount(op, minlength=len(G.OPS))
    assert counts[G.OP["Invert"]] == 0 and (counts[:14] - n / 14).abs().max() < 5 * math.sqrt(n / 14)
    rot = mag[op == G.OP["Rotate"]]
    assert len(torch.unique(rot)) == 61  # 31 bins, each signed, 0 once
    stages = G.RandAugment(num_ops=3, magnitude=9).stages(n, 32, 32, step_generator(CPU, 7), CPU)
    assert len(stages) == 3
    for op, mag in stages:
        shear = mag[op == G.OP["ShearY"]].abs()
        assert torch.allclose(shear, torch.full_like(shear, 0.3 * 9 / 30))
        assert abs(_freq(op, G.OP["Identity"]) - 1 / 14) < 5 * math.sqrt(1 / 14 / n)


def test_color_jitter_factors_and_random_order():
    n = 30_000
    stages = G.ColorJitter(0.4, 0.4, 0.4).stages(n, 32, 32, step_generator(CPU, 8), CPU)
    ops = torch.stack([op for op, _ in stages], 1)  # (n, 3): each sample does all three, in its own order
    assert torch.equal(ops.sort(1).values, torch.tensor(sorted(G.OP[k] for k in ("Brightness", "Contrast", "Color")))
                       .expand(n, 3))
    orders = torch.unique(ops, dim=0, return_counts=True)[1]
    assert len(orders) == 6 and (orders - n / 6).abs().max() < 5 * math.sqrt(n / 6)
    factors = torch.cat([1 + mag for _, mag in stages])
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and abs(factors.mean().item() - 1) < 0.01


def test_build_device_policy_follows_the_aug_config():
    assert build_device_policy(AugConfig()) is None
    assert isinstance(build_device_policy(AugConfig(auto_augment="cifar10")), G.AutoAugment)
    both = build_device_policy(AugConfig(trivial_augment=True, rand_augment="n2m9", color_jitter=0.2))
    assert [type(p) for p in both.policies] == [G.TrivialAugmentWide, G.RandAugment, G.ColorJitter]
    assert both.policies[1].num_ops == 2 and both.policies[1].magnitude == 9
    assert G.AutoAugment("cifar10").ops[0] == "Identity" and "Invert" in G.AutoAugment("cifar10").ops


def _stream(folder, backend: str, **aug):
    cfg = DataConfig(train=str(folder), val_split=0, batch_size=8, aug=AugConfig(backend=backend, **aug))
    data = open_data(cfg)
    pre = Preprocess(16, [0.5] * 3, [0.25] * 3)
    opt = StreamOptions(batch_size=8, device=CPU, seed=4, num_workers=0)
    return build_train_stream(data.train, pre, cfg, opt, num_classes=len(data.classes))


def test_train_stream_runs_policies_on_the_device_when_asked(image_folder):
    dev = _stream(image_folder, "device", auto_augment="cifar10")
    assert isinstance(dev.loader, DeviceLoader) and isinstance(dev.policy, G.AutoAugment)
    plain = _stream(image_folder, "device")
    assert plain.policy is None
    (xa, _, ia), (xb, _, ib) = next(iter(dev)), next(iter(plain))
    assert torch.equal(ia, ib) and xa.shape == xb.shape == (8, 3, 16, 16) and not torch.allclose(xa, xb)
    second = [b[0] for b in dev][1]
    dev.set_epoch(0, start_batch=1)  # resume inside an epoch: the same augmentation as the uninterrupted run
    assert torch.equal(next(iter(dev))[0], second)
    auto_on_cpu = _stream(image_folder, "auto", auto_augment="cifar10")
    assert isinstance(auto_on_cpu.loader, WorkerLoader) and auto_on_cpu.policy is None


def test_policies_keep_values_in_range_on_float_batches():
    x = torch.from_numpy(np.random.default_rng(0).random((64, 3, 8, 8), dtype=np.float32))
    out = G.TrivialAugmentWide()(x, step_generator(CPU, 9))
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
