"""Loaders: which items each process sees in which order, and how uint8 batches reach the device.

Two paths deliver uint8 batches (B, 3, S, S):
- `DeviceLoader`: the decoded dataset lives on the training device; a batch is an index gather (no copies, no workers).
- `WorkerLoader`: a torch DataLoader with worker processes running per-sample torchvision transforms v2
  (large images, or per-sample policies such as AutoAugment on CPU).
Both follow the same epoch plan (`epoch_plan`), a pure function of (seed, epoch), and both can start an epoch at a
given batch, which is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitforge.data.images import ImageError
from vitforge.runtime import usable_cpus

log = logging.getLogger("vitforge.data")


_said: set[tuple[int, int]] = set()


def effective_workers(requested: int) -> int:
    """`data.num_workers` capped at the usable cores.

    More worker processes than cores only time-slice one another (and the training step), and PyTorch's DataLoader
    then warns that it "will create N worker processes in total" (`_check_worker_number_rationality`, which compares
    with the affinity count; `usable_cpus` is never more than that), a warning a user cannot act on from vitforge.
    The cap is logged once per (requested, usable) pair.
    """
    cores = usable_cpus()
    n = min(max(0, requested), cores)
    if n < requested and (requested, cores) not in _said:
        _said.add((requested, cores))
        log.info("data.num_workers=%d, but this process can use %d core(s): using %d DataLoader worker(s)",
                 requested, cores, n)
    return n


def epoch_plan(
    n: int,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    repeats: int = 1,
    rank: int = 0,
    world: int = 1,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Positions (into the dataset) that process `rank` visits in `epoch`.

    Training (shuffle): every image appears `repeats` times (repeated augmentation: each copy is augmented
    independently, so an epoch holds repeats·n samples; Hoffer et al., "Augment Your Batch", CVPR 2020; DeiT's
    `samplers.py` `RASampler` uses 3), or `n` draws with probability `weights`
    (balanced sampling); the list is permuted with a (seed, epoch) generator, then dealt round-robin to the
    ranks and cut to equal length so every rank runs the same number of steps.
    Evaluation (no shuffle): rank r gets items r, r + world, ... (uneven counts are fine; metrics are summed).
    """
    if not shuffle:
        return np.arange(rank, n, world)
    rng = np.random.default_rng([seed, epoch, 7919])
    if weights is not None:
        order = rng.choice(n, size=n * repeats, replace=True, p=weights / weights.sum())
    else:
        order = rng.permutation(np.repeat(np.arange(n), repeats))
    per_rank = len(order) // world
    return order[rank::world][:per_rank]


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position, 104729]).generate_state(1)[0])


class DeviceLoader:
    """Batches of a device-resident uint8 tensor.

    Args:
        images: (N, 3, H, W) uint8 on the training device.
        labels: (N,) int64 on the same device.
        batch_size: items per batch.
        train: shuffle + drop the last incomplete batch (training) or keep order and every item (evaluation).
        seed, repeats, rank, world, weights: see `epoch_plan`.
    """

    def __init__(self, images, labels, batch_size, *, train, seed=0, repeats=1, rank=0, world=1, weights=None):
        self.bad: set[str] = set()  # items found undecodable while iterating (none here: decoded up front)
        self.images, self.labels = images, labels
        self.batch_size, self.train = batch_size, train
        self.plan_args = dict(seed=seed, shuffle=train, repeats=repeats if train else 1, rank=rank, world=world,
                              weights=weights if train else None)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _plan(self) -> np.ndarray:
        return epoch_plan(len(self.labels), epoch=self.epoch, **self.plan_args)

    def __len__(self) -> int:
        m = len(self._plan())
        return m // self.batch_size if self.train else -(-m // self.batch_size)

    def __iter__(self):
        plan = torch.from_numpy(self._plan()).to(self.images.device)
        for b in range(self.start_batch, len(self)):
            idx = plan[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx], idx


class SampleDataset(Dataset):
    """Per-sample transforms in worker processes. Items are (position, index, seed) tuples from the batch sampler.

    The transform's randomness is seeded per (seed, epoch, position), so results do not depend on which worker runs
    an item or on where an epoch was resumed. An image that fails to decode is reported by name; in training it is
    replaced by the next decodable item (label included), in evaluation it comes back marked `ok=False` and the
    loader drops it (and lists it in `bad`).
    """

    def __init__(self, load, labels: np.ndarray, transform, ids: list[str], *, size: int, replace_bad: bool):
        self.load, self.labels, self.transform, self.ids = load, labels, transform, ids
        self.size, self.replace_bad = size, replace_bad

    def __len__(self) -> int:
        return len(self.labels)

    def _first_decodable(self, i: int):
        tries = len(self.labels) if self.replace_bad else 1
        for k in range(tries):
            j = (i + k) % len(self.labels)
            try:
                return j, self.load(j)
            except ImageError as e:
                logging.getLogger("vitforge.data").warning("skipping unreadable image %s", e)
        return i, None

    def __getitem__(self, item):
        _, i, seed = item
        j, img = self._first_decodable(i)
        if img is None:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), int(self.labels[i]), i, False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.transform(img)
        return x, int(self.labels[j]), j, True


class _PlanBatches:
    """Batch sampler over an epoch plan; yields lists of (position, index, seed).

    It holds its loader through a weak reference: a strong one would close a cycle (loader -> DataLoader -> batch
    sampler -> loader), and a loader in a cycle, with its persistent worker processes, would outlive its last user
    until the next garbage collection instead of being freed (workers joined) when that user drops it.
    """

    def __init__(self, loader: WorkerLoader):
        self.loader = weakref.proxy(loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        L = self.loader
        plan = L._plan()
        for b in range(L.start_batch, len(L)):
            pos = range(b * L.batch_size, min((b + 1) * L.batch_size, len(plan)))
            yield [(p, int(plan[p]), sample_seed(L.seed, L.epoch, p)) for p in pos]


class WorkerLoader(DeviceLoader):
    """DataLoader with workers over a `SampleDataset`; same epoch plan and resume semantics as `DeviceLoader`."""

    def __init__(self, dataset: SampleDataset, batch_size, *, train, num_workers, device, seed=0, repeats=1, rank=0,
                 world=1, weights=None):
        self.dataset = dataset
        self.labels = dataset.labels
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.plan_args = dict(seed=seed, shuffle=train, repeats=repeats if train else 1, rank=rank, world=world,
                              weights=weights if train else None)
        self.epoch, self.start_batch = 0, 0
        self.device = device
        self.bad: set[str] = set()
        self.num_workers = effective_workers(num_workers)
        self.dl = DataLoader(
            dataset, batch_sampler=_PlanBatches(self), num_workers=self.num_workers, pin_memory=device.type == "cuda",
            # Workers live as long as the loader: started once, not again every epoch (the batch sampler runs in
            # this process, so each epoch's plan and resume position still apply).
            persistent_workers=self.num_workers > 0,
            # Its own generator: creating an iterator must not draw from the global RNG (exact mid-epoch resume).
            generator=torch.Generator().manual_seed(seed),
        )

    def __iter__(self):
        nb = self.device.type == "cuda"
        for x, y, idx, ok in self.dl:
            if not ok.all():
                self.bad.update(self.dataset.ids[i] for i in idx[~ok].tolist())
                x, y, idx = x[ok], y[ok], idx[ok]
            yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb), idx.to(self.device)
