"""Test-time augmentation views (issue 5): counts, weights, exact geometry, identities, probability averaging."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitforge.errors import ConfigError
from vitforge.eval.tta import (
    TTA_SETS,
    affine,
    blur,
    colour,
    corner,
    forward_probs,
    hflip,
    rotate,
    shift,
    trained_invariances,
    tta_probs,
    tta_views,
    zoom,
)

MEAN, STD = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])


def views(name: str):
    return tta_views(name, mean=MEAN, std=STD)


def batch(size: int = 16, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ramp(size: int) -> torch.Tensor:
    """(1, 1, S, S) whose value is the normalised x coordinate of each pixel centre, (2j + 1) / S - 1."""
    u = (2 * torch.arange(size) + 1) / size - 1
    return u.expand(size, size)[None, None].clone()


@pytest.mark.parametrize("name, count", [("none", 1), ("flip", 2), ("flip-shift", 6), ("saccadic12", 12)])
def test_view_counts_weights_and_shapes(name, count):
    vs = views(name)
    assert len(vs) == count
    assert sum(v.weight for v in vs) == pytest.approx(1.0)
    x = batch(size=12)
    assert torch.equal(vs[0].fn(x), x)  # the first view is always the plain image
    for v in vs:
        y = v.fn(x)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device, v.name


@pytest.mark.parametrize("mirror, shift, kept", [
    (False, True, ["centre", "shift-1", "shift+1"]),
    (True, False, ["centre", "flip"]),
    (False, False, ["centre"]),
])
def test_views_a_model_was_not_trained_for_are_left_out(mirror, shift, kept):
    vs = tta_views("flip-shift", mirror=mirror, shift=shift)
    assert [v.name for v in vs] == kept
    assert sum(v.weight for v in vs) == pytest.approx(1.0)
    full = {v.name: v.weight for v in views("flip-shift")}
    assert [v.weight for v in vs] == pytest.approx([full[v.name] / sum(full[k] for k in kept) for v in vs])
    s12 = [v.name for v in tta_views("saccadic12", mean=MEAN, std=STD, mirror=mirror, shift=shift)]
    assert ("flip" in s12) == mirror and ("zoom+flip" in s12) == mirror and len(s12) == (12 if mirror else 10)


def test_invariances_come_from_the_training_config():
    def meta(size, **aug):
        return {"config": {"data": {"aug": {"hflip": True, "crop_padding": 4, **aug}}},
                "preprocess": {"img_size": size}}

    assert trained_invariances(meta(32)) == {"mirror": True, "shift": True}
    assert trained_invariances(meta(8, hflip=False, crop_padding=0)) == {"mirror": False, "shift": False}
    assert trained_invariances(meta(224, crop_padding=0)) == {"mirror": True, "shift": True}  # random resized crops
    assert trained_invariances({}) == {"mirror": True, "shift": True}  # no config: every view


def test_sets_are_listed_and_unknown_names_rejected():
    assert TTA_SETS == ("none", "flip", "flip-shift", "saccadic12")
    with pytest.raises(ConfigError, match="flip-shift"):
        tta_views("flips")
    with pytest.raises(ConfigError, match="mean and std"):
        tta_views("saccadic12")


def test_flip_of_a_symmetric_image_gives_identical_views():
    x = batch()
    sym = x + x.flip(-1)  # left-right symmetric
    a, b = (v.fn(sym) for v in views("flip"))
    assert torch.equal(a, b)
    assert not torch.equal(*(v.fn(x) for v in views("flip")))


def test_flip_shift_follows_airbench():
    vs = views("flip-shift")
    assert [v.weight for v in vs] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]  # 0.5 centre pair, 0.25 per shift
    x = batch()
    moved = shift(x, 1, 1)
    assert torch.equal(moved[..., 1:, 1:], x[..., :-1, :-1])  # content moves down-right by one pixel
    assert torch.equal(moved[..., 0, 1:], x[..., 1, :-1])  # border reflected
    assert torch.equal(shift(x, -1, -1)[..., :-1, :-1], x[..., 1:, 1:])
    by_name = {v.name: v.fn for v in vs}
    assert torch.equal(by_name["shift+1+flip"](x), hflip(shift(x, 1, 1)))


def test_affine_identity_and_quarter_turns_are_exact():
    x = batch(size=10)
    assert torch.allclose(affine(x), x, atol=1e-6)
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, (-2, -1)), atol=1e-5)  # counter-clockwise
    assert torch.allclose(rotate(x, -90), torch.rot90(x, -1, (-2, -1)), atol=1e-5)


def test_zoom_and_corner_windows():
    # Bilinear sampling reproduces a linear ramp exactly, so the sampled window can be read off the values.
    r, s = ramp(20), 1 / 1.15
    inner = (..., slice(1, -1))  # the outermost columns of a flush window sample just beyond the edge pixel centre
    assert torch.allclose(zoom(r), r * s, atol=1e-5)  # centre window of 1/1.15 of the side
    assert torch.allclose(corner(r, "tl")[inner], (r * s - (1 - s))[inner], atol=1e-5)  # flush with the left
    assert torch.allclose(corner(r, "br")[inner], (r * s + (1 - s))[inner], atol=1e-5)
    assert torch.allclose(corner(r, "bl"), corner(r, "tl"), atol=1e-5)  # the ramp does not vary with y
    assert corner(r, "tl").min() >= r.min() and corner(r, "br").max() <= r.max()  # edges replicated, no zero fill


def test_rotation_fills_with_the_mean_colour():
    x = torch.full((1, 3, 16, 16), 5.0)
    y = rotate(x, 10)
    assert y[0, :, 0, 0].abs().max() < 5.0  # a corner left the image: filled with 0 = the mean in normalised space
    assert torch.allclose(y[..., 6:10, 6:10], x[..., 6:10, 6:10])


def test_colour_view():
    x = batch() * 0.1  # well inside the pixel range: no clamping
    assert torch.allclose(colour(x, MEAN, STD, brightness=1.0, contrast=1.0), x, atol=1e-6)
    grey = torch.zeros(1, 3, 4, 4)  # the mean colour itself: pixels = MEAN
    bright = colour(grey, MEAN, STD, brightness=1.1, contrast=1.0)
    expect = (MEAN * 1.1 - MEAN) / STD
    assert torch.allclose(bright[0, :, 0, 0], expect, atol=1e-6)
    white = (torch.ones(1, 3, 2, 2) - MEAN[:, None, None]) / STD[:, None, None]
    assert torch.allclose(colour(white, MEAN, STD), white, atol=1e-6)  # clamped at the top of the range


def test_blur_is_a_normalised_3x3_gaussian():
    flat = torch.full((2, 3, 8, 8), 0.7)
    assert torch.allclose(blur(flat), flat, atol=1e-6)
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1
    k = blur(impulse)[0, 0, 1:4, 1:4]
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 0.5**2))
    g = g / g.sum()
    assert torch.allclose(k, g[:, None] * g[None, :], atol=1e-6)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)


def test_saccadic12_views_are_all_different():
    x = batch(size=24)
    outs = [v.fn(x) for v in views("saccadic12")]
    assert [v.name for v in views("saccadic12")][:4] == ["centre", "flip", "zoom", "zoom+flip"]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j], atol=1e-3), (i, j)


class PoolLinear(nn.Module):
    """Global average pool + linear: invariant to flips and rotations about the centre."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def test_none_equals_plain_softmax_and_averages_are_weighted():
    model = PoolLinear().eval()
    x = batch()
    plain, avg = tta_probs(model, x, views("none"))
    assert torch.allclose(plain, model(x).softmax(1)) and torch.equal(plain, avg)
    plain, avg = tta_probs(model, x, views("flip"))
    assert torch.allclose(avg, plain, atol=1e-6)  # a flip-invariant model: TTA changes nothing
    vs = views("saccadic12")
    plain, avg = tta_probs(model, x, vs)
    manual = sum(v.weight * F.softmax(model(v.fn(x)), dim=1) for v in vs)
    assert torch.allclose(avg, manual, atol=1e-6)
    assert torch.allclose(avg.sum(1), torch.ones(2), atol=1e-6)


def test_multi_head_outputs_are_averaged_before_softmax():
    class TwoHeads(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)), -x.mean(dim=(2, 3))

    x = batch()
    assert torch.allclose(forward_probs(TwoHeads(), x), torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize("max_images", [None, 2, 4, 6, 24, 1000])
def test_stacked_views_give_the_same_probabilities_as_one_view_per_pass(max_images):
    """tta_probs with several views per forward pass (the CPU default) equals one view per pass, for every chunking
    (whole views per pass; a remainder pass included), on a model whose output depends on the batch only row-wise."""
    model = PoolLinear().eval()
    x = batch()
    vs = views("saccadic12")
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    plain, avg = tta_probs(model, x, vs, max_images=max_images)
    manual = sum(v.weight * F.softmax(model(v.fn(x)), dim=1) for v in vs)
    assert torch.allclose(avg, manual, atol=1e-6) and torch.allclose(plain, model(x).softmax(1), atol=1e-6)
    per_pass = max(1, (max_images or 2) // 2)  # batch() holds 2 images
    expected = [2 * len(vs[i:i + per_pass]) for i in range(0, len(vs), per_pass)]
    assert calls[:len(expected)] == expected


def test_cpu_passes_stack_views_up_to_the_pixel_budget():
    from vitforge.eval.predict import tta_forward_images

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert tta_forward_images(cpu, 224, 4) == 12 and tta_forward_images(cpu, 384, 1) == 4
    assert tta_forward_images(cpu, 32, 256) == 588 and tta_forward_images(cpu, 224, 64) == 64  # never below batch
    assert tta_forward_images(gpu, 224, 256) == 256  # one view per pass on an accelerator
