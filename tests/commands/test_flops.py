"""`vitforge info` FLOPs/MACs (torch.utils.flop_counter) against a hand count of a ViT."""

from __future__ import annotations

import json

import pytest

from vitforge.commands.cli import main
from vitforge.commands.inspect import model_info


def vit_macs_by_hand(*, img: int, patch: int, dim: int, depth: int, mlp_ratio: float, classes: int,
                     in_chans: int = 3, cls_tokens: int = 1) -> int:
    """Multiply-adds of a ViT forward pass for one image, matmuls and convolutions only.

    patch embedding   P·D·(C·p²)               a p x p stride-p conv, P = (img/p)² patches
    per block (N = P + cls tokens, hidden H = mlp_ratio·D):
      qkv             N·D·3D
      Q·K^T           N·N·D                    all heads together: h · N·N·(D/h)
      A·V             N·N·D
      proj            N·D·D
      mlp             N·D·H + N·H·D
    head              D·classes                the CLS token only
    Not counted, like the counter: softmax, LayerNorm, GELU, bias and residual additions, position embeddings
    (for ViT-Ti/16 about 35 MFLOPs of elementwise work against 2.5 GFLOPs of matmuls, ~1.4%).
    """
    p = (img // patch) ** 2
    n = p + cls_tokens
    hidden = int(dim * mlp_ratio)
    embed = p * dim * in_chans * patch * patch
    block = n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * hidden
    return embed + depth * block + dim * classes


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_vit_tiny_counts_match_the_hand_count(attn_impl):
    """ViT-Ti/16 at 224: the counter agrees with the hand count exactly (0 MACs apart), whether attention runs as
    PyTorch's fused kernel (counted through our mapping on CPU) or as explicit matmuls."""
    info = model_info("vit_tiny_patch16_224", [f"attn_impl={attn_impl}"])
    hand = vit_macs_by_hand(img=224, patch=16, dim=192, depth=12, mlp_ratio=4, classes=1000)
    assert hand == 1_253_683_200
    assert info["macs"] == hand and info["flops"] == 2 * hand
    assert info["flops_by_op"]["convolution"] == 2 * 196 * 192 * 768  # the patch embedding


def test_vit_demo_and_cli_output(capsys):
    hand = vit_macs_by_hand(img=8, patch=2, dim=64, depth=4, mlp_ratio=2, classes=10)
    assert main(["info", "vit_demo", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["macs"] == hand == 2_389_120 and info["flops"] == 2 * hand
    assert main(["info", "vit_demo"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  0.002 GMACs = 0.005 GFLOPs per image (matmuls and convolutions; papers' 'FLOPs' usually " \
                     "mean MACs)"


def test_mambavision_t_is_within_4_percent_of_the_published_4_4_gflops():
    """MambaVision-T: 4.4 G (MACs) in arXiv 2407.08083 Table 1; the selective scan's elementwise recurrence is not a
    matmul and is not counted, as in the paper's count."""
    info = model_info("mambavision_t")
    assert info["macs"] == pytest.approx(4.4e9, rel=0.04)
