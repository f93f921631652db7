"""Dynamic batching: concurrent requests share one forward pass.

Requests queue their prepared images; one task takes queued requests in arrival order (whole requests, up to
`max_batch` images; a request bigger than that runs alone, split by the predictor) and runs the forward pass in a
dedicated thread, so the event loop keeps reading and decoding the next requests meanwhile. Requests that arrive
during a forward pass form the next batch.

A batch that is not full is held open for at most `max_wait_ms` after its first request arrived, and only while
other requests are already being received or decoded (`expect`/`arrived`): a lone request never waits, so batching
adds no latency at low load. `max_batch=1` turns batching off (one request per forward pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Request:
    items: list
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Gather requests into batches for `run(items) -> (N, K) array`.

    Args:
        run: the forward pass over a list of prepared items (called in one worker thread, never concurrently).
        max_batch: most images per batch (>= 1).
        max_wait_ms: longest time a non-full batch waits for requests already on their way.
        on_batch: called with (images, seconds) after every forward pass (metrics).
    """

    def __init__(self, run: Callable[[list], np.ndarray], *, max_batch: int = 32, max_wait_ms: float = 10.0,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.pending: deque[_Request] = deque()
        self.incoming = 0  # requests being received/decoded that will submit
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vitforge-forward")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish the queued requests, then stop the task and the worker thread."""
        while self.pending:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._task = self._pool = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def expect(self) -> None:
        """A request has started to arrive (its images will be submitted or it will `arrived`)."""
        self.incoming += 1

    def arrived(self) -> None:
        """A request announced with `expect` submitted its images or failed."""
        self.incoming -= 1
        if self._wake is not None:
            self._wake.set()

    async def submit(self, items: list) -> np.ndarray:
        """Queue prepared images; returns their rows of the batch's output."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        req = _Request(items, asyncio.get_running_loop().create_future())
        self.pending.append(req)
        self._wake.set()
        return await req.future

    def _take(self) -> list[_Request]:
        batch = [self.pending.popleft()]
        n = len(batch[0].items)
        while self.pending and n + len(self.pending[0].items) <= self.max_batch:
            n += len(self.pending[0].items)
            batch.append(self.pending.popleft())
        return batch

    def _queued_images(self) -> int:
        return sum(len(r.items) for r in self.pending)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            left = self.pending[0].arrived + self.max_wait - time.perf_counter()
            if self.incoming > 0 and left > 0 and self._queued_images() < self.max_batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
                continue
            batch = self._take()
            items = [it for r in batch for it in r.items]
            t0 = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._pool, self.run, items)
            except Exception as e:  # the forward pass failed: every request of the batch gets the error
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(items), time.perf_counter() - t0)
            row = 0
            for r in batch:
                if not r.future.done():  # a client that went away cancelled its future
                    r.future.set_result(out[row:row + len(r.items)])
                row += len(r.items)
