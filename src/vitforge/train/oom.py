"""Batches that fit in device memory: `data.batch_size=auto` and the out-of-memory back-off.

`auto_batch_size` (for `data.batch_size=auto`, once before training, on a CUDA device only) runs trial training
steps -- forward, backward and one step of a fresh optimizer built like the run's -- at growing batch sizes: the
batch doubles until a step runs out of memory, then a binary search between the last batch that fitted and the
first that did not finds the largest that fits (the "binsearch" mode of PyTorch Lightning's batch-size finder,
`src/lightning/pytorch/tuner/batch_size_scaling.py`). A `headroom` fraction of it (0.9) is used: the real run also
holds augmentation buffers, evaluation batches and a fragmented allocator, which the trial steps do not. The trial
steps change nothing: weights, buffers and random-generator states are restored afterwards. On CPU and Apple MPS
(unified memory: running out of it swaps or kills the process rather than raising an error) the search is
skipped and `CPU_BATCH_SIZE` is used. The resolved number replaces "auto" in the run's config, which is written
to the run directory and into every checkpoint, so `--resume` runs with the same batch.

`OomBackoff` wraps the forward/backward passes of an optimizer step: on an out-of-memory error it zeroes the
gradients, frees cached memory, halves the micro-batch (so accumulation doubles and the effective batch, the data
order and the loss weights stay the same) and retries the step from its start with the same data. Recovery runs
outside the `except` clause: the exception's traceback holds the failed step's activations (PyTorch FAQ, "My out
of memory exception handler can't allocate memory", pytorch/pytorch `docs/source/notes/faq.rst`). Its state, the
micro-batch, is saved in checkpoints so a resumed run continues with the micro-batch it had reached.

`micro_batches` splits the batches of one optimizer step into micro-batches and weights each one by its share
of the step's images per batch, so that the weighted micro-batch losses sum to the same value -- and the
gradients to the same gradients -- as the unsplit batches (exact for losses that are a mean over images and for
models without batch statistics; BatchNorm normalises each micro-batch by its own statistics, and a class-weighted
hard-target cross-entropy divides by the chunk's weight sum).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vitforge.errors import VitforgeError, first_line

log = logging.getLogger("vitforge")

CPU_BATCH_SIZE = 32
"""`data.batch_size=auto` on CPU or MPS, where no memory search runs (capped by the number of training images)."""
AUTO_START = 16
"""First batch the search tries (it doubles from here)."""
AUTO_LIMIT = 4096
"""Largest batch the search tries: beyond this a bigger batch rarely trains better without retuning the lr."""
HEADROOM = 0.9
"""Fraction of the largest fitting batch that `data.batch_size=auto` uses."""


class OutOfMemory(VitforgeError):
    """The device ran out of memory even at the smallest batch (one image)."""


def is_oom(e: BaseException) -> bool:
    """Whether `e` is a device out-of-memory error: `torch.cuda.OutOfMemoryError`, or a RuntimeError saying "out of
    memory" (older CUDA builds, cuBLAS/cuDNN workspace allocations, "MPS backend out of memory")."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def free_memory() -> None:
    """Drop unreachable tensors (reference cycles) and return the allocator's cached blocks to the device; nothing
    on a machine whose accelerator is unused (a full collection takes a noticeable fraction of a second)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if not (cuda or mps):
        return
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if mps:
        torch.mps.empty_cache()


# ---- micro-batches ---------------------------------------------------------------------------------------------------
class MicroBatch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    weight: float
    """Multiplies this micro-batch's mean loss: its images / (images of its batch x batches in the step)."""
    last: bool
    """The step's last micro-batch (under DDP the only one whose backward synchronises gradients)."""


def split_batch(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(x, y) in chunks of `size` images along dim 0 (the last one may be smaller), each with its share of the batch:
    sum_i share_i * mean_loss(chunk_i) = mean_loss(batch). `y` is class indices (B,) or soft targets (B, K)."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"images and targets differ in batch size: {n} vs {y.shape[0]}")
    return [(x[i:i + size], y[i:i + size], min(size, n - i) / n) for i in range(0, n, size)]


def micro_batches(window: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int) -> Iterator[MicroBatch]:
    """The micro-batches of one optimizer step over `window` (the step's batches, one per accumulation step), each
    weighted so that the weighted losses sum to the mean over the window of the batches' mean losses -- what the
    unsplit accumulation computes."""
    chunks = [(cx, cy, share / len(window)) for x, y in window for cx, cy, share in split_batch(x, y, size)]
    for i, (cx, cy, w) in enumerate(chunks):
        yield MicroBatch(cx, cy, w, i == len(chunks) - 1)


# ---- the back-off during training -----------------------------------------------------------------------------------
class OomBackoff:
    """Halve the micro-batch on a device out-of-memory error and retry the step.

    Args:
        batch_size: images per batch (`data.batch_size`); the micro-batch starts here.
        grad_accum: batches per optimizer step (`train.grad_accum`).
        enabled: False lets an out-of-memory error through unchanged (under DDP a rank that retried alone would
            leave the others waiting in a gradient all-reduce).
        say: also called with the one-line back-off message (e.g. the progress display); it is always logged.

    `micro_batch` is the size of each forward/backward pass; `accum` is the number of passes per optimizer step
    (grad_accum x ceil(batch_size / micro_batch)): halving the micro-batch doubles it (for an odd micro-batch the
    half is rounded up and the batch's last chunk is smaller), and the effective batch (batch_size x grad_accum)
    never changes: the same images are split, not dropped.
    """

    def __init__(self, batch_size: int, grad_accum: int = 1, *, enabled: bool = True,
                 say: Callable[[str], Any] | None = None) -> None:
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
        self.batch_size, self.grad_accum, self.enabled, self.say = batch_size, grad_accum, enabled, say
        self.micro_batch = batch_size
        self.backoffs = 0  # halvings so far (this session)

    @property
    def accum(self) -> int:
        return self.grad_accum * math.ceil(self.batch_size / self.micro_batch)

    def run(self, attempt: Callable[[int], Any], reset: Callable[[], Any]) -> Any:
        """`attempt(micro_batch)` -- the step's forward/backward passes from their start -- until it does not run out
        of memory; returns its result. After an out-of-memory error `reset()` (zero the gradients; undo any other
        state the attempt changed), memory is freed and the micro-batch halved (rounded up). An out-of-memory error at
        a micro-batch of 1 is an `OutOfMemory` error (one line)."""
        start = self.micro_batch
        while True:
            error = None
            try:
                result = attempt(self.micro_batch)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if not (self.enabled and is_oom(e)):
                    raise
                error = first_line(e, 200)
            if error is None:
                if self.micro_batch != start:
                    self._announce(start)
                return result
            # Out of the except clause: the failed attempt's frames (and activations) are released by now.
            reset()
            free_memory()
            if self.micro_batch == 1:
                raise OutOfMemory(
                    f"data.batch_size: out of device memory even at a micro-batch of 1 image (batch "
                    f"{self.batch_size} x train.grad_accum {self.grad_accum}); use a smaller data.img_size or model, "
                    f"train.amp or train.grad_checkpointing ({error})")
            self.micro_batch = (self.micro_batch + 1) // 2
            self.backoffs += 1

    def _announce(self, before: int) -> None:
        msg = (f"out of device memory at a micro-batch of {before}: continuing with micro-batches of "
               f"{self.micro_batch}, {self.accum} per optimizer step (effective batch "
               f"{self.batch_size * self.grad_accum} unchanged)")
        log.warning(msg)
        if self.say is not None:
            self.say(msg)

    def state_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "accum": self.accum, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue with a saved micro-batch (`accum` follows from it and this run's `grad_accum`, which a resume may
        change). A state of another batch size or an impossible micro-batch is a ValueError naming the field."""
        if not isinstance(state, dict):
            raise ValueError(f"it is a {type(state).__name__}, not a mapping")
        size, micro = state.get("batch_size"), state.get("micro_batch")
        if size != self.batch_size:
            raise ValueError(f"its batch_size {size!r} is not this run's data.batch_size {self.batch_size}")
        if not (isinstance(micro, int) and not isinstance(micro, bool) and 1 <= micro <= self.batch_size):
            raise ValueError(f"its micro_batch {micro!r} is not a whole number in [1, {self.batch_size}]")
        self.micro_batch = micro


# ---- data.batch_size=auto --------------------------------------------------------------------------------------------
def find_batch_size(try_step: Callable[[int], Any], start: int = AUTO_START, limit: int = AUTO_LIMIT,
                    headroom: float = HEADROOM) -> int:
    """The largest batch b <= `limit` for which `try_step(b)` does not run out of memory, times `headroom` (rounded
    down, at least 1): doubling from `start` until a step fails or `limit` is reached, then a binary search between
    the last batch that fitted and the first that failed. Errors other than out-of-memory pass through; when even a
    batch of 1 fails, `OutOfMemory`."""
    if not (1 <= start and 1 <= limit and 0 < headroom <= 1):
        raise ValueError(f"need start >= 1, limit >= 1, 0 < headroom <= 1; got {start}, {limit}, {headroom}")
    last_error = ""

    def fits(b: int) -> bool:
        nonlocal last_error
        error = None
        try:
            try_step(b)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            error = first_line(e, 200)
        free_memory()  # outside the except clause (see the module docstring)
        log.debug("batch-size search: %d %s", b, "fits" if error is None else "is out of memory")
        if error is not None:
            last_error = error
        return error is None

    lo, hi = 0, None  # largest batch known to fit, smallest known not to (None: none yet)
    b = min(start, limit)
    while hi is None:
        if fits(b):
            lo = b
            if b >= limit:
                break
            b = min(2 * b, limit)
        else:
            hi = b
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        raise OutOfMemory(f"data.batch_size=auto: not even one image fits in device memory; use a smaller "
                          f"data.img_size or model, train.amp or train.grad_checkpointing ({last_error})")
    return max(1, int(lo * headroom))


def trial_step(model: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], sample_shape: Sequence[int],
               num_classes: int, device: torch.device, *, loss_fn: Callable | None = None,
               autocast: Callable[[], Any] = contextlib.nullcontext, channels_last: bool = False
               ) -> Callable[[int], None]:
    """A `try_step(b)` for `find_batch_size`: random images (b, *sample_shape) and labels through `model` in training
    mode, `loss_fn(outputs, labels, images)` (default cross-entropy, averaged over the heads of a tuple output),
    backward, and one step of a fresh `make_optimizer()` (its state -- Adam's two moments, SGD's momentum -- is
    memory the run will hold). The weights and the random generators change; `preserved(model)` undoes that."""

    def step(b: int) -> None:
        x = torch.randn((b, *sample_shape), device=device)  # drawn on the device: no host copy of a large batch
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (b,), device=device)
        optimizer = make_optimizer()
        try:
            model.train()
            with autocast():
                out = model(x)
                loss = loss_fn(out, y, x) if loss_fn is not None else _mean_ce(out, y)
            loss.backward()
            del out, loss
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            del optimizer
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous failure belongs to this trial

    return step


def _mean_ce(out, y: torch.Tensor) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(F.cross_entropy(o.float(), y) for o in outs) / len(outs)


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Restore `model`'s parameters and buffers (copied to the CPU, so the copy takes no device memory), its
    training flag, and the torch random generators (CPU and CUDA) when the block ends."""
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict(keep_vars=True).items()}
    training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(saved[k])
        model.train(training)
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def auto_batch_size(model: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer],
                    sample_shape: Sequence[int], num_classes: int, device: torch.device, *, limit: int,
                    loss_fn: Callable | None = None, autocast: Callable[[], Any] = contextlib.nullcontext,
                    channels_last: bool = False, start: int = AUTO_START, headroom: float = HEADROOM,
                    say: Callable[[str], Any] | None = None) -> int:
    """The batch for `data.batch_size=auto` (see the module docstring): on CUDA the largest that fits in a trial
    training step, times `headroom`, at most `limit` (e.g. the training images per process) and `AUTO_LIMIT`; on
    CPU or MPS `CPU_BATCH_SIZE` (at most `limit`) without a search. Under DDP every rank searches and all take the
    smallest result. Logs (and `say`s) one line saying what it chose and why."""
    limit = max(1, min(limit, AUTO_LIMIT))
    if device.type != "cuda":
        b = min(CPU_BATCH_SIZE, limit)
        msg = f"data.batch_size=auto: no memory search on {device.type}; using {b}"
    else:
        with preserved(model):
            fitted = find_batch_size(trial_step(model, make_optimizer, sample_shape, num_classes, device,
                                                loss_fn=loss_fn, autocast=autocast, channels_last=channels_last),
                                     start=min(start, limit), limit=limit, headroom=1.0)
        free_memory()
        b = max(1, int(fitted * headroom))
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([b], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            b = int(t.item())
        cap = " (the limit)" if fitted >= limit else ""
        msg = (f"data.batch_size=auto: {fitted} images fit{cap} in a trial step on {device}; "
               f"using {b} ({headroom:g} of it)")
    log.info(msg)
    if say is not None:
        say(msg)
    return b
