"""Activation (gradient) checkpointing for the hand-written models: `train.grad_checkpointing=true`.

A model that mixes in `GradCheckpointing` runs each of its blocks through `self.run_block(blk, *args)`. When enabled
(`model.set_grad_checkpointing()`, which reaches every `GradCheckpointing` submodule) and gradients are being
recorded, a block's activations are dropped after the forward pass and recomputed in the backward pass: memory per
block falls to its input, at the cost of one more forward. The RNG state is replayed for the recomputation
(`preserve_rng_state`), so dropout and drop-path draw the same masks and the gradients equal the plain ones.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class GradCheckpointing:
    """Mixin for `nn.Module`s whose forward runs blocks through `run_block`."""

    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block of this module and of its `GradCheckpointing` submodules."""
        assert isinstance(self, nn.Module)
        for m in self.modules():
            if isinstance(m, GradCheckpointing):
                m.grad_checkpointing = enable

    def run_block(self, block: nn.Module, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def supports_grad_checkpointing(model: nn.Module) -> bool:
    return callable(getattr(model, "set_grad_checkpointing", None))
