"""Load timm state dicts into the hand-written models.

This is the proof that our code is the standard architecture: timm builds its model (random weights, never a
download), the converter renames its keys to ours, and both models must then produce the same logits.
ViT and DeiT keys are already identical; CaiT's LayerScale parameters `gamma_1`/`gamma_2` become
`ls1.gamma`/`ls2.gamma`.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from vitforge.errors import CheckpointError
from vitforge.models.registry import create_model

# vitforge model name -> timm model name with the same architecture.
TIMM_EQUIVALENTS = {
    "vit_tiny_patch16_224": "vit_tiny_patch16_224",
    "deit_tiny_distilled_224": "deit_tiny_distilled_patch16_224",
    "cait_xxs24_224": "cait_xxs24_224",
}

_RENAMES = (
    (re.compile(r"\.gamma_1$"), ".ls1.gamma"),  # CaiT LayerScale
    (re.compile(r"\.gamma_2$"), ".ls2.gamma"),
)


def convert_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm key names -> vitforge key names (tensors are shared, not copied)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def load_timm_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a timm state dict into `model`; every key must match in name and shape.

    Raises:
        CheckpointError: naming the missing, unexpected or mis-shaped keys.
    """
    converted = convert_timm_state_dict(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    shapes = [k for k in set(own) & set(converted) if own[k].shape != converted[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"timm state dict does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]},"
            f" shape mismatch {sorted(shapes)[:5]}"
        )
    model.load_state_dict(converted)


def from_timm(name: str, **kwargs) -> tuple[nn.Module, nn.Module]:
    """Build vitforge model `name` and its timm equivalent (random init, no download); copy timm's weights into ours.

    Args:
        name: a key of `TIMM_EQUIVALENTS`.
        **kwargs: passed to both constructors (e.g. `num_classes`).

    Returns:
        (ours, theirs), both in eval mode.
    """
    import timm

    if name not in TIMM_EQUIVALENTS:
        raise CheckpointError(f"no timm equivalent known for {name!r}; known: {sorted(TIMM_EQUIVALENTS)}")
    theirs = timm.create_model(TIMM_EQUIVALENTS[name], pretrained=False, **kwargs).eval()
    ours = create_model(name, **kwargs).eval()
    load_timm_state_dict(ours, theirs.state_dict())
    return ours, theirs
