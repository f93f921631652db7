"""Modulated deformable convolution (DCNv2) with the sampling geometry of the pure-PyTorch port SClusterFormer uses.

The official SClusterFormer code (`deform_conv_v3.py`) gathers the k x k bilinear samples itself, tiles them into a
(h·k) x (w·k) map and applies a stride-k convolution. Here the same computation runs through
`torchvision.ops.deform_conv2d`, which has CPU and CUDA kernels and never builds the tiled map. What has to match:

* offsets and modulation come from 3 x 3 convolutions (padding 1, the layer's stride) whose **weights start at zero**
  (biases keep PyTorch's default init); modulation = sigmoid(mask conv), so it starts at about 0.5;
* the output has the size of the offset map, floor((H - 1) / s) + 1, whatever the kernel size k and padding p;
* tap (i, j) of output (y, x) samples the input zero-padded by p at (1 + y·s + i - k//2, 1 + x·s + j - k//2)
  + offset. In unpadded coordinates the window starts at y·s + (1 - p) - k//2, i.e. it is centred only for p = 1
  (the port's geometry: with p = 1 a 9 x 9 kernel is an ordinary centred conv with padding 4);
* samples outside the padded map are clamped onto its zero border, i.e. read zeros, which is what torchvision does
  for any sample outside the image. This holds for p >= 1; p = 0 would clamp onto real pixels and is rejected;
* the official offset channels are [all row offsets, all column offsets] (tap order row-major); torchvision wants
  (row, column) pairs per tap, so the channels are interleaved before the call. Parameter shapes are the official
  ones, so official weights load after renaming `p_conv` -> `offset_conv`, `m_conv` -> `mask_conv`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d


class DeformConv2d(nn.Module):
    """Modulated deformable k x k convolution with zero-initialised offset and mask convolutions.

    Args:
        in_chans: input channels.
        out_chans: output channels.
        kernel_size: k (odd or even).
        padding: zero padding p of the official sampler (>= 1; see the module docstring for the geometry).
        stride: stride s of the offset/mask convolutions and of the sampling grid.
        bias: bias on the main convolution.
        modulation: multiply every sample by sigmoid(mask conv) (DCNv2); False gives DCNv1.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        *,
        kernel_size: int = 3,
        padding: int = 1,
        stride: int = 1,
        bias: bool = False,
        modulation: bool = True,
    ) -> None:
        super().__init__()
        if padding < 1:
            raise ValueError(f"DeformConv2d padding must be >= 1, got {padding} (at 0 the port clamps onto pixels)")
        self.in_chans, self.out_chans = in_chans, out_chans
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        k2 = kernel_size * kernel_size
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=kernel_size, bias=bias)
        self.offset_conv = nn.Conv2d(in_chans, 2 * k2, 3, padding=1, stride=stride)
        nn.init.zeros_(self.offset_conv.weight)
        self.mask_conv = nn.Conv2d(in_chans, k2, 3, padding=1, stride=stride) if modulation else None
        if self.mask_conv is not None:
            nn.init.zeros_(self.mask_conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H_o, W_o) with H_o = floor((H - 1) / s) + 1."""
        offset = self.offset_conv(x)  # (B, 2k², H_o, W_o), [rows of all taps | columns of all taps]
        mask = torch.sigmoid(self.mask_conv(x)) if self.mask_conv is not None else None  # (B, k², H_o, W_o)
        return self.sample_conv(x, offset, mask)

    def sample_conv(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Deformable conv of `x` (B, C_in, H, W) given offsets (B, 2k², H_o, W_o) in the official channel layout
        and a modulation mask (B, k², H_o, W_o) or None. Returns (B, C_out, H_o, W_o)."""
        B, k2x2, Ho, Wo = offset.shape
        k, s = self.kernel_size, self.stride
        offset = offset.view(B, 2, k2x2 // 2, Ho, Wo).transpose(1, 2).reshape(B, k2x2, Ho, Wo)  # (dy, dx) per tap
        (top, bottom), (left, right) = (_pads(n, no, k, s, self.padding) for n, no in zip(x.shape[-2:], (Ho, Wo)))
        x = F.pad(x, (left, max(right, 0), top, max(bottom, 0)))  # window of output 0 now starts at (0, 0)
        # A trailing pad below zero cannot be a crop (offsets may reach those pixels): compute the extra outputs
        # torchvision then produces, with zero offsets, and drop them.
        grow = (0, (x.shape[-1] - k) // s + 1 - Wo, 0, (x.shape[-2] - k) // s + 1 - Ho)
        if any(grow):
            offset = F.pad(offset, grow)
            mask = F.pad(mask, grow) if mask is not None else None
        out = deform_conv2d(x, offset, self.conv.weight, self.conv.bias, stride=s, mask=mask)
        return out[..., :Ho, :Wo]


def _pads(size: int, out_size: int, k: int, s: int, p: int) -> tuple[int, int]:
    """Leading/trailing zero padding that puts the port's window of output 0 at (0, 0) and yields `out_size`
    outputs. The trailing pad is negative only when p > ceil(k / 2) (more padding than the window can reach)."""
    lead = p - 1 + k // 2
    trail = (out_size - 1) * s + k - size - lead
    return lead, trail


class PseudoDeformConv3d(nn.Module):
    """SClusterFormer's "pseudo-3-D" deformable conv (`Pseudo3DDeformConv.py`): spatial deformable conv over the
    bands as 2-D channels, a 1x1 band mixer, then a spectral 3x1x1 Conv3d + BatchNorm3d + ReLU.

    Args:
        bands: spectral bands D treated as 2-D channels (hard-coded to 30 upstream).
        kernel_size: k of the spatial deformable conv.
        padding: its padding p (see `DeformConv2d`).
        expand: the deformable conv maps D -> expand·D channels, the 1x1 conv maps them back to D.
        bias: bias on the deformable conv and the 1x1 conv.
        modulation: DCNv2 modulation on the deformable conv.
    """

    def __init__(
        self,
        bands: int = 30,
        *,
        kernel_size: int = 3,
        padding: int = 1,
        expand: int = 3,
        bias: bool = False,
        modulation: bool = True,
    ) -> None:
        super().__init__()
        self.bands = bands
        self.spatial_conv = DeformConv2d(bands, bands * expand, kernel_size=kernel_size, padding=padding, bias=bias,
                                         modulation=modulation)
        self.channel_compress = nn.Conv2d(bands * expand, bands, 1, bias=bias)
        self.spectral_conv = nn.Conv3d(1, 1, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.norm = nn.BatchNorm3d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 1, D, H, W)."""
        B, T, D, H, W = x.shape
        if T != 1 or D != self.bands:
            raise ValueError(f"PseudoDeformConv3d expects (B, 1, {self.bands}, H, W), got {tuple(x.shape)}")
        y = self.channel_compress(self.spatial_conv(x.view(B, D, H, W)))  # (B, D, H, W)
        return F.relu(self.norm(self.spectral_conv(y.unsqueeze(1))))  # (B, 1, D, H, W)
