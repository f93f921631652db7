"""Per-sample random augmentation policies applied to a whole batch on the training device.

AutoAugment, RandAugment, TrivialAugmentWide, ColorJitter (hue included), RandomRotation and RandomAffine as
torchvision.transforms.v2 defines them (same op set, magnitude bins, sign flips, application probabilities, parameter
ranges, interpolation and zero fill), but every sample of a batch draws its own op(s), magnitude(s) and signs, and
there is no per-sample Python loop: each op is computed for the whole batch and `torch.where` keeps it for the
samples that drew it. Ops that share a form are computed once: the five geometric ops are one per-sample inverse
affine matrix + one `grid_sample`; Brightness, Color and Contrast are one blend against a per-sample "degenerate"
image. Equalize builds per-(sample, channel) histograms with `scatter_add_`. Nothing synchronises with the host, so
the ops queue behind the training step on a GPU.

Values follow torchvision's kernels for uint8 (truncation after a blend, rounding after the sharpness blur and after
warping) and for float images in [0, 1]. Randomness comes only from the explicit `torch.Generator`, so a batch's
augmentation is a function of (seed, epoch, step), as for the other batch augmentations (exact resume).

The policy tables (AutoAugment sub-policies, magnitude spaces) are read from torchvision itself, so the device
backend and the CPU-worker backend (`vitforge.data.transforms`) cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert", "Hue")
OP = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
GROUPS = (GEOMETRIC, BLENDS, ("Sharpness",), ("Posterize",), ("Solarize",), ("AutoContrast",), ("Equalize",),
          ("Invert",), ("Hue",))  # ops computed together; Identity is in none
# Which of (angle, translate x, translate y, shear x, shear y, corner centre) each geometric op sets.
GEOMETRIC_USES = {"Rotate": (0,), "TranslateX": (1,), "TranslateY": (2,), "ShearX": (3, 5), "ShearY": (4, 5)}
_CONSTANTS: dict = {}


def _constant(name: str, device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A small constant tensor built once per device (a host copy or rebuild per batch would cost launches/syncs)."""
    key = (name, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = build().to(device)
    return _CONSTANTS[key]


# ---- per-sample ops: x (B, C, H, W) float holding uint8 values (integer=True) or [0, 1] values ----------------------
def _col(t: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting over images."""
    return t.reshape(-1, 1, 1, 1)


def _finish(x: torch.Tensor, bound: float, integer: bool) -> torch.Tensor:
    """Clamp to [0, bound]; integer images truncate like torchvision's `.to(torch.uint8)`."""
    x = x.clamp(0, bound)
    return x.trunc() if integer else x


def grayscale(x: torch.Tensor, integer: bool) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma (floored for integer images, as torchvision does before a blend)."""
    r, g, b = x.unbind(1)
    # add(alpha=) as torchvision writes it: the kernel may fuse multiply and add, which changes the last bit
    gray = (r * GRAY_WEIGHTS[0]).add(g, alpha=GRAY_WEIGHTS[1]).add(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)
    return gray.floor() if integer else gray


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor, bound: float, integer: bool) -> torch.Tensor:
    """x·f + other·(1 − f) per sample; factor (B,) float64 (both weights rounded to float32 from float64)."""
    # addcmul = torchvision's `mul(f).add_(other, alpha=1 - f)` rounding (one fused multiply-add) with tensor weights
    return _finish(torch.addcmul(x * _col(factor).float(), other, _col(1.0 - factor).float()), bound, integer)


def blend_degenerate(x: torch.Tensor, op: torch.Tensor, integer: bool) -> torch.Tensor:
    """The image each blend op mixes with: 0 (Brightness), the grey image (Color), its mean (Contrast)."""
    gray = grayscale(x, integer)  # (B, 1, H, W)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    other = torch.where(_col(op == OP["Color"]), gray, mean)
    return torch.where(_col(op == OP["Brightness"]), torch.zeros_like(mean), other)


def sharpness(x: torch.Tensor, factor: torch.Tensor, bound: float, integer: bool) -> torch.Tensor:
    """Blend the interior with a 3x3 smoothing of it (border pixels unchanged); factor (B,) float64."""
    C = x.shape[1]
    kernel = _constant(f"sharpness{C}{x.dtype}", x.device, lambda: _smoothing_kernel(C, x.dtype))
    blurred = F.conv2d(x, kernel, groups=C)  # (B, C, H-2, W-2)
    if integer:
        blurred = blurred.round()
    inner = x[..., 1:-1, 1:-1]
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.addcmul(inner, blurred - inner, _col(1.0 - factor).float())
    return _finish(out, bound, integer)


def _smoothing_kernel(C: int, dtype: torch.dtype) -> torch.Tensor:
    """torchvision's sharpness blur: [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 per channel, (C, 1, 3, 3)."""
    a, b = 1.0 / 13.0, 5.0 / 13.0
    return torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=dtype).expand(C, 1, 3, 3).contiguous()


def posterize(x: torch.Tensor, bits: torch.Tensor, integer: bool) -> torch.Tensor:
    """Keep the top `bits` (B,) bits of every channel value."""
    if integer:
        q = _col(torch.exp2(8 - bits.float()))  # 2^(8-bits): exact in float32
        return torch.floor(x / q) * q
    levels = _col(torch.exp2(bits.float()))
    return torch.minimum((x * levels).floor(), levels - 1) * (1.0 / levels)


def solarize(x: torch.Tensor, threshold: torch.Tensor, bound: float) -> torch.Tensor:
    """Invert values >= bound·threshold (threshold (B,) float64 in [0, 1])."""
    return torch.where(x >= _col(bound * threshold).float(), bound - x, x)


def autocontrast(x: torch.Tensor, bound: float, integer: bool) -> torch.Tensor:
    """Stretch each channel to [0, bound]; constant channels are left unchanged."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    inv_scale = torch.where(flat, torch.ones_like(lo), (hi - lo) * (1.0 / bound))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return _finish((x - lo) / inv_scale, bound, integer)


def equalize(x: torch.Tensor, integer: bool) -> torch.Tensor:
    """Histogram equalisation per (sample, channel) with PIL's lookup table (torchvision's algorithm, batched)."""
    q = x if integer else (x * (256.0 - 1e-3)).trunc()  # float -> uint8 levels as torchvision's to_dtype
    B, C, H, W = q.shape
    flat = q.reshape(B, C, H * W).long()
    hist = torch.zeros(B, C, 256, dtype=torch.int32, device=x.device)
    hist.scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.int32))
    cum = hist.cumsum(-1)  # (B, C, 256) int64
    last = cum.argmax(-1, keepdim=True)  # first bin holding the final count = the image's largest value
    step = (H * W - hist.gather(-1, last)) // 255  # (B, C, 1): non-max pixels / 255
    lut = ((cum[..., :-1] + step // 2) // step.clamp(min=1)).clamp(0, 255)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], dim=-1)  # (B, C, 256); lut[0] = 0
    valid = (step != 0)[..., None]  # (B, C, 1, 1); an image with a single value is left as it is
    out = torch.where(valid, lut.gather(-1, flat).reshape(B, C, H, W).to(x.dtype), q)
    return out if integer else out * (1.0 / 255)


def hue(x: torch.Tensor, shift: torch.Tensor, integer: bool) -> torch.Tensor:
    """Rotate every pixel's hue by `shift` (B,) turns (torchvision `adjust_hue`: RGB -> HSV, h + shift mod 1, back to
    RGB, with torchvision's own colour-space conversions; integer images go through [0, 1] and back as
    `to_dtype(scale=True)` does)."""
    img = x * (1.0 / 255) if integer else x
    h, s, v = _rgb_to_hsv(img).unbind(1)
    h = (h + shift.float()[:, None, None]).remainder(1.0)
    out = _hsv_to_rgb(torch.stack((h, s, v), dim=1))
    return (out * (255 + 1.0 - 1e-3)).trunc() if integer else out


# ---- geometric ops: one inverse affine matrix per sample, nearest or bilinear sampling, zero fill --------------------
def inverse_affine(angle, translate_x, translate_y, shear_x, shear_y, center_x, center_y, scale=None) -> torch.Tensor:
    """Batched `torchvision...._get_inverse_affine_matrix`: all args (B,) float64, angles in degrees, centre relative
    to the image centre, scale None = 1. Returns (B, 2, 3) float64 mapping output pixels to input pixels."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    tan_sx, cos_sy = torch.tan(sx), torch.cos(sy)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    if scale is not None:
        m0, m1, m3, m4 = m0 / scale, m1 / scale, m3 / scale, m4 / scale
    cxt, cyt = center_x + translate_x, center_y + translate_y
    m2 = center_x - m0 * cxt - m1 * cyt
    m5 = center_y - m3 * cxt - m4 * cyt
    return torch.stack([torch.stack([m0, m1, m2], -1), torch.stack([m3, m4, m5], -1)], dim=1)


def sampling_grid(matrix: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """grid_sample's (B, H, W, 2) grid for inverse matrices (B, 2, 3) (output -> input pixel offsets from the
    centre), as torchvision's `_affine_grid`."""
    base = _constant(f"grid{H}x{W}", matrix.device, lambda: _base_grid(H, W))  # (1, H·W, 3)
    theta = matrix.float().transpose(1, 2)  # (B, 3, 2)
    theta = torch.stack([theta[..., 0] / (0.5 * W), theta[..., 1] / (0.5 * H)], dim=-1)  # to grid_sample's [-1, 1]
    # (H·W, 3) x (3, 2) per sample, written out so that it never runs as a TF32 matmul (coordinates need fp32)
    grid = (base[..., 0:1] * theta[:, None, 0] + base[..., 1:2] * theta[:, None, 1]) + theta[:, None, 2]
    return grid.reshape(matrix.shape[0], H, W, 2)


def warp_nearest(x: torch.Tensor, matrix: torch.Tensor, integer: bool) -> torch.Tensor:
    """Resample each image at its matrix (B, 2, 3) (output -> input pixel offsets from the centre); no fill value
    (AutoAugment's ops: outside reads 0)."""
    grid = sampling_grid(matrix, *x.shape[-2:])
    out = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round() if integer else out


def warp_filled(x: torch.Tensor, matrix: torch.Tensor, integer: bool, mode: str) -> torch.Tensor:
    """Resample each image at its matrix with fill 0 (torchvision RandomRotation/RandomAffine): a ones channel is
    sampled along, and pixels it marks as outside become 0 (nearest: mask < 0.5) or are weighted by it (bilinear, so
    the border fades as torchvision's does)."""
    ones = torch.ones_like(x[:, :1])
    out = F.grid_sample(torch.cat([x, ones], dim=1), sampling_grid(matrix, *x.shape[-2:]), mode=mode,
                        padding_mode="zeros", align_corners=False)
    out, mask = out[:, :-1], out[:, -1:]
    out = torch.where(mask < 0.5, 0.0, out) if mode == "nearest" else out * mask
    return out.round() if integer else out


def _base_grid(H: int, W: int) -> torch.Tensor:
    """Output pixel centres relative to the image centre, homogeneous: (1, H·W, 3) as torchvision's `_affine_grid`."""
    base = torch.empty(1, H, W, 3)
    base[..., 0] = torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, W)
    base[..., 1] = torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, H)[:, None]
    base[..., 2] = 1.0
    return base.reshape(1, H * W, 3)


def _geometric_uses() -> torch.Tensor:
    uses = torch.zeros(len(OPS), 6, dtype=torch.bool)
    for name, cols in GEOMETRIC_USES.items():
        uses[OP[name], list(cols)] = True
    return uses


def geometric_matrix(op: torch.Tensor, mag: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Per-sample inverse matrices (B, 2, 3) of ShearX/Y (about the top-left corner), TranslateX/Y (whole pixels,
    truncated) and Rotate (about the centre); identity for every other op."""
    shear = torch.rad2deg(torch.atan(mag))  # torchvision passes degrees(atan(m)) as the shear angle
    values = torch.stack([-torch.remainder(mag, 360.0), mag.trunc(), mag.trunc(), shear, shear,
                          torch.ones_like(mag)], dim=1)  # (B, 6): angle, tx, ty, shear x, shear y, corner centre
    p = torch.where(_constant("geometric_uses", op.device, _geometric_uses)[op], values, 0.0).unbind(1)
    return inverse_affine(angle=p[0], translate_x=p[1], translate_y=p[2], shear_x=p[3], shear_y=p[4],
                          center_x=p[5] * (-0.5 * W), center_y=p[5] * (-0.5 * H))


# ---- one op per sample ----------------------------------------------------------------------------------------------
def apply_ops(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor, ops: Sequence[str] = OPS) -> torch.Tensor:
    """Apply to each sample the op it drew.

    Args:
        x: (B, 3, H, W) uint8, or float in [0, 1].
        op: (B,) long indices into `OPS`.
        mag: (B,) float64 signed magnitudes in torchvision's units (shear factor, pixels, degrees, factor − 1,
            bits, threshold fraction); ignored by ops without a magnitude.
        ops: the ops that can occur (others are not computed).

    Returns:
        The augmented batch, same dtype and shape as `x`.
    """
    integer = not x.is_floating_point()
    bound = 255.0 if integer else 1.0
    v = x.float() if integer else x
    out = v
    group = _constant("group_of_op", op.device, _group_of_op)[op]  # (B,) index into GROUPS, -1 for Identity
    for g, fn in enumerate(_group_fns(v, op, mag, bound, integer)):
        if set(ops).intersection(GROUPS[g]):
            out = torch.where(_col(group == g), fn(), out)
    return out.to(x.dtype) if integer else out


def _group_of_op() -> torch.Tensor:
    lut = torch.full((len(OPS),), -1, dtype=torch.long)
    for g, names in enumerate(GROUPS):
        lut[[OP[n] for n in names]] = g
    return lut


def _group_fns(v, op, mag, bound, integer) -> list[Callable[[], torch.Tensor]]:
    """Thunks computing each group of `GROUPS` for the whole batch (only the groups that can occur are called)."""
    H, W = v.shape[-2:]
    return [
        lambda: warp_nearest(v, geometric_matrix(op, mag, H, W), integer),
        lambda: blend(v, blend_degenerate(v, op, integer), 1.0 + mag, bound, integer),
        lambda: sharpness(v, 1.0 + mag, bound, integer),
        lambda: posterize(v, mag.long(), integer),
        lambda: solarize(v, mag, bound),
        lambda: autocontrast(v, bound, integer),
        lambda: equalize(v, integer),
        lambda: bound - v,
        lambda: hue(v, mag, integer),
    ]


# ---- policies: every sample draws its own ops and magnitudes --------------------------------------------------------
AA_POLICIES = {"cifar10": v2.AutoAugmentPolicy.CIFAR10, "imagenet": v2.AutoAugmentPolicy.IMAGENET,
               "svhn": v2.AutoAugmentPolicy.SVHN}


def magnitude_table(space: dict, num_bins: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision magnitude space -> (values (len(OPS), num_bins) float64, signed (len(OPS),) bool)."""
    values = torch.zeros(len(OPS), num_bins, dtype=torch.float64)
    signed = torch.zeros(len(OPS), dtype=torch.bool)
    for name, (fn, is_signed) in space.items():
        bins = fn(num_bins, height, width)
        if bins is not None:
            values[OP[name]] = bins.double()  # torchvision's float32 (or int) bins, as `float(bins[i])` reads them
        signed[OP[name]] = is_signed
    return values, signed


class BatchPolicy:
    """A per-sample random policy: `stages` draws [(op (B,), magnitude (B,)), ...]; calling applies the stages in
    order. Subclasses set `space` (torchvision magnitude space), `num_bins` and `ops` (ops that can occur)."""

    space: dict = {}
    num_bins: int = 31
    ops: tuple[str, ...] = OPS

    def __init__(self) -> None:
        self._tables: dict = {}
        self.apply_fn: Callable = apply_ops  # `compile_policy` swaps in a compiled version

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 or float in [0, 1] on the generator's device -> same shape and dtype."""
        B, _, H, W = x.shape
        for op, mag in self.stages(B, H, W, gen, x.device):
            x = self.apply_fn(x, op, mag, self.ops)
        return x

    def stages(self, B: int, H: int, W: int, gen: torch.Generator, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def table(self, H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, signed) of `space` for H x W images, built once per size and device."""
        key = (H, W, str(device))
        if key not in self._tables:
            self._tables[key] = tuple(t.to(device) for t in magnitude_table(self.space, self.num_bins, H, W))
        return self._tables[key]

    def signed_magnitude(self, op: torch.Tensor, bin_idx: torch.Tensor, H: int, W: int, gen) -> torch.Tensor:
        """values[op, bin], negated with probability 1/2 for signed ops."""
        values, signed = self.table(H, W, op.device)
        mag = values[op, bin_idx]
        flip = (torch.rand(op.shape, generator=gen, device=op.device) <= 0.5) & signed[op]
        return torch.where(flip, -mag, mag)

    def uniform_op(self, B: int, gen, device) -> torch.Tensor:
        """One op per sample, uniform over the keys of `space`."""
        ids = self.on_device("ids", torch.tensor([OP[n] for n in self.space]), device)
        return ids[torch.randint(len(ids), (B,), generator=gen, device=device)]

    def on_device(self, name: str, t: torch.Tensor, device) -> torch.Tensor:
        """`t` on `device`, copied once (a host-to-device copy per batch would synchronise with the GPU)."""
        key = (name, str(device))
        if key not in self._tables:
            self._tables[key] = t.to(device)
        return self._tables[key]


class AutoAugment(BatchPolicy):
    """AutoAugment (Cubuk et al. 2019) with torchvision's sub-policies: each sample draws one of the 25 sub-policies,
    then applies each of its two ops with the op's probability, at the op's fixed magnitude bin (of 10), sign random."""

    num_bins = 10
    space = v2.AutoAugment._AUGMENTATION_SPACE

    def __init__(self, policy: str = "cifar10") -> None:
        super().__init__()
        subs = v2.AutoAugment(AA_POLICIES[policy])._get_policies(AA_POLICIES[policy])  # 25 x 2 x (op, p, bin)
        self.policy = policy
        self.sub_op = torch.tensor([[OP[n] for n, _, _ in s] for s in subs])  # (P, 2)
        self.sub_p = torch.tensor([[p for _, p, _ in s] for s in subs])  # (P, 2) float32
        self.sub_bin = torch.tensor([[b or 0 for _, _, b in s] for s in subs])  # (P, 2)
        self.ops = ("Identity",) + tuple(sorted({n for s in subs for n, _, _ in s}, key=OP.get))

    def stages(self, B, H, W, gen, device):
        op_t, p_t, bin_t = (self.on_device(name, t, device) for name, t in
                            (("op", self.sub_op), ("p", self.sub_p), ("bin", self.sub_bin)))
        k = torch.randint(len(op_t), (B,), generator=gen, device=device)  # sub-policy per sample
        out = []
        for s in range(2):
            apply = torch.rand(B, generator=gen, device=device) <= p_t[k, s]
            op = torch.where(apply, op_t[k, s], torch.zeros_like(k))  # 0 = Identity
            out.append((op, self.signed_magnitude(op, bin_t[k, s], H, W, gen)))
        return out


class RandAugment(BatchPolicy):
    """RandAugment (Cubuk et al. 2020): `num_ops` ops per sample, each uniform over torchvision's 14 (Identity
    included), all at bin `magnitude` of `num_bins`, sign random."""

    space = v2.RandAugment._AUGMENTATION_SPACE

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31) -> None:
        super().__init__()
        if not 0 <= magnitude < num_bins:
            raise ValueError(f"RandAugment magnitude {magnitude} is not a bin of {num_bins}")
        self.num_ops, self.magnitude, self.num_bins = num_ops, magnitude, num_bins
        self.ops = tuple(self.space)

    def stages(self, B, H, W, gen, device):
        out = []
        for _ in range(self.num_ops):
            op = self.uniform_op(B, gen, device)
            out.append((op, self.signed_magnitude(op, torch.full_like(op, self.magnitude), H, W, gen)))
        return out


class TrivialAugmentWide(BatchPolicy):
    """TrivialAugment (Müller & Hutter 2021), wide space: one op per sample, uniform over 14, magnitude bin uniform
    over `num_bins`, sign random."""

    space = v2.TrivialAugmentWide._AUGMENTATION_SPACE

    def __init__(self, num_bins: int = 31) -> None:
        super().__init__()
        self.num_bins = num_bins
        self.ops = tuple(self.space)

    def stages(self, B, H, W, gen, device):
        op = self.uniform_op(B, gen, device)
        bins = torch.randint(self.num_bins, (B,), generator=gen, device=device)
        return [(op, self.signed_magnitude(op, bins, H, W, gen))]


class ColorJitter(BatchPolicy):
    """torchvision ColorJitter(brightness, contrast, saturation, hue) per sample: factors uniform in
    [max(0, 1 − s), 1 + s], the hue shift uniform in [−hue, hue], the adjustments in a random order per sample."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0) -> None:
        super().__init__()
        self.strength = (brightness, contrast, saturation)
        self.hue = hue
        self.ops = ("Identity", "Brightness", "Contrast", "Color") + (("Hue",) if hue > 0 else ())

    def stages(self, B, H, W, gen, device):
        n = 4 if self.hue > 0 else 3  # without hue, three draws per sample (the same stream as before hue existed)
        u = torch.rand(B, n, generator=gen, device=device, dtype=torch.float64)
        lo = [max(0.0, 1.0 - s) for s in self.strength]
        # mag (B, n) in apply_ops' units: factor − 1 for brightness, contrast, saturation; the shift for hue
        mag = torch.stack([lo[j] + (1.0 + s - lo[j]) * u[:, j] - 1.0 for j, s in enumerate(self.strength)]
                          + ([self.hue * (2.0 * u[:, 3] - 1.0)] if n == 4 else []), dim=1)
        order = torch.rand(B, n, generator=gen, device=device).argsort(dim=1)  # a random permutation per sample
        kinds = [OP["Brightness"], OP["Contrast"], OP["Color"], OP["Hue"]]
        on = [s > 0 for s in self.strength] + [self.hue > 0]
        out = []
        for slot in range(n):
            which = order[:, slot]
            op = sum(torch.where(which == j, kinds[j] if on[j] else 0, 0) for j in range(n))
            out.append((op, mag.gather(1, which[:, None])[:, 0]))
        return out


class RandomRotation(BatchPolicy):
    """torchvision RandomRotation(degrees, interpolation, fill=0) per sample: an angle uniform in [−degrees, degrees]
    (counter-clockwise), about the image centre, same output size."""

    def __init__(self, degrees: float, interpolation: str = "nearest") -> None:
        super().__init__()
        self.degrees, self.mode = degrees, interpolation

    def angles(self, B: int, gen, device) -> torch.Tensor:
        return self.degrees * (2.0 * torch.rand(B, generator=gen, device=device, dtype=torch.float64) - 1.0)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.angles(x.shape[0], gen, x.device))

    def apply(self, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """Rotate sample i by angle[i] degrees ((B,) float64): torchvision's `rotate` on each image."""
        zero = torch.zeros_like(angle)
        # torchvision rotates by angle mod 360 through the affine matrix of −angle
        matrix = inverse_affine(-torch.remainder(angle, 360.0), zero, zero, zero, zero, zero, zero)
        return _warp(x, matrix, self.mode)


class RandomAffine(BatchPolicy):
    """torchvision RandomAffine(degrees=0, translate, scale, shear, interpolation, fill=0) per sample: a shift of
    round(U(−t·W, t·W)) by round(U(−t·H, t·H)) pixels, a zoom uniform in `scale`, an x-shear uniform in
    [−shear, shear] degrees, about the image centre."""

    def __init__(self, translate: float = 0.0, scale: tuple[float, float] = (1.0, 1.0), shear: float = 0.0,
                 interpolation: str = "nearest") -> None:
        super().__init__()
        self.translate, self.scale, self.shear, self.mode = translate, tuple(scale), shear, interpolation

    def params(self, B: int, H: int, W: int, gen, device) -> dict[str, torch.Tensor]:
        """(B,) float64 each: translate_x, translate_y (whole pixels), scale, shear_x (degrees)."""
        u = torch.rand(B, 4, generator=gen, device=device, dtype=torch.float64)
        lo, hi = self.scale
        return {"translate_x": (self.translate * W * (2 * u[:, 0] - 1)).round(),
                "translate_y": (self.translate * H * (2 * u[:, 1] - 1)).round(),
                "scale": lo + (hi - lo) * u[:, 2], "shear_x": self.shear * (2 * u[:, 3] - 1)}

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x, **self.params(x.shape[0], *x.shape[-2:], gen, x.device))

    def apply(self, x: torch.Tensor, translate_x, translate_y, scale, shear_x) -> torch.Tensor:
        """Sample i through torchvision's `affine(angle=0, translate, scale, shear=(shear_x, 0))`."""
        zero = torch.zeros_like(scale)
        matrix = inverse_affine(zero, translate_x, translate_y, shear_x, zero, zero, zero, scale=scale)
        return _warp(x, matrix, self.mode)


def _warp(x: torch.Tensor, matrix: torch.Tensor, mode: str) -> torch.Tensor:
    """`warp_filled` on a uint8 or [0, 1] float batch, same dtype back."""
    integer = not x.is_floating_point()
    out = warp_filled(x.float() if integer else x, matrix, integer, mode)
    return out.to(x.dtype) if integer else out


class Compose(BatchPolicy):
    """Several policies one after the other."""

    def __init__(self, policies: list[BatchPolicy]) -> None:
        super().__init__()
        self.policies = policies

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for p in self.policies:
            x = p(x, gen)
        return x


def compile_policy(policy: BatchPolicy, **kwargs) -> BatchPolicy:
    """Run the policy's op application through `torch.compile` (static shapes; the random draws stay eager, they use
    the explicit generator). Fewer, fused kernels instead of ~180 small ops per stage; fused float arithmetic can
    move a rare value by a few grey levels against the eager (torchvision-exact) result. Opt-in, measured by
    `benchmarks/aug_pipeline.py --compile-policies`; the training stream uses the eager ops."""
    fn = torch.compile(apply_ops, dynamic=False, **kwargs)
    for p in getattr(policy, "policies", [policy]):
        p.apply_fn = fn
    return policy
