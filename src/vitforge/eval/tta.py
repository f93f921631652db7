"""Test-time augmentation: named sets of views, each a pure function of a normalised batch on its device.

A view maps the (B, C, S, S) float batch the evaluation stream yields (already resized and normalised) to another
(B, C, S, S) batch on the same device; nothing goes back to the CPU. The model sees every view of a batch and the
softmax probabilities are averaged with the set's weights (probabilities, not logits, as in the 12-pass "saccadic"
TTA of AlphsX/Muffyn, README.md).

How each view is done on the device:
    flip         `x.flip(-1)` (a strided copy).
    shift        reflect-pad 1 px then slice (airbench `infer_mirror_translate`).
    zoom, crops  `affine_grid` + `grid_sample` (bilinear): sampling a centred or corner-anchored window of 1/1.15 of
                 the side stretched back to S x S (edge pixels replicated where the window touches the border);
                 no resize round trip through uint8 or PIL.
    rotate       `affine_grid` + `grid_sample` with a rotation matrix; the uncovered corners are filled with 0, which in
                 the normalised batch is the dataset's mean colour rather than black.
    colour       de-normalise with the checkpoint's mean/std, brightness and contrast, clamp to [0, 1], re-normalise.
    blur         depthwise 3x3 Gaussian (sigma 0.5) `conv2d` with reflect padding; the kernel sums to 1, so blurring
                 commutes with the per-channel normalisation.

Every set starts with the identity view, so one pass gives the accuracy both with and without TTA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from vitforge.config import AugConfig
from vitforge.data.augmentations import Frame, invariances
from vitforge.data.decoded import SMALL_IMAGE
from vitforge.errors import CheckpointError, ConfigError, VitforgeError, first_line
from vitforge.runtime import gather_cat

ViewFn = Callable[[torch.Tensor], torch.Tensor]
ZOOM = 1.15  # close-up views of AlphsX/Muffyn's 12-pass TTA (1.15x zoom, centre and flipped)


@dataclass(frozen=True)
class View:
    """One test-time view: a name, a batch function and its weight in the average (weights of a set sum to 1)."""

    name: str
    fn: ViewFn
    weight: float


# ---- pure view functions -------------------------------------------------------------------------------------------
def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right: (B, C, H, W) -> same."""
    return x.flip(-1)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) pixels with reflected borders (airbench's 1-px TTA translations)."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    H, W = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p), mode="reflect")  # (B, C, H+2p, W+2p)
    return xp[..., p - dy : p - dy + H, p - dx : p - dx + W]


def affine(x: torch.Tensor, *, scale: float = 1.0, angle_deg: float = 0.0, tx: float = 0.0, ty: float = 0.0,
           padding: str = "zeros") -> torch.Tensor:
    """Resample the batch through an affine map in normalised [-1, 1] coordinates (square inputs).

    Output pixel u samples the input at R(angle)·u·scale + (tx, ty): scale < 1 zooms in (a window of `scale` of the
    side fills the output), (tx, ty) moves that window. Outside the input reads 0 (= the mean colour) with
    padding="zeros", or the nearest edge pixel with "border" (crops: a window flush with the border samples up to
    half a pixel beyond the outermost pixel centres).
    """
    a = math.radians(angle_deg)
    cos, sin = math.cos(a) * scale, math.sin(a) * scale
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def zoom(x: torch.Tensor, factor: float = ZOOM) -> torch.Tensor:
    """Centre close-up: the middle 1/factor of the image stretched to the full size."""
    return affine(x, scale=1.0 / factor, padding="border")


def corner(x: torch.Tensor, which: str, factor: float = ZOOM) -> torch.Tensor:
    """Corner crop of 1/factor of the side (`tl`, `tr`, `bl`, `br`) stretched to the full size."""
    s = 1.0 / factor
    off = 1.0 - s  # moves the window flush with the border
    tx = -off if which[1] == "l" else off
    ty = -off if which[0] == "t" else off
    return affine(x, scale=s, tx=tx, ty=ty, padding="border")


def rotate(x: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Rotate about the centre by `angle_deg` (positive = counter-clockwise on screen, as `torch.rot90`)."""
    return affine(x, angle_deg=angle_deg)


def colour(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, brightness: float = 1.1,
           contrast: float = 1.1) -> torch.Tensor:
    """Brightness then contrast (torchvision `adjust_brightness`/`adjust_contrast` semantics) in pixel space.

    mean, std: (C,) normalisation of the batch, on its device. Contrast blends with the per-image grey mean.
    """
    m, s = mean[:, None, None], std[:, None, None]
    p = (x * s + m) * brightness  # pixels in [0, 1] (before clamping)
    p = p.clamp(0, 1)
    grey = (0.299 * p[:, 0] + 0.587 * p[:, 1] + 0.114 * p[:, 2]) if p.shape[1] == 3 else p.mean(1)
    p = (contrast * p + (1 - contrast) * grey.mean(dim=(1, 2))[:, None, None, None]).clamp(0, 1)
    return (p - m) / s


def blur(x: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """3x3 Gaussian blur per channel (torchvision GaussianBlur(3, sigma) with reflect borders)."""
    r = torch.arange(-1, 2, dtype=x.dtype, device=x.device)
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 3, 3)  # (C, 1, 3, 3) depthwise
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])


def compose(*fns: ViewFn) -> ViewFn:
    """f(g(x)) for compose(f, g): the rightmost function runs first."""
    def run(x: torch.Tensor) -> torch.Tensor:
        for fn in reversed(fns):
            x = fn(x)
        return x
    return run


# ---- named sets ------------------------------------------------------------------------------------------------------
def _flip_shift() -> list[View]:
    # airbench94 `infer(tta_level=2)`: 0.5 · mirror-pair(x) + 0.25 · mirror-pair(x shifted -1,-1) + 0.25 · (+1,+1).
    views = [View("centre", identity, 0.25), View("flip", hflip, 0.25)]
    for s in (-1, 1):
        moved = partial(shift, dy=s, dx=s)
        views += [View(f"shift{s:+d}", moved, 0.125), View(f"shift{s:+d}+flip", compose(hflip, moved), 0.125)]
    return views


def _saccadic12(mean: torch.Tensor, std: torch.Tensor) -> list[View]:
    fns = [("centre", identity), ("flip", hflip), ("zoom", zoom), ("zoom+flip", compose(hflip, zoom)),
           ("rotate+10", partial(rotate, angle_deg=10.0)), ("rotate-10", partial(rotate, angle_deg=-10.0)),
           ("colour", partial(colour, mean=mean, std=std))]
    fns += [(f"corner-{c}", partial(corner, which=c)) for c in ("tl", "tr", "bl", "br")]
    fns.append(("blur", blur))
    return [View(n, f, 1.0 / len(fns)) for n, f in fns]


TTA_SETS = ("none", "flip", "flip-shift", "saccadic12")


def check_tta_name(name: str) -> str:
    """`name` if it is a known view set, else a ConfigError listing the known ones."""
    if name not in TTA_SETS:
        raise ConfigError(f"--tta: unknown view set {name!r}; choose one of {', '.join(TTA_SETS)}")
    return name


def tta_views(name: str, *, mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
              mirror: bool = True, shift: bool = True) -> list[View]:
    """The views of a named set (the first is always the identity).

    Args:
        name: none (1 view), flip (2), flip-shift (6, airbench weights), saccadic12 (12, AlphsX/Muffyn, equal
            weights).
        mean, std: (C,) normalisation of the batches on their device (only `saccadic12`'s colour view needs them).
        mirror: False drops the mirrored views (for a model trained without horizontal flips, e.g. on digits or
            text, to which a mirrored image is out of distribution).
        shift: False drops the whole-image shifts of flip-shift (for a small-image model trained without random
            crops). The kept views' weights are rescaled to sum to 1.

    Raises:
        ConfigError: unknown name (the message lists the known sets).
    """
    return keep_views(_named_views(name, mean, std), mirror=mirror, shift=shift)


def keep_views(views: list[View], *, mirror: bool = True, shift: bool = True) -> list[View]:
    """`views` without the mirrored (`mirror=False`) and/or shifted (`shift=False`) ones, weights rescaled to 1."""
    kept = [v for v in views if (mirror or "flip" not in v.name) and (shift or not v.name.startswith("shift"))]
    total = sum(v.weight for v in kept)
    return [View(v.name, v.fn, v.weight / total) for v in kept]


def trained_invariances(meta: dict) -> dict[str, bool]:
    """What a checkpoint's training augmentation taught it to ignore: {"mirror", "shift"} for `tta_views`, as the
    augmentations declare it (`vitforge.data.augmentations.invariances`).

    mirror: `data.aug.hflip` was on. shift: a random crop was on (`data.aug.crop_padding` > 0 for images of at most
    64 px; larger images are trained with random resized crops) or an affine translation. A checkpoint without a
    config keeps every view; options a checkpoint predates take their defaults.
    """
    stored = _section(_section(_section(meta, "config"), "data"), "aug")
    names = {f.name for f in dataclasses.fields(AugConfig)}
    try:
        aug = AugConfig(**{k: v for k, v in stored.items() if k in names})
    except (VitforgeError, TypeError, ValueError) as e:  # a damaged or crafted checkpoint's augmentation settings
        raise CheckpointError(f"{meta.get('path')}: its stored data.aug is not valid here ({first_line(e)})") from None
    small = int(_section(meta, "preprocess").get("img_size") or 0) <= SMALL_IMAGE
    return invariances(aug, Frame(small=small))


def _section(d: dict, key: str) -> dict:
    value = d.get(key)
    return value if isinstance(value, dict) else {}


def _named_views(name: str, mean: torch.Tensor | None, std: torch.Tensor | None) -> list[View]:
    check_tta_name(name)
    if name == "none":
        return [View("centre", identity, 1.0)]
    if name == "flip":
        return [View("centre", identity, 0.5), View("flip", hflip, 0.5)]
    if name == "flip-shift":
        return _flip_shift()
    if mean is None or std is None:
        raise ConfigError("--tta saccadic12: its colour view needs the normalisation mean and std")
    return _saccadic12(mean, std)


def outputs_probabilities(model: torch.nn.Module) -> bool:
    """True for a model whose outputs are already class probabilities (SClusterFormer with `double_softmax`)."""
    for attr in ("_orig_mod", "module"):  # torch.compile / DDP wrappers
        model = getattr(model, attr, model)
    return bool(getattr(model, "double_softmax", False)) and bool(getattr(model, "num_classes", 0))


def forward_probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, K) in float32: softmax of the logits (several heads, e.g. DeiT CLS + distillation, are
    averaged first); a model that already outputs probabilities is only renormalised (its weighted mix of softmaxes
    may stray below 0 when the branch weight leaves [0, 1]), not softmaxed a second time."""
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = torch.stack([o.float() for o in out]).mean(0)
    if outputs_probabilities(model):
        p = out.float().clamp_min(0)
        return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return out.float().softmax(dim=1)


def tta_probs(model: torch.nn.Module, x: torch.Tensor, views: list[View], *,
              max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, averaged) probabilities (B, K) of one batch: the identity view alone, and the weighted view mean.

    The views' batches are stacked and run `max_images` images per forward pass (whole views: at least one view
    per pass; default B, one view per pass). On a CPU a few views per pass cost half the CPU time of one per pass
    (fewer, larger matrix products and fewer thread start-ups per image; `benchmarks/eval_cpu.py`); on an
    accelerator the batch already fills the device.
    """
    b = x.shape[0]
    per_pass = max(1, (max_images or b) // max(1, b))
    probs: list[torch.Tensor] = []
    for i in range(0, len(views), per_pass):
        group = views[i : i + per_pass]
        xs = group[0].fn(x) if len(group) == 1 else torch.cat([v.fn(x) for v in group])
        probs += forward_probs(model, xs).split(b)
    plain = probs[0]
    avg = plain * views[0].weight
    for p, v in zip(probs[1:], views[1:], strict=True):
        avg = avg + p * v.weight
    return plain, avg


def collect_probs(model: torch.nn.Module, stream, views: list[View], *, autocast=None, progress=None,
                  max_images: int | None = None):
    """(plain (N, K), tta (N, K), labels (N,), idx (N,)) over a stream, gathered from every DDP rank."""
    [(plain, avg)], labels, idx = collect_probs_many([model], [views], stream, autocast=autocast, progress=progress,
                                                     max_images=max_images)
    return plain, avg, labels, idx


@torch.no_grad()
def collect_probs_many(models: list[torch.nn.Module], views: list[list[View]], stream, *, autocast=None,
                       progress=None, max_images: int | None = None):
    """Several models over one stream: every batch is produced once and each model runs its views on it.

    Returns ([(plain (N, K), tta (N, K)) per model], labels (N,), idx (N,)), gathered from every DDP rank.
    `progress` (a `vitforge.progress.Progress`) is advanced by the images of each batch; `max_images`: images per
    forward pass when views are stacked (`tta_probs`).
    """
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    plain: list[list[torch.Tensor]] = [[] for _ in models]
    avg: list[list[torch.Tensor]] = [[] for _ in models]
    labels, idxs = [], []
    ctx = autocast or contextlib.nullcontext
    for x, y, idx in stream:
        with ctx():
            for j, (model, v) in enumerate(zip(models, views, strict=True)):
                p, a = tta_probs(model, x, v, max_images=max_images)
                plain[j].append(p)
                avg[j].append(a)
        labels.append(y)
        idxs.append(idx)
        if progress is not None:
            progress.update(len(y))
    for m, mode in zip(models, was_training, strict=True):
        m.train(mode)
    if not labels:
        raise VitforgeError("no decodable images to evaluate")
    probs = [(gather_cat(torch.cat(p)), gather_cat(torch.cat(a))) for p, a in zip(plain, avg, strict=True)]
    return probs, gather_cat(torch.cat(labels)), gather_cat(torch.cat(idxs))
