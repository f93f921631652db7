"""Shared building blocks. Model files import from here instead of redefining attention or MLPs."""

from vitforge.models.layers.attention import Attention, set_attention_impl
from vitforge.models.layers.block import Block, LayerScale
from vitforge.models.layers.drop_path import DropPath, drop_path_rates
from vitforge.models.layers.mlp import Mlp
from vitforge.models.layers.patch_embed import PatchEmbed
from vitforge.models.layers.pos_embed import sincos_2d

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "drop_path_rates",
    "set_attention_impl",
    "sincos_2d",
]
