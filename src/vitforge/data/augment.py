"""Batch augmentation on the training device: pure functions, tensor in -> tensor out.

Every function draws its randomness from an explicit `torch.Generator` (on the batch's device), so a batch's
augmentation is a function of (seed, epoch, step) alone: resuming a run reproduces it exactly.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F


def step_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator on `device` seeded from integer keys, e.g. (seed, epoch, step)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1))
    return g


def batch_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of size (H, W) from the zero-padded batch (torchvision RandomCrop(padding=p))."""
    if padding <= 0:
        return x
    B, C, H, W = x.shape
    xp = F.pad(x, (padding,) * 4)  # (B, C, H+2p, W+2p), zeros = black
    dy = torch.randint(0, 2 * padding + 1, (B,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (B,), device=x.device, generator=gen)
    rows = (torch.arange(H, device=x.device)[None, :] + dy[:, None])[:, None, :, None]  # (B, 1, H, 1)
    cols = (torch.arange(W, device=x.device)[None, :] + dx[:, None])[:, None, None, :]  # (B, 1, 1, W)
    bidx = torch.arange(B, device=x.device)[:, None, None, None]
    cidx = torch.arange(C, device=x.device)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


def batch_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each sample horizontally with probability p."""
    mask = torch.rand(x.shape[0], device=x.device, generator=gen) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def batch_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of a float batch to size x size; no-op when already that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def resize_image(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """torchvision `Resize((size, size), mode, antialias=True)` of a uint8 or [0, 1] float batch (same dtype back):
    `F.interpolate` in float32, uint8 rounded back (torchvision's GPU path; its CPU uint8 kernel rounds in fixed
    point, at most one grey level away)."""
    if x.shape[-2:] == (size, size):
        return x
    integer = not x.is_floating_point()
    smooth = mode != "nearest"
    out = F.interpolate(x.float() if integer else x, size=(size, size), mode=mode, antialias=smooth,
                        align_corners=False if smooth else None)
    return out.clamp(0, 255).round().to(x.dtype) if integer else out


def rrc_boxes(B: int, H: int, W: int, scale, ratio, gen: torch.Generator,
              device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample RandomResizedCrop boxes (top, left, height, width), each (B,) int64, drawn as torchvision's
    `RandomResizedCrop.make_params` draws them: up to 10 tries of an area uniform in `scale` · H·W and a log-uniform
    aspect ratio in `ratio`; the first try that fits is placed uniformly; if none fits, the central crop of the
    whole image clamped to `ratio`."""
    tries = 10
    area = H * W * (scale[0] + (scale[1] - scale[0]) * torch.rand(B, tries, generator=gen, device=device,
                                                                   dtype=torch.float64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = (lo + (hi - lo) * torch.rand(B, tries, generator=gen, device=device, dtype=torch.float64)).exp()
    w = (area * aspect).sqrt().round().long()
    h = (area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(H * max(ratio))), H
    else:
        fw, fh = W, H
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    u = torch.rand(B, 2, generator=gen, device=device, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (H - h + 1)).floor().long(), (H - fh) // 2)
    left = torch.where(found, (u[:, 1] * (W - w + 1)).floor().long(), (W - fw) // 2)
    return top, left, h, w


def resize_weights(out: int, start: torch.Tensor, length: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(B, out, size) float32 matrices resampling the window [start, start + length) of an axis of `size` pixels to
    `out` pixels, as `F.interpolate(..., antialias=True)` resamples (bilinear: triangle filter, bicubic: cubic with
    a = −0.5, both widened by the reduction factor when shrinking; weights normalised over the window) or as
    `mode="nearest"` picks (source floor(i · length / out)). start, length: (B,) int64."""
    dev = start.device
    i = torch.arange(out, device=dev, dtype=torch.float64)[None, :, None]  # (1, out, 1)
    j = torch.arange(size, device=dev)[None, None, :]  # (1, 1, size)
    start, length = start[:, None, None], length[:, None, None]
    if mode == "nearest":
        src = (i.float() * (length.float() / out)).floor().long().clamp(max=length - 1) + start
        return (j == src).float()
    step = length.double() / out
    x = (j + 0.5 - start - step * (i + 0.5)) / step.clamp(min=1.0)  # filter argument, in output pixels
    t = x.abs()
    if mode == "bilinear":
        w = (1 - t).clamp(min=0)
    else:  # bicubic, a = -0.5 (PIL / antialiased interpolate)
        a = -0.5
        w = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        torch.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
    w = w * ((j >= start) & (j < start + length))
    return (w / w.sum(dim=-1, keepdim=True)).float()


def resized_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
                 mode: str = "bilinear") -> torch.Tensor:
    """Crop box i of sample i and resize it to the batch's own (H, W) (torchvision `resized_crop` with
    antialias=True, per sample): two batched matrix products with `resize_weights`. uint8 or float, same dtype."""
    B, C, H, W = x.shape
    integer = not x.is_floating_point()
    wy = resize_weights(H, top, height, H, mode)  # (B, H, H)
    wx = resize_weights(W, left, width, W, mode)  # (B, W, W)
    with _full_precision_matmul():
        out = wy[:, None] @ (x.float() if integer else x) @ wx.transpose(1, 2)[:, None]
    return out.clamp(0, 255).round().to(x.dtype) if integer else out


def batch_random_resized_crop(x: torch.Tensor, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                              mode: str = "bilinear") -> torch.Tensor:
    """torchvision RandomResizedCrop to the batch's own size, a box per sample (`rrc_boxes`, `resized_crop`)."""
    B, _, H, W = x.shape
    return resized_crop(x, *rrc_boxes(B, H, W, scale, ratio, gen, x.device), mode=mode)


@contextlib.contextmanager
def _full_precision_matmul():
    """float32 matmuls without TF32 (which would move resampled uint8 values by a grey level)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) 0-255 -> float (x/255 - mean)/std; mean and std are (C,) on the device."""
    return (x.float() / 255.0 - mean[:, None, None]) / std[:, None, None]


def batch_erase(x: torch.Tensor, p: float, gen: torch.Generator, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing per sample (probability p) with standard-normal noise, on a normalised float batch: a box of
    an area uniform in `scale` · H·W and a log-uniform aspect ratio in `ratio` (clamped to the image), placed
    uniformly (Zhong et al. 2020; timm's `RandomErasing(mode="pixel")` fills it with per-pixel noise likewise)."""
    if p <= 0:
        return x
    B, C, H, W = x.shape
    dev = x.device
    area = H * W * (scale[0] + (scale[1] - scale[0]) * torch.rand(B, device=dev, generator=gen))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(B, device=dev, generator=gen)
    r = log_r.exp()
    h = (area * r).sqrt().round().clamp(1, H).long()
    w = (area / r).sqrt().round().clamp(1, W).long()
    top = (torch.rand(B, device=dev, generator=gen) * (H - h + 1)).long()
    left = (torch.rand(B, device=dev, generator=gen) * (W - w + 1)).long()
    ys = torch.arange(H, device=dev)[None, :]
    xs = torch.arange(W, device=dev)[None, :]
    inside = ((ys >= top[:, None]) & (ys < (top + h)[:, None]))[:, :, None] & (
        (xs >= left[:, None]) & (xs < (left + w)[:, None])
    )[:, None, :]  # (B, H, W)
    apply = torch.rand(B, device=dev, generator=gen) < p
    mask = (inside & apply[:, None, None])[:, None]  # (B, 1, H, W)
    noise = torch.randn(x.shape, device=dev, generator=gen, dtype=x.dtype)
    return torch.where(mask, noise, x)


def smooth_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Class indices (B,) -> smoothed one-hot (B, K): 1 - s + s/K on the label, s/K elsewhere."""
    off = smoothing / num_classes
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    smoothing: float,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    switch_prob: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one per batch) with the batch flipped along its first axis as partner.

    Returns the mixed images and soft targets lam·t(y) + (1-lam)·t(y_flip), t = smoothed one-hot.
    If the batch is not mixed, the targets are the smoothed one-hot labels.
    """
    t = smooth_targets(y, num_classes, smoothing)
    if rng.random() >= prob or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return x, t
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    if use_cutmix:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        x, lam = _cutmix(x, lam, rng)
    else:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        x = x * lam + x.flip(0) * (1 - lam)
    return x, t * lam + t.flip(0) * (1 - lam)


def _cutmix(x: torch.Tensor, lam: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    H, W = x.shape[-2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
    return x, 1 - (y1 - y0) * (x1 - x0) / (H * W)  # lam corrected to the pasted area
