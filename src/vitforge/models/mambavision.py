"""MambaVision (NVlabs, arXiv 2407.08083, CVPR 2025): a hybrid Mamba / self-attention backbone that runs anywhere.

Paper: Hatamizadeh & Kautz, "MambaVision: A Hybrid Mamba-Transformer Vision Backbone", arXiv 2407.08083 (CVPR 2025).
Faithful to the official NVlabs/MambaVision `mambavision/models/mamba_vision.py`: parameter counts, state-dict keys
(released checkpoints load with `strict=True`), block order, zero-padded windows, initialisation and quirks. The
official file imports `mamba_ssm` at the top and so only runs where that CUDA extension builds; here the selective
scan is pure PyTorch (`layers/ssm_scan.py`) and the kernel an optional speed-up, so the model runs on CPU and exports
to ONNX.

Structure (shapes for MambaVision-T at 224, D = 80):
    patch_embed   3x3/s2 conv -> BN(eps 1e-4) -> ReLU, twice, no conv bias     (B, 3, 224, 224) -> (B, D, 56, 56)
    levels.0, .1  ConvBlocks, then `downsample` (3x3/s2 conv, C -> 2C)          -> (B, 2D, 28, 28) -> (B, 4D, 14, 14)
    levels.2, .3  hybrid blocks on zero-padded ws x ws windows (raster token order): the first ceil(n/2) blocks use
                  the MambaVision mixer, the last floor(n/2) self-attention      -> (B, 8D, 7, 7) -> (B, 8D, 7, 7)
    norm, avgpool, head   BatchNorm2d(8D) -> global average pool -> Linear      -> (B, 8D, 1, 1) -> (B, classes)
At 224 the default windows (14, 7) cover the whole stage-3/4 maps; other sizes are padded to window multiples.

Quirks reproduced on purpose, because released checkpoints assume them (all three are in `mamba_vision.py`):
    Q1  the mixer's depthwise convs have no bias (upstream passes `conv_bias // 2 == 0`): no `conv1d_*.bias` keys.
    Q2  δ = softplus(W_dt r + 2 b_dt): `dt_proj` is applied with its bias and the bias is passed to the scan again.
    Q3  the model-wide init pass overwrites the mixer's Mamba dt init: every Linear (dt_proj included) gets
        trunc-normal(0.02) weights and zero bias, so from scratch the dt bias starts at 0.
The scan is Mamba's exact selective scan (input-dependent B, C, δ; Gu & Dao, arXiv 2312.00752). Write-ups that
describe MambaVision as isotropic ViT-like models (3.2M/22M/86M, static SSM matrices, alternating Mamba and attention
layers) do not match the official code and are not built here. `mambavision_cifar` is our own variant; its factory
says where it deviates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitforge.constants import IMAGENET_NORM
from vitforge.models.layers import Attention, DropPath, Mlp, drop_path_rates
from vitforge.models.layers.checkpointing import GradCheckpointing
from vitforge.models.layers.ssm_scan import IMPLS as SCAN_IMPLS
from vitforge.models.layers.ssm_scan import selective_scan_fn
from vitforge.models.registry import register_model


# ---- windows --------------------------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, C, H, W), H and W multiples of `ws` -> (B·nH·nW, ws², C): windows row-major over the grid, tokens raster."""
    _, C, H, W = x.shape
    x = x.reshape(-1, C, H // ws, ws, W // ws, ws)  # (B, C, nH, ws_row, nW, ws_col); -1 keeps the batch dynamic
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, C)  # (B, nH, nW, ws_row, ws_col, C) -> (B·nH·nW, ws², C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B·nH·nW, ws², C) -> (B, C, H, W)."""
    C = windows.shape[-1]
    x = windows.reshape(-1, H // ws, W // ws, ws, ws, C)  # (B, nH, nW, ws_row, ws_col, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, C, H, W)  # (B, C, nH, ws_row, nW, ws_col) -> (B, C, H, W)


def attention_indices(depth: int) -> range:
    """Blocks of a hybrid stage that use self-attention: the last floor(n/2), after all mixer blocks.

    E.g. T: stage 3 (depth 8) blocks 4-7, stage 4 (depth 4) blocks 2-3; S: stage 3 (depth 7) blocks 4-6. The paper
    found self-attention in the final layers of each hybrid stage works best.

    Upstream writes `n//2 + 1 .. n-1` for odd n and `n//2 .. n-1` for even n, which is `ceil(n/2) .. n-1`.
    """
    return range((depth + 1) // 2, depth)


# ---- blocks ---------------------------------------------------------------------------------------------------------
class Stem(nn.Module):
    """Two 3x3 convs (no bias) + BatchNorm(eps 1e-4) + ReLU. Official strides (2, 2); the CIFAR variant uses (1, 1)."""

    def __init__(self, *, in_chans: int, in_dim: int, dim: int, strides: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.conv_down = nn.Sequential(  # keys conv_down.{0,1,3,4}
            nn.Conv2d(in_chans, in_dim, 3, strides[0], 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, strides[1], 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, H/s, W/s), s = product of the strides."""
        return self.conv_down(x)


class Downsample(nn.Module):
    """3x3/s2 conv C -> 2C, no bias, no norm (key `reduction.0`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 2C, ceil(H/2), ceil(W/2))."""
        return self.reduction(x)


class ConvBlock(nn.Module):
    """x + DropPath(g ⊙ BN(Conv(GELU_tanh(BN(Conv(x)))))); the convs have bias; g only if `layer_scale` is set."""

    def __init__(self, dim: int, *, drop_path: float = 0.0, layer_scale: float | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


class MambaVisionMixer(nn.Module):
    """The MambaVision token mixer (`MambaVisionMixer` in `mamba_vision.py`): a selective-scan branch and a symmetric
    conv branch, concatenated.

    in_proj C -> E (no bias) splits into x, z of h = E/2 channels; each goes through its own depthwise conv over the
    sequence ('same' padding, hence non-causal; no bias, Q1) and SiLU. x feeds the scan with selective B_t, C_t (from
    x_proj) and δ_t = dt_proj(r_t) + dt bias (Q2); z is concatenated to the scan output, not used as a gate.

    Args:
        dim: token width C.
        d_state: state size N (8 in MambaVision blocks).
        d_conv: depthwise conv kernel (3 in MambaVision blocks).
        expand: E / C (1 in MambaVision blocks).
        dt_rank: rank R of δ's projection; default ceil(C / 16), computed from C, not E.
        dt_min, dt_max, dt_init_floor: Mamba's dt init range (overwritten by the model's init pass, Q3).
        scan_impl: selective-scan form, see `vitforge.models.layers.ssm_scan` ("auto" picks per call).
    """

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 8,
        d_conv: int = 3,
        expand: int = 1,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        d_inner = expand * dim
        h = d_inner // 2
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(dim, d_inner, bias=False)
        self.x_proj = nn.Linear(h, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, h, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(h, 1))  # (h, N)
        self.D = nn.Parameter(torch.ones(h))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.conv1d_x = nn.Conv1d(h, h, d_conv, groups=h, bias=False)
        self.conv1d_z = nn.Conv1d(h, h, d_conv, groups=h, bias=False)
        self._init_dt(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's init: W_dt ~ U(±R^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.D.shape[0]) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, L, C) -> (B, L, C)."""
        R, N = self.dt_rank, self.d_state
        x, z = self.in_proj(u).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) -> x, z: (B, h, L)
        x = F.silu(self._dwconv(x, self.conv1d_x))  # scan branch
        z = F.silu(self._dwconv(z, self.conv1d_z))  # symmetric branch, concatenated below
        r, Bs, Cs = self.x_proj(x.transpose(1, 2)).split([R, N, N], dim=-1)  # (B, L, R), (B, L, N), (B, L, N)
        dt = self.dt_proj(r).transpose(1, 2)  # (B, h, L); includes the bias, which the scan adds again (Q2)
        A = -torch.exp(_atleast_fp32(self.A_log))  # (h, N); upstream casts A, D and the bias with .float()
        y = selective_scan_fn(
            x, dt, A, Bs.transpose(1, 2), Cs.transpose(1, 2), _atleast_fp32(self.D), z=None,
            delta_bias=_atleast_fp32(self.dt_proj.bias), delta_softplus=True, impl=self.scan_impl,
        )  # (B, h, L)
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))  # (B, L, E) -> (B, L, C)

    def _dwconv(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """Depthwise conv with PyTorch's 'same' padding (left (k-1)//2, rest right) written out, for ONNX export."""
        left = (self.d_conv - 1) // 2
        return F.conv1d(F.pad(x, (left, self.d_conv - 1 - left)), conv.weight, conv.bias, groups=x.shape[1])


def _atleast_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 like upstream's `.float()`, but a float64 model stays float64 (for exact tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MambaVisionBlock(nn.Module):
    """Pre-norm hybrid block (upstream `Block`): x + DropPath(γ1 ⊙ mixer(LN(x))), x + DropPath(γ2 ⊙ MLP(LN(x))).

    `mixer` is `Attention` (keys qkv/proj, like upstream) or `MambaVisionMixer`. γ1, γ2 are parameters only when
    `layer_scale` is set (B, L, L2); otherwise they are the constant 1, as upstream (no keys). Upstream's attention
    also applies its dropout in eval mode; every variant uses attn_drop = 0, where the two agree.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        attention: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        attn_impl: str = "sdpa",
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention:
            self.mixer = Attention(
                dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, impl=attn_impl
            )
        else:
            self.mixer = MambaVisionMixer(dim, d_state=8, d_conv=3, expand=1, scan_impl=scan_impl)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        ls = layer_scale is not None
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if ls else 1.0
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if ls else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B·windows, ws², C) -> same."""
        x = x + self.drop_path(self.gamma_1 * self.mixer(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class MambaVisionLevel(GradCheckpointing, nn.Module):
    """One stage (upstream `MambaVisionLayer`): conv blocks, or hybrid blocks on zero-padded windows; then downsample.

    Hybrid stages pad right/bottom with zeros to multiples of `window_size`, run every block on the windows (padded
    tokens take part in attention and the scan, unmasked, as upstream), reverse the partition and crop.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        conv: bool,
        downsample: bool,
        window_size: int,
        drop_path: list[float],
        layer_scale_conv: float | None = None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.window_size = window_size
        if conv:
            blocks = [ConvBlock(dim, drop_path=drop_path[i], layer_scale=layer_scale_conv) for i in range(depth)]
        else:
            attn = set(attention_indices(depth))
            blocks = [
                MambaVisionBlock(dim, attention=i in attn, drop_path=drop_path[i], **block_kwargs)
                for i in range(depth)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.downsample = Downsample(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 2C, ceil(H/2), ceil(W/2)), or (B, C, H, W) for the last stage."""
        if self.conv:
            for blk in self.blocks:  # not checkpointed: recomputing BatchNorm would count its batch twice
                x = blk(x)
        else:
            x = self._windowed(x)
        return x if self.downsample is None else self.downsample(x)

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        ws = self.window_size
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = F.pad(x, (0, pad_r, 0, pad_b))  # (B, C, Hp, Wp), zeros right and bottom
        t = window_partition(x, ws)  # (B·nH·nW, ws², C)
        for blk in self.blocks:
            t = self.run_block(blk, t)
        return window_reverse(t, ws, H + pad_b, W + pad_r)[:, :, :H, :W]  # (B, C, H, W)


# ---- the model ------------------------------------------------------------------------------------------------------
class MambaVision(GradCheckpointing, nn.Module):
    """MambaVision classifier.

    Args:
        dim: stage-1 width D; stages are D, 2D, 4D, 8D.
        in_dim: width after the first stem conv.
        depths: blocks per stage; the first two stages are convolutional, the rest hybrid.
        num_heads: attention heads per stage (only hybrid stages use them).
        window_size: window side per stage (only hybrid stages use them).
        mlp_ratio: MLP hidden width / C in hybrid blocks.
        num_classes: head outputs (0 = no head; `forward` returns pooled features).
        in_chans: input channels.
        img_size: nominal input size (int or (H, W)); informational: any size runs, through window padding.
        stem_strides: strides of the two stem convs; the official design uses (2, 2).
        drop_path_rate: stochastic depth, linear 0 -> rate over all sum(depths) blocks in order.
        drop_rate: dropout in MLPs and after the attention projection.
        attn_drop_rate: dropout on attention probabilities.
        qkv_bias: bias on the attention's qkv projection.
        layer_scale: γ init for hybrid blocks (None = no γ parameters).
        layer_scale_conv: γ init for conv blocks (None in every released variant).
        crop_pct: evaluation centre-crop fraction recorded in `pretrained_cfg`.
        attn_impl: "sdpa" or "manual" attention.
        scan_impl: selective-scan form for every mixer ("auto", "loop", "chunked", "doubling", "cuda").
    """

    def __init__(
        self,
        *,
        dim: int,
        in_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_size: tuple[int, ...] = (8, 8, 14, 7),
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        stem_strides: tuple[int, int] = (2, 2),
        drop_path_rate: float = 0.2,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
        crop_pct: float = 1.0,
        attn_impl: str = "sdpa",
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        if not len(depths) == len(num_heads) == len(window_size):
            raise ValueError(f"depths, num_heads and window_size need one entry per stage: {depths}, {num_heads}, "
                             f"{window_size}")
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl must be one of {SCAN_IMPLS}, got {scan_impl!r}")
        H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.pretrained_cfg = {"input_size": (in_chans, H, W), "crop_pct": crop_pct, "interpolation": "bicubic",
                               **IMAGENET_NORM}
        self.num_classes = num_classes
        self.num_features = int(dim * 2 ** (len(depths) - 1))
        self.patch_embed = Stem(in_chans=in_chans, in_dim=in_dim, dim=dim, strides=tuple(stem_strides))
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                            layer_scale=layer_scale, attn_impl=attn_impl, scan_impl=scan_impl)
        self.levels = nn.ModuleList(
            MambaVisionLevel(
                dim * 2**i, depth=d, conv=i < 2, downsample=i < len(depths) - 1, window_size=window_size[i],
                drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])], layer_scale_conv=layer_scale_conv,
                num_heads=num_heads[i], **block_kwargs,
            )
            for i, d in enumerate(depths)
        )
        self.norm = nn.BatchNorm2d(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    # ---- the classifier contract ----------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """A_log and D of every mixer (upstream marks them `_no_weight_decay`)."""
        return {n for n, _ in self.named_parameters() if n.endswith((".A_log", ".D"))}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    def set_scan_impl(self, impl: str) -> int:
        """Use selective-scan form `impl` in every mixer; returns how many mixers were switched."""
        if impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl must be one of {SCAN_IMPLS}, got {impl!r}")
        mixers = [m for m in self.modules() if isinstance(m, MambaVisionMixer)]
        for m in mixers:
            m.scan_impl = impl
        return len(mixers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised last-stage map (B, 8D, H/32, W/32) (sizes rounded up at each stride-2 step)."""
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 8D, h, w) -> logits (B, classes), or the pooled features (B, 8D) if `pre_logits`."""
        x = self.avgpool(x).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, classes)."""
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """Upstream's init pass (Q3): it reaches dt_proj too, so the Mamba dt-bias init does not survive."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---- registered variants (sizes and ImageNet-1K top-1 from the NVlabs/MambaVision README) ---------------------------
def _mambavision(defaults: dict, kwargs: dict) -> MambaVision:
    return MambaVision(**{**defaults, **kwargs})


@register_model
def mambavision_t(**kwargs) -> MambaVision:
    """MambaVision-T: D 80, depths 1-3-8-4; 31,794,248 params; 82.3 % ImageNet-1K top-1 (official)."""
    return _mambavision(dict(dim=80, in_dim=32, depths=(1, 3, 8, 4), num_heads=(2, 4, 8, 16)), kwargs)


@register_model
def mambavision_t2(**kwargs) -> MambaVision:
    """MambaVision-T2: D 80, depths 1-3-11-4; 35,104,008 params; 82.7 % (official)."""
    return _mambavision(dict(dim=80, in_dim=32, depths=(1, 3, 11, 4), num_heads=(2, 4, 8, 16), crop_pct=0.98), kwargs)


@register_model
def mambavision_s(**kwargs) -> MambaVision:
    """MambaVision-S: D 96, depths 3-3-7-5; 50,140,584 params; 83.3 % (official)."""
    return _mambavision(dict(dim=96, in_dim=64, depths=(3, 3, 7, 5), num_heads=(2, 4, 8, 16), crop_pct=0.93), kwargs)


@register_model
def mambavision_b(**kwargs) -> MambaVision:
    """MambaVision-B: D 128, depths 3-3-10-5, layer scale 1e-5; 97,685,288 params; 84.2 % (official)."""
    return _mambavision(dict(dim=128, in_dim=64, depths=(3, 3, 10, 5), num_heads=(2, 4, 8, 16), drop_path_rate=0.3,
                             layer_scale=1e-5), kwargs)


@register_model
def mambavision_l(**kwargs) -> MambaVision:
    """MambaVision-L: D 196 (not 192), depths 3-3-10-5, layer scale 1e-5; 227,961,048 params; 85.0 % (official)."""
    return _mambavision(dict(dim=196, in_dim=64, depths=(3, 3, 10, 5), num_heads=(4, 8, 16, 32), drop_path_rate=0.3,
                             layer_scale=1e-5), kwargs)


@register_model
def mambavision_l2(**kwargs) -> MambaVision:
    """MambaVision-L2: D 196, depths 3-3-12-5, layer scale 1e-5; 241,554,824 params; 85.3 % (official)."""
    return _mambavision(dict(dim=196, in_dim=64, depths=(3, 3, 12, 5), num_heads=(4, 8, 16, 32), drop_path_rate=0.3,
                             layer_scale=1e-5), kwargs)


@register_model
def mambavision_cifar(**kwargs) -> MambaVision:
    """CIFAR-size MambaVision: vitforge's own variant, not an official model (2,750,426 params at 10 classes).

    At 32x32 the official design leaves stages 3/4 with 2x2 and 1x1 maps, zero-padded to 14x14 and 7x7 windows (196
    tokens with 4 real ones, 49 with 1). Deviations, all for that reason or for size: stem strides (1, 1) instead of
    (2, 2), so the stages run at 32, 16, 8 and 4 px like a CIFAR ResNet; windows = the stage-3/4 resolution (8 and 4 at
    32 px, derived from `img_size`), so scan and attention are global and unpadded (64 and 16 tokens); D 32, in_dim 16,
    depths 1-2-4-2 and heads 1-2-4-8 (head width 32 in both hybrid stages), about 0.15 GMACs per image, so it trains
    in CPU tests; drop path 0.1; 10 classes. Blocks, mixer, quirks, initialisation and key layout are the official ones.
    """
    size = kwargs.get("img_size", 32)
    side = size if isinstance(size, int) else max(size)
    windows = (8, 8, max(1, side // 4), max(1, side // 8))  # stage-3/4 sides with a stride-1 stem
    return _mambavision(dict(dim=32, in_dim=16, depths=(1, 2, 4, 2), num_heads=(1, 2, 4, 8), window_size=windows,
                             stem_strides=(1, 1), img_size=32, num_classes=10, drop_path_rate=0.1), kwargs)


# ---- entry points under the names of community MambaVision code -----------------------------------------------------
# Community re-implementations (`from mambavision_complete import create_mambavision_tiny`) describe an isotropic
# ViT-like stack (one resolution, constant width D 192/384/768, depth 6/8/12, static SSM matrices, Mamba and
# attention layers alternating) of about 3.2M/22M/86M parameters. That is not MambaVision: the official network
# (NVlabs/MambaVision `mambavision/models/mamba_vision.py`, arXiv 2407.08083 Table 1) is hierarchical (a conv stem,
# conv stages at 1/4 and 1/8 resolution, hybrid stages at 1/16 and 1/32 whose first half uses the selective-scan
# mixer with input-dependent B, C and dt and whose second half uses self-attention) and its T/S/B sizes are 31.8M,
# 50.1M and 97.7M parameters. These functions keep the familiar names and return the official variants of the same
# rank, so code written against those names gets the real architecture (and released checkpoints load).
def create_mambavision_tiny(num_classes: int = 1000, **kwargs) -> MambaVision:
    """Official MambaVision-T (`mambavision_t`: 31,794,248 params at 1000 classes, 4.4 GFLOPs at 224 px).

    Args:
        num_classes: classifier outputs.
        **kwargs: any `MambaVision` argument (img_size, drop_path_rate, in_chans, ...).
    """
    return mambavision_t(num_classes=num_classes, **kwargs)


def create_mambavision_small(num_classes: int = 1000, **kwargs) -> MambaVision:
    """Official MambaVision-S (`mambavision_s`: 50,140,584 params at 1000 classes, 7.5 GFLOPs at 224 px).

    Args:
        num_classes: classifier outputs.
        **kwargs: any `MambaVision` argument (img_size, drop_path_rate, in_chans, ...).
    """
    return mambavision_s(num_classes=num_classes, **kwargs)


def create_mambavision_base(num_classes: int = 1000, **kwargs) -> MambaVision:
    """Official MambaVision-B (`mambavision_b`: 97,685,288 params at 1000 classes, 15.0 GFLOPs at 224 px).

    Args:
        num_classes: classifier outputs.
        **kwargs: any `MambaVision` argument (img_size, drop_path_rate, in_chans, ...).
    """
    return mambavision_b(num_classes=num_classes, **kwargs)
