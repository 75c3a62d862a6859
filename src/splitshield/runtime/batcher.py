"""Dynamic batching for the tail server, in the manner of Triton's dynamic batcher.

Concurrent requests are queued; one consumer task takes queued requests, oldest first, until
``max_batch`` feature rows are gathered or ``max_delay_ms`` has passed since the oldest one arrived,
concatenates their features (a request may carry several rows), runs the tail *once* on the batch,
splits the logits back and answers each request with its own rows, in order.

* ``max_delay_ms = 0`` never waits on a clock: the consumer first lets every request that is already
  ready (its body received, e.g. several that arrived while the last batch ran) reach the queue -- it
  yields to the event loop until a yield queues nothing more -- then runs what is queued. One request
  alone runs at once; requests that arrive together run together.
* The tail runs on the event loop's thread, one batch at a time, and the loop runs between two batches. In
  a worker thread the tail would have to take the GIL back between every operator while the loop thread
  is busy parsing requests, waiting up to the interpreter's switch interval each time. A tail call is not
  interrupted: a request whose deadline passes while its batch runs is answered when the batch ends. More
  cores: more server processes (``serve --workers``) and the tail's own intra-op threads.
* A batch holds requests of one feature shape and dtype (the server's decode already enforces the tail's
  fixed shape; a different one simply starts the next batch, it is never mixed in).
* An exception from the tail fails exactly the requests of that batch (each gets the exception); a request
  whose waiter was cancelled (its deadline passed) is dropped before it is run, or its answer discarded.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

__all__ = ["DynamicBatcher", "check_batching"]


def check_batching(max_batch: int, max_delay_ms: float) -> None:
    """Raise a one-line :class:`ConfigError` naming ``--max-batch`` or ``--max-delay-ms`` if either is invalid."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"--max-batch: a positive number of feature rows, got {max_batch!r}")
    if (isinstance(max_delay_ms, bool) or not isinstance(max_delay_ms, (int, float))
            or not math.isfinite(max_delay_ms) or not 0 <= max_delay_ms <= 10_000):
        raise ConfigError(f"--max-delay-ms: milliseconds in 0..10000 (0: run what is queued at once), "
                          f"got {max_delay_ms!r}")


@dataclass
class _Pending:
    z: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    arrived: float  # loop.time() when queued
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = int(self.z.shape[0])

    def fits(self, other: _Pending) -> bool:
        return self.z.shape[1:] == other.z.shape[1:] and self.z.dtype == other.z.dtype


class DynamicBatcher:
    """Run ``forward`` on batches of concurrently submitted feature tensors.

    Parameters
    ----------
    forward : callable
        ``[N, *feature] -> [N, K]``, called on the event loop's thread (the server's
        :meth:`TailService.forward`, which runs under ``torch.no_grad``). Looked up at each call, so it may
        be replaced (tests).
    max_batch : int
        Feature rows per batch at most; a single request of more rows than this is run alone.
    max_delay_ms : float
        How long the oldest queued request may wait for others to fill the batch; 0: no waiting on a clock.

    The batcher binds to the event loop of its first :meth:`submit`; a later submit from another loop (a
    new ``asyncio.run``) starts afresh there.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_delay_ms: float = 0.0):
        check_batching(max_batch, max_delay_ms)
        self.forward, self.max_batch, self.max_delay = forward, max_batch, max_delay_ms / 1000
        self.calls = 0  # tail calls made (batches run)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, z: torch.Tensor) -> torch.Tensor:
        """Queue features ``[B, *feature]`` and return their logits ``[B, K]`` once their batch has run."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._consumer.done():
            self._start(loop)
        item = _Pending(z, loop.create_future(), loop.time())
        self._pending.append(item)
        self._queued_rows += item.rows
        self._wakeup.set()
        return await item.future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._consumer = loop.create_task(self._consume(), name="splitshield-batcher")

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch(loop)
            batch = self._take()
            if batch:  # else every queued request had been cancelled
                self._run(batch)
                await asyncio.sleep(0)  # the loop reads, answers and times out between batches run back to back

    async def _wait_for_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Return once a request is queued, the ready ones have joined it, and either ``max_batch`` rows are
        queued or the oldest has waited ``max_delay``."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        while self._queued_rows < self.max_batch:  # gather what is ready: yield while that queues more
            queued = len(self._pending)
            await asyncio.sleep(0)
            if len(self._pending) == queued:
                break
        while self._queued_rows < self.max_batch:
            remaining = self._pending[0].arrived + self.max_delay - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                return

    def _take(self) -> list[_Pending]:
        """Pop the oldest requests that fit one batch (same feature shape, ``max_batch`` rows at most)."""
        batch: list[_Pending] = []
        rows = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # cancelled while queued (its deadline passed): never run it
                self._pending.popleft()
                self._queued_rows -= item.rows
                continue
            if batch and (rows + item.rows > self.max_batch or not item.fits(batch[0])):
                break
            self._pending.popleft()
            self._queued_rows -= item.rows
            batch.append(item)
            rows += item.rows
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        """Run one batch and answer its requests; its failure is theirs alone."""
        try:
            z = batch[0].z if len(batch) == 1 else torch.cat([item.z for item in batch])
            self.calls += 1
            logits = self.forward(z)
            if not isinstance(logits, torch.Tensor) or logits.ndim < 1 or logits.shape[0] != z.shape[0]:
                raise RuntimeError(f"the tail returned {getattr(logits, 'shape', type(logits).__name__)} "
                                   f"for a batch of {z.shape[0]} rows")
            for item, rows in zip(batch, logits.split([item.rows for item in batch]), strict=True):
                if not item.future.done():
                    item.future.set_result(rows)
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
