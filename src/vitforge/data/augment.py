"""Batch augmentation on the training device: pure functions, tensor in -> tensor out.

Every function draws its randomness from an explicit `torch.Generator` (on the batch's device), so a batch's
augmentation is a function of (seed, epoch, step) alone: resuming a run reproduces it exactly.
"""

from __future__ import annotations

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


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) 0-255 -> float (x/255 - mean)/std; mean and std are (C,) on the device."""
    return (x.float() / 255.0 - mean[:, None, None]) / std[:, None, None]


def batch_erase(x: torch.Tensor, p: float, gen: torch.Generator, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing per sample (probability p) with standard-normal noise, on a normalised float batch."""
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
