"""`ConvStemPatchEmbed`: Conv3x3 -> BN -> GELU, then the unfold + Linear it replaces by a strided conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitforge.models.layers.conv_stem import ConvStemPatchEmbed


def test_equals_stem_then_unfold_then_linear():
    torch.manual_seed(0)
    m = ConvStemPatchEmbed(img_size=8, patch_size=4, in_chans=3, stem_chs=6, embed_dim=5).double().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    s = F.conv2d(x, m.conv.weight, padding=1)  # no conv bias
    s = (s - m.bn.running_mean[:, None, None]) / torch.sqrt(m.bn.running_var[:, None, None] + m.bn.eps)
    s = F.gelu(s * m.bn.weight[:, None, None] + m.bn.bias[:, None, None])
    patches = F.unfold(s, kernel_size=4, stride=4).transpose(1, 2)  # (B, 4, 6·4·4)
    want = patches @ m.proj.weight.T + m.proj.bias
    got = m(x)
    assert got.shape == (2, 4, 5) and m.num_patches == 4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_parameter_count_of_the_kd_vit_stem():
    """256 stem channels, 4x4 patches, D 256: 6,912 + 512 + 1,048,832 = 1,056,256 parameters."""
    m = ConvStemPatchEmbed(img_size=32, patch_size=4, stem_chs=256, embed_dim=256)
    assert m.conv.bias is None
    assert [p.numel() for p in m.parameters()] == [6912, 256, 256, 4096 * 256, 256]
    assert sum(p.numel() for p in m.parameters()) == 1_056_256


def test_size_errors():
    with pytest.raises(ValueError, match="^img_size 30 is not divisible by patch_size 4$"):
        ConvStemPatchEmbed(img_size=30, patch_size=4, stem_chs=4, embed_dim=4)
    with pytest.raises(ValueError, match="^expected 8x8 input, got 16x16$"):
        ConvStemPatchEmbed(img_size=8, patch_size=4, stem_chs=4, embed_dim=4)(torch.zeros(1, 3, 16, 16))
