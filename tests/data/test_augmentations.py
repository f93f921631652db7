"""The augmentation declarations (`vitforge.data.augmentations`) and the device ops added for seed 000's pipeline
(rotation, affine, hue, pre-resize, random resized crop, erasing area), each against torchvision.transforms.v2.

Device op vs torchvision's functional op, same image, same parameters: rotation, affine (nearest and bilinear, fill
0) and hue are exact for uint8 and float images. The resized crop and the pre-resize are exact to float rounding
(1e-5) against torchvision on float images, i.e. also against what torchvision computes for uint8 images on a GPU
(float, clamp, round); torchvision's CPU uint8 kernel rounds in fixed point after each pass, one grey level away at
most for bilinear. Sampled parameters: the device draws have the ranges and distributions of torchvision's
`make_params` (total-variation distance of the histograms within sampling noise).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from vitforge.config import AugConfig, DataConfig, MixConfig, load_config
from vitforge.data import augment as A
from vitforge.data import gpu_policies as G
from vitforge.data.augmentations import (
    AUGMENTATIONS,
    Frame,
    build_device_policy,
    device_ops,
    has_policies,
    invariances,
    worker_ops,
)
from vitforge.data.dataset import open_data
from vitforge.data.loader import DeviceLoader, WorkerLoader
from vitforge.data.preprocess import Preprocess
from vitforge.data.streams import StreamOptions, build_train_stream
from vitforge.data.transforms import train_transform
from vitforge.errors import ConfigError
from vitforge.eval.tta import trained_invariances

CPU = torch.device("cpu")
MUFFYN = dict(pre_resize=416, rrc_scale=[0.7, 1.0], rotate=15, affine_translate=0.1, affine_scale=[0.9, 1.1],
              color_jitter=0.3, hue=0.05, random_erasing=0.2, erasing_scale=[0.02, 0.15])


def images(n: int = 16, H: int = 32, W: int = 32, dtype: str = "uint8") -> torch.Tensor:
    """(n, 3, H, W): noise and smooth ramps, uint8 or float in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, H, W), generator=g, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    x[n // 2:] = ((yy * 7 + xx * 3 + torch.arange(3)[:, None, None] * 40) % 256).to(torch.uint8)
    return x if dtype == "uint8" else x.float() / 255


def stack(fn, *per_sample) -> torch.Tensor:
    return torch.stack([fn(*args) for args in zip(*per_sample, strict=True)])


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of two samples. For samples of 4,000
    and 4,000 from one distribution it exceeds 0.05 with probability < 1e-4 (continuous case; less when discrete)."""
    at = torch.cat([a, b]).unique().double()

    def cdf(s: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(s.double().sort().values, at, right=True) / len(s)

    return (cdf(a) - cdf(b)).abs().max().item()


# ---- the declarations ----------------------------------------------------------------------------------------------
def test_every_aug_option_belongs_to_one_declaration():
    owners = [f for a in AUGMENTATIONS for f in a.fields]
    assert len(owners) == len(set(owners))  # declared once
    pipeline = {"repeats", "backend"}  # how many copies per epoch and where policies run, not an augmentation
    assert set(owners) | pipeline == {f.name for f in dataclasses.fields(AugConfig)}
    pixels = [a for a in AUGMENTATIONS if a.stage == "pixels"]
    first_policy = next(i for i, a in enumerate(pixels) if a.policy)
    assert all(a.policy for a in pixels[first_policy:])  # TrainStream runs the frame ops, then the policies
    assert [a.name for a in AUGMENTATIONS if a.stage == "normalised"] == ["random_erasing"]


def test_both_paths_build_the_same_augmentations_in_the_same_order():
    aug = AugConfig(**MUFFYN, crop="rrc", auto_augment="cifar10")
    frame = Frame(small=True, size=32, native=32)
    workers = [type(t).__name__ for t in worker_ops(aug, frame)]
    assert workers == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "RandomRotation", "RandomAffine",
                       "AutoAugment", "ColorJitter"]
    device = [(a.name, op) for a, op in device_ops(aug, frame)]
    assert [n for n, _ in device] == ["pre_resize", "crop", "hflip", "rotate", "affine", "auto_augment",
                                      "color_jitter"]
    assert [type(op).__name__ for n, op in device if n in ("rotate", "affine", "color_jitter")] == [
        "RandomRotation", "RandomAffine", "ColorJitter"]
    assert has_policies(AugConfig(rotate=5)) and not has_policies(AugConfig(pre_resize=40, crop="rrc"))
    composed = build_device_policy(aug)
    assert [type(p) for p in composed.policies] == [G.RandomRotation, G.RandomAffine, G.AutoAugment, G.ColorJitter]


def test_muffyn_worker_transform_matches_the_seed_pipeline():
    t = train_transform(384, AugConfig(**MUFFYN), small=False)
    ops = t.transforms[1:-1]
    assert [type(o).__name__ for o in ops] == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip",
                                               "RandomRotation", "RandomAffine", "ColorJitter"]
    resize, rrc, _, rot, affine, cj = ops
    assert resize.size == [416, 416] and rrc.size == (384, 384) and rrc.scale == (0.7, 1.0)
    assert rot.degrees == [-15.0, 15.0] and rot.interpolation == InterpolationMode.BILINEAR
    assert affine.degrees == [0.0, 0.0] and affine.translate == (0.1, 0.1) and affine.scale == (0.9, 1.1)
    assert affine.shear is None and cj.brightness == (0.7, 1.3) and cj.hue == (-0.05, 0.05)
    out = t(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)))
    assert out.shape == (3, 384, 384) and out.dtype == torch.uint8
    assert train_transform(32, AugConfig(), small=True, native=32).transforms[1].padding == [4, 4, 4, 4]


def test_a_padded_crop_is_refused_for_large_images():
    with pytest.raises(ConfigError, match="data.aug.crop=pad: the padded random crop is for images of at most 64 px"):
        train_transform(224, AugConfig(crop="pad"), small=False)


@pytest.mark.parametrize("field, value, message", [
    ("rotate", 200.0, "data.aug.rotate: must be in [0, 180] degrees"),
    ("hue", 0.6, "data.aug.hue: must be in [0, 0.5]"),
    ("affine_scale", [1.1, 0.9], "data.aug.affine_scale: must be [min, max] with 0 < min <= max"),
    ("erasing_scale", [0.0, 0.2], "data.aug.erasing_scale: must be [min, max] with 0 < min <= max <= 1"),
    ("crop", "random", "data.aug.crop: 'random' is not one of auto, pad, rrc"),
    ("rand_augment", "n2m31", "data.aug.rand_augment: 'n2m31' is not of the form n<ops>m<magnitude> with a "
                              "magnitude of 0-30"),
])
def test_bad_augmentation_values_name_the_key(field, value, message):
    with pytest.raises(ConfigError) as e:
        AugConfig(**{field: value})
    assert str(e.value).startswith(message)


def test_rand_augment_is_parsed_once_for_both_paths():
    aug = AugConfig(rand_augment="n3m12")
    assert aug.rand_augment_args == (3, 12)
    worker, = worker_ops(AugConfig(rand_augment="n3m12", crop_padding=0, hflip=False), Frame())
    device = build_device_policy(aug)
    assert (worker.num_ops, worker.magnitude) == (device.num_ops, device.magnitude) == (3, 12)


# ---- device ops against torchvision's functional ops, fixed parameters ---------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "float"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_rotation_and_affine_equal_torchvision(dtype, mode):
    x = images(16, 32, 28, dtype)
    interp = InterpolationMode(mode)
    angle = torch.linspace(-15, 15, 16, dtype=torch.float64)
    out = G.RandomRotation(15, mode).apply(x, angle)
    ref = stack(lambda im, a: TF.rotate(im, float(a), interpolation=interp, fill=0), x, angle)
    assert out.dtype == x.dtype and torch.equal(out, ref)
    tx = torch.linspace(-3, 3, 16, dtype=torch.float64).round()
    scale = torch.linspace(0.9, 1.1, 16, dtype=torch.float64)
    shear = torch.linspace(-10, 10, 16, dtype=torch.float64)
    out = G.RandomAffine(0.1, (0.9, 1.1), 10, mode).apply(x, tx, -tx, scale, shear)
    ref = stack(lambda im, t, s, h: TF.affine(im, angle=0.0, translate=[int(t), -int(t)], scale=float(s),
                                              shear=[float(h), 0.0], interpolation=interp, fill=0), x, tx, scale, shear)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_hue_and_colour_jitter_with_hue_equal_torchvision(dtype):
    x = images(24, 16, 16, dtype)
    shift = torch.linspace(-0.5, 0.5, 24, dtype=torch.float64)
    out = G.apply_ops(x, torch.full((24,), G.OP["Hue"]), shift)
    assert torch.equal(out, stack(lambda im, s: TF.adjust_hue(im, float(s)), x, shift))
    cj = G.ColorJitter(0.3, 0.3, 0.3, hue=0.05)
    stages = cj.stages(24, 16, 16, A.step_generator(CPU, 1), CPU)
    out = x
    for op, mag in stages:
        out = G.apply_ops(out, op, mag, cj.ops)
    fns = {"Brightness": lambda im, m: TF.adjust_brightness(im, 1 + m), "Contrast": lambda im, m: TF.adjust_contrast(
        im, 1 + m), "Color": lambda im, m: TF.adjust_saturation(im, 1 + m), "Hue": TF.adjust_hue}
    for i in range(24):
        ref = x[i]
        for op, mag in stages:  # this sample's four adjustments in its own order
            ref = fns[G.OPS[int(op[i])]](ref, float(mag[i]))
        assert torch.equal(out[i], ref)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_resized_crop_and_pre_resize_equal_torchvision(mode):
    interp = InterpolationMode(mode)
    x = images(16, 32, 32, "float")
    top, left = torch.tensor([0, 3, 5, 0, 10, 1, 0, 7] * 2), torch.tensor([0, 2, 9, 4, 0, 0, 16, 3] * 2)
    h, w = torch.tensor([32, 10, 20, 5, 22, 31, 16, 25] * 2), torch.tensor([32, 12, 23, 28, 8, 32, 16, 3] * 2)
    out = A.resized_crop(x, top, left, h, w, mode)
    ref = stack(lambda im, t, le, hh, ww: TF.resized_crop(im, int(t), int(le), int(hh), int(ww), [32, 32],
                                                          interpolation=interp, antialias=True), x, top, left, h, w)
    assert (out - ref).abs().max() <= 1e-5
    u8 = (x * 255).round().to(torch.uint8)
    out8 = A.resized_crop(u8, top, left, h, w, mode)  # torchvision's float computation, clamped and rounded
    ref8 = stack(lambda im, t, le, hh, ww: TF.resized_crop(im.float(), int(t), int(le), int(hh), int(ww), [32, 32],
                                                           interpolation=interp, antialias=True), u8, top, left, h, w)
    assert out8.dtype == torch.uint8 and torch.equal(out8, ref8.clamp(0, 255).round().to(torch.uint8))
    if mode == "bilinear":  # torchvision's CPU uint8 kernel: fixed point, rounded per pass
        cpu = stack(lambda im, t, le, hh, ww: TF.resized_crop(im, int(t), int(le), int(hh), int(ww), [32, 32],
                                                              antialias=True), u8, top, left, h, w)
        assert (out8.int() - cpu.int()).abs().max() <= 1
    for size in (20, 48):
        assert (A.resize_image(x, size, mode) - TF.resize(x, [size, size], interpolation=interp)).abs().max() <= 1e-5


# ---- sampled parameters: ranges and distributions as torchvision's make_params ---------------------------------------
@pytest.mark.parametrize("H, W, scale, ratio", [
    (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)), (24, 40, (0.7, 1.0), (3 / 4, 4 / 3)),
    (32, 32, (0.5, 1.0), (0.3, 3.3)),  # some of the ten tries miss
    (20, 40, (0.9, 1.0), (2.5, 3.5)),  # every try misses: the central crop
])
def test_random_resized_crop_boxes_are_drawn_as_torchvision_draws_them(H, W, scale, ratio):
    n = 4000
    top, left, h, w = A.rrc_boxes(n, H, W, scale, ratio, A.step_generator(CPU, 2), CPU)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    torch.manual_seed(0)
    ref = v2.RandomResizedCrop(H, scale=scale, ratio=ratio)
    params = [ref.make_params([torch.zeros(3, H, W)]) for _ in range(n)]
    rt, rl, rh, rw = (torch.tensor([p[k] for p in params]) for k in ("top", "left", "height", "width"))
    for ours, theirs in ((h, rh), (w, rw), (top, rt), (left, rl), (h * w, rh * rw), (w / h, rw / rh)):
        assert ks_distance(ours, theirs) < 0.05


def test_rotation_affine_and_hue_draws_have_torchvision_ranges():
    n, H, W = 4000, 30, 40
    gen = A.step_generator(CPU, 3)
    angle = G.RandomRotation(15).angles(n, gen, CPU)
    assert angle.abs().max() <= 15 and ks_distance(angle, 30 * torch.rand(n, dtype=torch.float64) - 15) < 0.05
    p = G.RandomAffine(0.1, (0.9, 1.1), 8).params(n, H, W, gen, CPU)
    torch.manual_seed(0)
    ref = v2.RandomAffine(0, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=(-8, 8))
    rp = [ref.make_params([torch.zeros(3, H, W)]) for _ in range(n)]
    theirs = {"translate_x": [q["translate"][0] for q in rp], "translate_y": [q["translate"][1] for q in rp],
              "scale": [q["scale"] for q in rp], "shear_x": [q["shear"][0] for q in rp]}
    for key, values in theirs.items():
        assert ks_distance(p[key], torch.tensor(values, dtype=torch.float64)) < 0.05, key
    assert p["translate_x"].abs().max() == 4 and p["translate_y"].abs().max() == 3  # round(0.1·40), round(0.1·30)
    assert 0.9 <= p["scale"].min() and p["scale"].max() <= 1.1 and p["shear_x"].abs().max() <= 8
    stages = G.ColorJitter(0.3, 0.3, 0.3, hue=0.05).stages(n, H, W, gen, CPU)
    shift = torch.cat([m[op == G.OP["Hue"]] for op, m in stages])
    assert len(shift) == n and shift.abs().max() <= 0.05
    assert ks_distance(shift, 0.1 * torch.rand(n, dtype=torch.float64) - 0.05) < 0.05
    slots = torch.stack([op for op, _ in stages], 1)  # each sample: the four adjustments, in one of 24 orders
    assert len(torch.unique(slots, dim=0)) == 24


def test_erasing_boxes_cover_the_configured_area():
    x = torch.zeros(4000, 1, 64, 64)
    for lo, hi in ((0.02, 0.15), (0.02, 1 / 3)):
        erased = (A.batch_erase(x, 1.0, A.step_generator(CPU, 4), scale=(lo, hi)) != 0).flatten(1).float().mean(1)
        assert erased.min() >= 0.8 * lo and erased.max() <= hi * 1.05
        if hi < 0.2:  # a box of at most 15% always fits, so the area is uniform in [lo, hi]
            assert abs(erased.mean().item() - (lo + hi) / 2) < 0.005


# ---- the training stream: both paths, exact resume -----------------------------------------------------------------
def _stream(folder, backend: str, epochs: int | None = None, mix: MixConfig | None = None, **aug):
    cfg = DataConfig(train=str(folder), val_split=0, batch_size=8, aug=AugConfig(backend=backend, **aug),
                     mix=mix or MixConfig())
    data = open_data(cfg)
    opt = StreamOptions(batch_size=8, device=CPU, seed=4, num_workers=0, epochs=epochs)
    return build_train_stream(data.train, Preprocess(16, [0.5] * 3, [0.25] * 3), cfg, opt,
                              num_classes=len(data.classes))


SEED_OPS = dict(pre_resize=20, crop="rrc", rrc_scale=[0.5, 1.0], rotate=15, affine_translate=0.1,
                affine_scale=[0.9, 1.1], affine_shear=5, color_jitter=0.3, hue=0.05, random_erasing=0.5,
                erasing_scale=[0.02, 0.15])


@pytest.mark.parametrize("backend", ["device", "workers"])
def test_new_augmentations_run_on_both_paths_and_resume_exactly(image_folder, backend):
    s = _stream(image_folder, backend, **SEED_OPS)
    assert isinstance(s.loader, DeviceLoader if backend == "device" else WorkerLoader)
    plain = _stream(image_folder, backend, crop_padding=0, hflip=False)
    batches = [b[0] for b in s]
    assert batches[0].shape == (8, 3, 16, 16) and not torch.allclose(batches[0], next(iter(plain))[0])
    s.set_epoch(0, start_batch=2)  # resume inside the epoch: the same augmentation as the uninterrupted run
    assert torch.equal(next(iter(s))[0], batches[2])
    s.set_epoch(1)
    assert not torch.equal(next(iter(s))[0], batches[0])


def test_mixing_in_phase_two_only(image_folder):
    mix = MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, on_epoch=2)
    s = _stream(image_folder, "device", epochs=6, mix=mix)
    kinds = []
    for epoch in range(4):
        s.set_epoch(epoch)
        kinds.append([y.ndim for _, y, _ in s])  # class indices (1-D) or mixed soft targets (B, K)
    assert kinds == [[1] * 4, [1] * 4, [2] * 4, [2] * 4]
    assert [MixConfig(mixup_alpha=1, on_epoch=0.25, off_epoch=0.75).active(e, 8) for e in range(8)] == [
        False, False, True, True, True, True, False, False]
    assert [MixConfig(cutmix_alpha=1, off_epoch=3).active(e, 8) for e in range(5)] == [True] * 3 + [False] * 2
    assert not MixConfig(on_epoch=1).active(4, 8)  # no alpha: never
    with pytest.raises(ConfigError, match="a fraction of the run needs its number of epochs"):
        _stream(image_folder, "device", mix=MixConfig(mixup_alpha=0.4, on_epoch=0.5))


@pytest.mark.parametrize("overrides, message", [
    (["data.mix.on_epoch=2.5"], "data.mix.on_epoch: must be an epoch (a whole number) or a fraction of train.epochs"),
    (["data.mix.on_epoch=10"], "data.mix.on_epoch: epoch 10 is not before the end of training (train.epochs=10)"),
    (["data.mix.on_epoch=0.5", "data.mix.off_epoch=4"], "data.mix.off_epoch: epoch 4 is not after data.mix.on_epoch "
                                                        "(epoch 5)"),
])
def test_an_empty_mixing_window_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.mix.mixup_alpha=0.2", *overrides])


def test_a_mixing_window_is_only_checked_when_mixing_is_on():
    assert load_config(None, ["data.mix.on_epoch=10"]).data.mix.on_epoch == 10  # no alpha: never mixes anyway
    cfg = load_config(None, ["data.mix.cutmix_alpha=1", "train.epochs=40", "train.head_epochs=5",
                             "data.mix.on_epoch=5", "data.mix.off_epoch=0.9"])
    assert [cfg.data.mix.active(e, 40) for e in (4, 5, 35, 36)] == [False, True, True, False]


# ---- what test-time augmentation reads -------------------------------------------------------------------------------
def test_invariances_follow_the_declarations():
    small, large = Frame(small=True), Frame(small=False)
    assert invariances(AugConfig(crop_padding=0, hflip=False), small) == {"mirror": False, "shift": False}
    assert invariances(AugConfig(crop_padding=0, hflip=False, crop="rrc"), small)["shift"]
    assert invariances(AugConfig(crop_padding=0, affine_translate=0.1), small) == {"mirror": True, "shift": True}
    assert not invariances(AugConfig(crop_padding=0, rotate=15, affine_scale=[0.9, 1.1]), small)["shift"]
    assert invariances(AugConfig(crop_padding=0), large)["shift"]  # large images: random resized crops

    def meta(**aug):
        return {"config": {"data": {"aug": {"hflip": True, "crop_padding": 0, **aug}}},
                "preprocess": {"img_size": 32}}

    assert trained_invariances(meta(affine_translate=0.1))["shift"]
    assert not trained_invariances(meta(some_future_option=1))["shift"]  # unknown keys of another version: ignored


def test_small_images_with_a_pre_resized_random_resized_crop_on_both_paths(tmp_path):
    folder = make_image_folder(tmp_path / "tiny", per_class=8, size=12)
    for backend in ("device", "workers"):
        s = _stream(folder, backend, pre_resize=24, crop="rrc", rrc_scale=[0.3, 1.0], crop_padding=0)
        x, _, _ = next(iter(s))
        assert x.shape == (8, 3, 16, 16) and torch.isfinite(x).all()
        if backend == "device":
            (_, pre), (_, rrc), _ = device_ops(s.aug, Frame(small=True))
            raw = s.loader.images[:8]
            assert pre(raw, A.step_generator(CPU, 0)).shape[-1] == 24
            assert rrc(pre(raw, None), A.step_generator(CPU, 0)).shape[-1] == 24
    assert math.isclose(AugConfig().erasing_scale[1], 1 / 3)
