"""A DDP rank for tests/eval/test_ensemble.py, kept in its own light module: spawned processes import only this
(torch + vitforge.eval.tta), not the test module with its trainer and CLI imports."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from vitforge.eval.tta import collect_probs, tta_views


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def rank_main(rank: int, world: int, init: str, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    """Evaluate this rank's share (items r, r + world, ... as the evaluation plan deals them) and save rank 0's
    gathered result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    idx = torch.arange(rank, len(x), world)
    stream = [(x[i], y[i], i) for i in idx.split(3)]
    plain, tta, labels, order = collect_probs(tiny_model(), stream, tta_views("flip"))
    if rank == 0:
        torch.save({"plain": plain, "tta": tta, "labels": labels, "idx": order}, out)
    dist.destroy_process_group()
