"""`PatchEmbed`: one strided conv == unfold into p x p patches + Linear; tokens in raster order; timm parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed as TimmPatchEmbed

from vitforge.models.layers.patch_embed import PatchEmbed


def test_equals_unfold_then_linear():
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=12, patch_size=4, in_chans=3, embed_dim=5).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    patches = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, C·p·p), channel-major vectors
    want = patches @ pe.proj.weight.reshape(5, -1).T + pe.proj.bias
    got = pe(x)
    assert got.shape == (2, 9, 5) and pe.num_patches == 9 and pe.grid_size == (3, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_tokens_are_in_raster_order():
    pe = PatchEmbed(img_size=8, patch_size=2, in_chans=1, embed_dim=1, bias=False)
    with torch.no_grad():
        pe.proj.weight.fill_(1.0)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2:4, 6:8] = 1.0  # patch row 1, column 3 of a 4 x 4 grid
    tokens = pe(x)[0, :, 0]
    assert tokens.nonzero().flatten().tolist() == [1 * 4 + 3] and tokens[7].item() == 4.0


def test_same_function_as_timm_patch_embed():
    torch.manual_seed(1)
    ours = PatchEmbed(img_size=16, patch_size=4, in_chans=3, embed_dim=8)
    ref = TimmPatchEmbed(img_size=16, patch_size=4, in_chans=3, embed_dim=8)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_size_errors_name_the_numbers():
    with pytest.raises(ValueError, match="^img_size 10 is not divisible by patch_size 4$"):
        PatchEmbed(img_size=10, patch_size=4, embed_dim=8)
    pe = PatchEmbed(img_size=16, patch_size=4, embed_dim=8)
    with pytest.raises(ValueError, match="^expected 16x16 input, got 16x12$"):
        pe(torch.zeros(1, 3, 16, 12))
