"""SClusterFormer (Fang, Sun, Zheng, Wu, IEEE TIP 34:701-716, 2025, doi 10.1109/TIP.2024.3522809) and an RGB variant.

Official hyperspectral model (`sclusterformer_hsi`), faithful to Fang666666/HSIC_SClusterFormer
`models/SClusterFormer.py`, `models/CrossAttention.py`, `models/FS_Attention.py`, `models/Pseudo3DDeformConv.py` and
`models/deform_conv_v3.py`, called from `Loop_EMAP_train.py` as SClusterFormer(img_size=13, pca_components=30,
emap_components=1, n_groups=[16, 16, 16], depths=[2, 1, 1], embed_dims=[256, 128, 64], num_heads=[8, 8, 8],
mlp_ratios=[1, 1, 1]). Input (B, 1, 31, 13, 13): 30 PCA bands + 1 EMAP band around a labelled pixel.
  PCA bands  -> MDC-FSA (pseudo-3-D deformable conv, multi-scale, DCT spectral attention) -> pad bands 30 -> 32
             -> upper branch: grouped 3x3 stride-1 pixel embeddings (256, 128, 64), spectral-angle cluster blocks
                (2, 1, 1), 169 tokens at every stage
  EMAP band  -> multi-scale deformable conv (1 -> 30, kernel 9) -> pad bands -> lower branch: 3x3 embeddings with
                strides 1, 2, 2 (13² -> 7² -> 4² tokens), Euclidean cluster blocks (2, 1, 1)
  fusion     -> lower tokens mixed 16 -> 169 along the token axis, cross attention (q lower, k/v upper, 4 heads,
                scale 64^-0.5, no residual, no MLP), computed per sample
  head       -> one Linear shared by the token means of upper, lower and fusion; p = c·upper + (1-c)/2·lower +
                (1-c)/2·fusion with a learnable c (init 0.7, unconstrained).

The official head ends in a softmax and training applies CrossEntropyLoss to it (a double softmax). Here that is the
switch `double_softmax` (default False: the three outputs are logits, their c-weighted sum is a logit vector for a
normal cross-entropy; True: each output is softmaxed first, rows sum to 1, as upstream). Because the weights c,
(1-c)/2, (1-c)/2 sum to 1, with plain logits `head(forward_head(x, pre_logits=True))` equals the logits exactly.

Kept from upstream: stochastic hard cluster assignment (dropout 0.4 on the similarities before the argmax),
30 bands and kernel 9 in the stems, full-width fusion scale, no fusion residual, the shared head, unconstrained c.
Differences that do not change the function: 1x1 convolutions on tokens are `nn.Linear` (same parameters), the
deformable conv runs through torchvision, cluster attention defaults to the memory-lean `matmul` formulation
(`cluster_impl="broadcast"` is upstream's), and `drop_path_rate` is available (0 upstream). Training-loop quirks
(early stop on the cumulative mean loss, `drop_last` on the test split) belong to the trainer, not to this file.
Patches for this model: `vitforge.data.hyperspectral.load_hyperspectral`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitforge.models.layers import drop_path_rates
from vitforge.models.layers.attention import IMPLS as ATTN_IMPLS
from vitforge.models.layers.attention import record_attention
from vitforge.models.layers.checkpointing import GradCheckpointing
from vitforge.models.layers.cluster_attention import ClusterBlock
from vitforge.models.layers.deform_conv import DeformConv2d, PseudoDeformConv3d
from vitforge.models.registry import register_model


# ---- spectral stem (MDC-FSA) -----------------------------------------------------------------------------------------
def dct_basis(n: int) -> torch.Tensor:
    """Orthonormal 1-D DCT-II basis (n, n), row u = frequency: cos(pi·u·(t + 1/2) / n) · sqrt((1 or 2) / n)."""
    t = torch.arange(n, dtype=torch.float64)
    basis = torch.stack([torch.cos(math.pi * u * (t + 0.5) / n) for u in range(n)]) / math.sqrt(n)
    basis[1:] *= math.sqrt(2)
    return basis.float()


class FreqSpectralAttention(nn.Module):
    """FcaNet-style channel attention with fixed 2-D DCT filters (upstream `FreqSpectralAttentionLayer`, "top2").

    Channels are split into len(freqs) equal groups; group i is weighted by the DCT basis image of frequency
    freqs[i] = (u along rows, v along columns) of the map pooled to dct_size², summed spatially, then
    FC(C -> C // reduction) -> ReLU -> FC -> sigmoid rescales the channels.
    """

    def __init__(self, channels: int, *, dct_size: int = 7, freqs=((0, 0), (0, 1)), reduction: int = 16) -> None:
        super().__init__()
        if channels % len(freqs):
            raise ValueError(f"{channels} channels cannot be split into {len(freqs)} frequency groups")
        basis, part = dct_basis(dct_size), channels // len(freqs)
        filters = torch.cat([torch.outer(basis[u], basis[v]).expand(part, -1, -1) for u, v in freqs])
        self.register_buffer("dct_filters", filters, persistent=False)  # (C, S, S)
        self.dct_size = dct_size
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        pooled = x if x.shape[-2:] == (self.dct_size,) * 2 else F.adaptive_avg_pool2d(x, self.dct_size)
        y = (pooled * self.dct_filters).sum(dim=(2, 3))  # (B, C)
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(y))))
        return x * y[:, :, None, None]


class MultiScaleDeformConv3dFSA(nn.Module):
    """MDC-FSA, the PCA-branch stem: shared pseudo-3-D deformable conv, three scale paths (kernel sizes 3, 5, 7 ->
    pooling factors int(k/3) = 1, 1, 2) each with its own 1x1x1 conv, fused by a 1x1x1 conv and added to the base,
    then the DCT frequency attention over the bands."""

    def __init__(self, bands: int = 30, *, kernel_sizes: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        self.kernel_sizes = kernel_sizes
        self.deform_conv = PseudoDeformConv3d(bands)
        self.scale_convs = nn.ModuleList(nn.Conv3d(1, 1, 1) for _ in kernel_sizes)
        self.fuse = nn.Conv3d(len(kernel_sizes), 1, 1)
        self.attention = FreqSpectralAttention(bands, dct_size=kernel_sizes[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 1, D, H, W)."""
        B, _, D, H, W = x.shape
        base = self.deform_conv(x)
        paths = []
        for k, conv in zip(self.kernel_sizes, self.scale_convs, strict=True):
            f = int(k / self.kernel_sizes[0])
            y = base
            if k != self.kernel_sizes[0]:  # upstream resamples even when f = 1 (an exact identity)
                y = F.avg_pool3d(base, (1, f, f), stride=(1, f, f), ceil_mode=True)
                y = F.interpolate(y, size=(D, H, W), mode="trilinear", align_corners=False)
            paths.append(conv(y))
        out = base + self.fuse(torch.cat(paths, dim=1))  # (B, 1, D, H, W)
        return self.attention(out.view(B, D, H, W)).view(B, 1, D, H, W)


class MultiScaleDeformConv2d(nn.Module):
    """Multi-scale deformable stem (EMAP branch upstream; the shared stem of the RGB variant): one deformable conv
    applied to the input resized by k/3 for k in (3, 5, 7), outputs resized back, concatenated, fused by a 1x1 conv
    and added to the 5/3-scale output."""

    def __init__(self, in_chans: int, out_chans: int, *, kernel_size: int, kernel_sizes=(3, 5, 7)) -> None:
        super().__init__()
        self.kernel_sizes = kernel_sizes
        self.deform_conv = DeformConv2d(in_chans, out_chans, kernel_size=kernel_size, padding=1)
        self.fuse = nn.Conv2d(out_chans * len(kernel_sizes), out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        H, W = x.shape[-2:]
        feats = []
        for k in self.kernel_sizes:
            scale = k / self.kernel_sizes[0]
            xs = x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            feats.append(F.interpolate(self.deform_conv(xs), size=(H, W), mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(feats, dim=1)) + feats[1]


# ---- branches --------------------------------------------------------------------------------------------------------
class PixelEmbedding(nn.Module):
    """Conv + BatchNorm + ReLU, flattened to tokens. `groups > 1` is upstream's GroupedPixelEmbedding."""

    def __init__(self, in_chans: int, embed_dim: int, *, kernel_size=3, stride=1, padding=1, groups=1) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, H'·W', D) and (H', W')."""
        x = F.relu(self.norm(self.proj(x)))
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])

    def out_size(self, size: int) -> int:
        k, s, p = self.proj.kernel_size[0], self.proj.stride[0], self.proj.padding[0]
        return (size + 2 * p - k) // s + 1


class ClusterBranch(GradCheckpointing, nn.Module):
    """Stages of (pixel embedding, cluster blocks, LayerNorm); the tokens go back to a map between stages.

    Args:
        in_chans: input channels.
        img_size: input side (to derive the token grid of every stage).
        embed_dims, depths, num_heads, mlp_ratios: per stage.
        embeds: per stage dict(kernel_size, stride, padding, groups) for `PixelEmbedding`.
        similarity: "cos" (upper, Cluster3D) or "euclidean" (lower, Cluster2D).
        dpr: drop-path rate of every block, in order.
        **cluster: head_dim, centres, sim_drop, impl for `ClusterBlock`.
    """

    def __init__(self, in_chans, *, img_size, embed_dims, depths, num_heads, mlp_ratios, embeds, similarity, dpr,
                 **cluster) -> None:
        super().__init__()
        self.embeds, self.stages, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        dims, size, rates = (in_chans, *embed_dims), img_size, iter(dpr)
        for i, depth in enumerate(depths):
            self.embeds.append(PixelEmbedding(dims[i], dims[i + 1], **embeds[i]))
            size = self.embeds[i].out_size(size)
            self.stages.append(nn.ModuleList(
                ClusterBlock(dims[i + 1], heads=num_heads[i], mlp_ratio=mlp_ratios[i], similarity=similarity,
                             drop_path=next(rates), **cluster) for _ in range(depth)
            ))
            self.norms.append(nn.LayerNorm(dims[i + 1]))
        self.out_grid = (size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens of the last stage (B, N, D)."""
        for i, (embed, blocks, norm) in enumerate(zip(self.embeds, self.stages, self.norms, strict=True)):
            x, hw = embed(x)  # (B, N_i, D_i)
            for blk in blocks:
                x = self.run_block(blk, x, hw)
            x = norm(x)
            if i < len(self.stages) - 1:
                x = x.transpose(1, 2).reshape(x.shape[0], -1, *hw)  # (B, D_i, H_i, W_i)
        return x


class FusionEncoder(nn.Module):
    """CFAF cross attention, one sample at a time: q = W_q LN(P(lower)), k, v = W_k, W_v LN(upper).

    P is a Conv1d with the lower **tokens as channels** (n_lower -> n_upper tokens, per feature). Upstream
    concatenates upper and P(lower) on the batch axis and splits the batch again inside the attention; for the
    official model this equals the per-sample form here (tested). Scale = dim^-0.5 (full width, not head width);
    no residual, no MLP, dropout after the output projection.
    """

    def __init__(self, dim: int, *, n_lower: int, n_upper: int, heads: int, drop: float = 0.1,
                 impl: str = "sdpa") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion width {dim} is not divisible by {heads} heads")
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.heads, self.scale, self.impl = heads, dim**-0.5, impl
        self.record: dict | None = None  # as in layers.Attention: set to a dict to record shapes and softmax check
        self.token_proj = nn.Conv1d(n_lower, n_upper, 1)
        self.norm = nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """upper (B, N_u, D), lower (B, N_l, D) -> (B, N_u, D)."""
        B, N, D = upper.shape
        q = self._heads(self.to_q(self.norm(self.token_proj(lower))))  # (B, h, N_u, d)
        upper = self.norm(upper)
        k, v = self._heads(self.to_k(upper)), self._heads(self.to_v(upper))
        if self.impl == "manual" or self.record is not None:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, h, N_u, N_u)
            o = attn @ v  # (B, h, N_u, d)
            if self.record is not None:  # the protocol of layers.Attention, read by `vitforge verify-attention`
                record_attention(self.record, q, k, v, attn)
                self.record["O"] = (B, N, D)
        else:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, D)))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, D = t.shape
        return t.view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, h, N, d)


# ---- classifiers -----------------------------------------------------------------------------------------------------
class _TwoBranchClassifier(GradCheckpointing, nn.Module):
    """Fusion, token means, shared head and the c-weighting. Subclasses build the stems and the two branches and
    define `forward_branches(x)` -> upper tokens (B, N_u, D), lower tokens (B, N_l, D).

    `forward_features` returns the three token-mean vectors stacked as (B, 3, D) in the order (upper, lower, fusion);
    `forward_head` applies the shared head to each and weights them by (c, (1-c)/2, (1-c)/2).
    """

    upper: ClusterBranch
    lower: ClusterBranch
    fusion: FusionEncoder

    def _init_head(self, dim: int, num_classes: int, double_softmax: bool) -> None:
        self.num_classes, self.num_features, self.double_softmax = num_classes, dim, double_softmax
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        self.branch_weight = nn.Parameter(torch.tensor([0.7]))  # c, unconstrained as upstream

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> token means of (upper, lower, fusion) stacked as (B, 3, D)."""
        upper, lower = self.forward_branches(x)
        fused = self.fusion(upper, lower)  # (B, N_u, D)
        return torch.stack([upper.mean(dim=1), lower.mean(dim=1), fused.mean(dim=1)], dim=1)

    def branch_weights(self) -> torch.Tensor:
        """(3,) weights (c, (1-c)/2, (1-c)/2) of the upper, lower and fusion outputs; they sum to 1."""
        c = self.branch_weight
        return torch.cat([c, (1 - c) / 2, (1 - c) / 2])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 3, D) -> c-weighted sum of the three head outputs (B, classes); logits, or probabilities with
        `double_softmax`. `pre_logits`: the c-weighted feature vector (B, D) (exact pre-logits for plain logits)."""
        w = self.branch_weights().view(1, 3, 1)
        if pre_logits:
            return (x * w).sum(dim=1)
        out = self.head(x)  # (B, 3, classes)
        if self.double_softmax and self.num_classes:
            out = out.softmax(dim=-1)
        return (out * w).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """New shared head (Identity for 0 classes: `forward` then returns the c-weighted features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """The learnable scalars: branch weight c and every cluster block's similarity scale/shift (alpha, beta)."""
        return {n for n, _ in self.named_parameters() if n == "branch_weight" or n.endswith(("sim_alpha", "sim_beta"))}


def _branch_kwargs(embed_dims, depths, num_heads, mlp_ratios, drop_path_rate, **cluster) -> dict:
    return dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios,
                dpr=drop_path_rates(drop_path_rate, sum(depths)), **cluster)


class SClusterFormerHSI(_TwoBranchClassifier):
    """The official hyperspectral SClusterFormer (see the module docstring).

    Args:
        img_size: patch side (13 for PaviaU).
        pca_bands: PCA bands D (30, hard-coded upstream); the input has D + 1 bands, the last one EMAP.
        num_classes: classes K (9 for PaviaU).
        embed_dims, depths, num_heads, mlp_ratios, n_groups: per stage (upstream (256, 128, 64), (2, 1, 1), 8, 1, 16).
        head_dim: cluster head width (24).
        centres: cluster centre grid (4, 4).
        sim_drop: dropout on cluster similarities (0.4).
        fusion_heads: heads of the fusion cross attention (4).
        fusion_drop: dropout after the fusion projection (0.1).
        drop_path_rate: stochastic depth over each branch's blocks (0 upstream).
        double_softmax: softmax each head output before weighting (upstream); default False = logits.
        cluster_impl: "matmul" (memory-lean) or "broadcast" (upstream's materialised formulation).
        attn_impl: "sdpa" or "manual" for the fusion attention.
    """

    def __init__(self, *, img_size=13, pca_bands=30, num_classes=9, embed_dims=(256, 128, 64), depths=(2, 1, 1),
                 num_heads=(8, 8, 8), mlp_ratios=(1, 1, 1), n_groups=(16, 16, 16), head_dim=24, centres=(4, 4),
                 sim_drop=0.4, fusion_heads=4, fusion_drop=0.1, drop_path_rate=0.0, double_softmax=False,
                 cluster_impl="matmul", attn_impl="sdpa") -> None:
        super().__init__()
        self.pca_bands = pca_bands
        self.padded_bands = math.ceil(pca_bands / n_groups[0]) * n_groups[0]
        self.pretrained_cfg = {"input_size": (1, pca_bands + 1, img_size, img_size)}
        self.pca_stem = MultiScaleDeformConv3dFSA(pca_bands)
        self.emap_stem = MultiScaleDeformConv2d(1, pca_bands, kernel_size=9)
        common = _branch_kwargs(embed_dims, depths, num_heads, mlp_ratios, drop_path_rate, head_dim=head_dim,
                                centres=centres, sim_drop=sim_drop, impl=cluster_impl)
        upper_embeds = [dict(kernel_size=3, stride=1, padding=1, groups=g) for g in n_groups]
        lower_embeds = [dict(kernel_size=3, stride=1 if i == 0 else 2, padding=1) for i in range(len(depths))]
        self.upper = ClusterBranch(self.padded_bands, img_size=img_size, embeds=upper_embeds, similarity="cos",
                                   **common)
        self.lower = ClusterBranch(self.padded_bands, img_size=img_size, embeds=lower_embeds,
                                   similarity="euclidean", **common)
        n_upper, n_lower = (math.prod(b.out_grid) for b in (self.upper, self.lower))
        self.fusion = FusionEncoder(embed_dims[-1], n_lower=n_lower, n_upper=n_upper, heads=fusion_heads,
                                    drop=fusion_drop, impl=attn_impl)
        self._init_head(embed_dims[-1], num_classes, double_softmax)

    def _pad_bands(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D', H, W): replicate the last band up to a multiple of the first stage's groups."""
        extra = self.padded_bands - x.shape[1]
        return torch.cat([x, x[:, -1:].expand(-1, extra, -1, -1)], dim=1) if extra else x

    def forward_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, D + 1, H, W) -> upper (B, H·W, D_last), lower (B, N_l, D_last)."""
        D = self.pca_bands
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2] != D + 1:
            raise ValueError(f"SClusterFormerHSI expects (B, 1, {D + 1}, H, W) ({D} PCA bands + 1 EMAP band), got "
                             f"{tuple(x.shape)}")
        pca = self.pca_stem(x[:, :, :D]).squeeze(1)  # (B, D, H, W)
        emap = self.emap_stem(x[:, :, D])  # (B, 1, H, W) -> (B, D, H, W)
        return self.upper(self._pad_bands(pca)), self.lower(self._pad_bands(emap))


class SClusterFormerRGB(_TwoBranchClassifier):
    """RGB SClusterFormer: the Kaggle RGB adaptation of rajanikant04/plant_disease_classification (apple-disease
    images, 4 classes; `kaggle_final_optimized.py`, `models/SClusterFormer.py`, `OPTIMIZATION_SUMMARY.md`) made
    consistent.

    Input (B, C, H, W) -> shared multi-scale deformable stem (C -> stem_dim, kernel 3) -> upper: grouped k4 s4
    embedding + spectral-angle cluster blocks; lower: plain k4 s4 embedding + Euclidean cluster blocks; later stages
    (if any) 3x3 stride 2; each branch output average-pooled over tokens to at most `token_cap` tokens; fusion, shared
    head, learnable c as in the official model. With the defaults (one stage of width 32, depth 2, 8 heads, 4 classes)
    it has 141,889 parameters: that Kaggle model (272,897) minus its Conv1d(32 -> 64² = 4,096) fusion
    projection (135,168) plus the consistent Conv1d(64 -> 64 tokens) (4,160).

    Deviations from that code (each fixes a defect found by running it at commit 727e85b):
      * DEVIATION (grid size from the token count): cluster blocks take the H x W of the embedding output, not
        `img_size` (upstream kept patch_size = 64 while the stride-4 embedding gives 16 x 16 tokens: reshape error).
      * DEVIATION (per-sample fusion): q from the lower tokens and k/v from the upper tokens of the same sample
        (upstream concatenated on the sequence axis but still split the batch in halves: cross-sample leakage and
        a B/2 output that silently broadcast at batch 2).
      * DEVIATION (consistent fusion projection): the lower tokens are mixed along the token axis, N_l -> N_u
        (64 -> 64), the official semantics; upstream's Conv1d(h_dim -> 64²) produced 4,096-wide features.
      * DEVIATION (plain logits): `double_softmax` defaults to False (upstream inherited the double softmax).

    Args:
        img_size: input side; in_chans: input channels; num_classes: classes.
        stem_dim: stem output channels (64).
        embed_dims, depths, num_heads, mlp_ratios, n_groups: per stage ((32,), (2,), (8,), (1,), (32,)).
        first_kernel, first_stride, first_padding: first embedding of both branches (4, 4, 0; stride 1 with
            kernel 3 / padding 1 reproduces the every-pixel-a-token configuration that ran out of memory).
        token_cap: tokens per branch after adaptive average pooling (64; None = no cap).
        fusion_heads: fusion heads (2 = min(4, 32 // 16)); other arguments as in `SClusterFormerHSI`.
    """

    def __init__(self, *, img_size=64, in_chans=3, num_classes=4, stem_dim=64, embed_dims=(32,), depths=(2,),
                 num_heads=(8,), mlp_ratios=(1,), n_groups=(32,), first_kernel=4, first_stride=4, first_padding=0,
                 token_cap: int | None = 64, head_dim=24, centres=(4, 4), sim_drop=0.4, fusion_heads=2,
                 fusion_drop=0.1, drop_path_rate=0.0, double_softmax=False, cluster_impl="matmul",
                 attn_impl="sdpa") -> None:
        super().__init__()
        self.pretrained_cfg = {"input_size": (in_chans, img_size, img_size)}
        self.token_cap = token_cap
        self.stem = MultiScaleDeformConv2d(in_chans, stem_dim, kernel_size=3)
        first = dict(kernel_size=first_kernel, stride=first_stride, padding=first_padding)
        later = dict(kernel_size=3, stride=2, padding=1)
        common = _branch_kwargs(embed_dims, depths, num_heads, mlp_ratios, drop_path_rate, head_dim=head_dim,
                                centres=centres, sim_drop=sim_drop, impl=cluster_impl)
        self.upper = ClusterBranch(stem_dim, img_size=img_size, similarity="cos", **common, embeds=[
            dict(first if i == 0 else later, groups=g) for i, g in enumerate(n_groups)])
        self.lower = ClusterBranch(stem_dim, img_size=img_size, similarity="euclidean", **common, embeds=[
            first if i == 0 else later for i in range(len(depths))])
        n_upper, n_lower = (self._capped(math.prod(b.out_grid)) for b in (self.upper, self.lower))
        self.fusion = FusionEncoder(embed_dims[-1], n_lower=n_lower, n_upper=n_upper, heads=fusion_heads,
                                    drop=fusion_drop, impl=attn_impl)
        self._init_head(embed_dims[-1], num_classes, double_softmax)

    def _capped(self, n: int) -> int:
        return n if self.token_cap is None else min(n, self.token_cap)

    def _cap(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, min(N, cap), D) by adaptive average pooling over the token axis."""
        if self.token_cap is None or x.shape[1] <= self.token_cap:
            return x
        return F.adaptive_avg_pool1d(x.transpose(1, 2), self.token_cap).transpose(1, 2)

    def forward_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> upper, lower tokens (B, N', D) after the token cap."""
        x = self.stem(x)  # (B, stem_dim, H, W)
        return self._cap(self.upper(x)), self._cap(self.lower(x))


# ---- registered variants ---------------------------------------------------------------------------------------------
@register_model
def sclusterformer_hsi(**kwargs) -> SClusterFormerHSI:
    """Official PaviaU configuration: 13x13 patches of 30 PCA + 1 EMAP bands, 9 classes, 1,966,865 parameters."""
    return SClusterFormerHSI(**{**dict(img_size=13, pca_bands=30, num_classes=9), **kwargs})


@register_model
def sclusterformer_rgb(**kwargs) -> SClusterFormerRGB:
    """RGB variant: 64x64, stem 64, one stage of width 32 (k4 s4), token cap 64, 4 classes, 141,889 params."""
    return SClusterFormerRGB(**{**dict(img_size=64, num_classes=4), **kwargs})
