"""Dynamic batching: one batcher per graph group and compute level (Triton-style
max_batch_size + max_queue_delay), a bounded queue, per-item deadlines, and items dropped when
their client has gone away. Knows nothing of HTTP: its refusals are ServiceErrors (code, status).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from service.adaptive import LatencyModel
from service.errors import ServiceError

log = logging.getLogger("trimvlm.batching")


class QueueFull(ServiceError):
    """The batcher's queue is at its bound (429 `queue_full`); retry after `retry_after_s`."""

    def __init__(self, name: str, depth: int, retry_after_s: float):
        message = f"queue for {name} is full ({depth} items waiting)"
        super().__init__("queue_full", 429, message, {"Retry-After": str(int(retry_after_s))})
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError):
    """The item's deadline passed before its answer was ready (504 `deadline_exceeded`): while it
    waited in the queue (then it was not run), or while its caller waited. `queued_s`: how long it
    waited; `late_s`: how long ago the deadline passed when it was dequeued."""

    def __init__(self, name: str, queued_s: float, late_s: float, message: str | None = None):
        message = message or (
            f"the deadline passed {1000 * late_s:.1f} ms before the item left the {name} queue"
            f" (after {1000 * queued_s:.1f} ms in it)"
        )
        super().__init__("deadline_exceeded", 504, message)
        self.name, self.queued_s, self.late_s = name, queued_s, late_s


class Done(tuple):
    """An item's (result, seconds queued), as callers unpack it, with the batch it ran in: `batch_size`
    items, dispatched at `started` (perf_counter), run in `run_s` seconds (service/tracing.py's spans)."""

    batch_size: int = 1
    started: float = 0.0
    run_s: float = 0.0


@dataclass
class WorkItem:
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # time.perf_counter() seconds


class Batcher:
    """Collects items into batches and runs `run_batch(payloads) -> results` in `executor`.

    A batch leaves when it is full or when its first item has waited `max_delay_s`. Items whose
    future is already done (the client disconnected and the route cancelled it) are dropped
    before running; items past their deadline fail with DeadlineExceeded without running."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Any]], list[Any]],
        executor: Executor,
        latency: LatencyModel,
        max_batch: int = 32,
        max_delay_s: float = 0.002,
        max_queue: int = 512,
        on_batch: Callable[[str, int, float], None] | None = None,
        on_dropped: Callable[[str, int], None] | None = None,
    ):
        self.name, self.run_batch, self.executor, self.latency = name, run_batch, executor, latency
        self.max_batch, self.max_delay_s, self.max_queue = max(1, max_batch), max(0.0, max_delay_s), max_queue
        self.on_batch, self.on_dropped = on_batch, on_dropped
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self.running_batch = 0  # items in the batch being executed (0: idle)
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Finish what is queued (graceful shutdown), then stop."""
        self._closing = True
        deadline = time.perf_counter() + drain_timeout_s
        while (self.depth or self.running_batch) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def retry_after_s(self) -> float:
        per_batch = self.latency.predict(self.name, self.max_batch)
        return max(1.0, math.ceil((self.depth / self.max_batch + 1) * per_batch))

    def submit(self, payload: Any, deadline: float | None = None) -> asyncio.Future:
        """Queue one item; returns the future of its result. Raises QueueFull at the bound."""
        if self._closing:
            raise QueueFull(self.name, self.depth, 1.0)
        if self.depth >= self.max_queue:
            raise QueueFull(self.name, self.depth, self.retry_after_s())
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(WorkItem(payload, fut, deadline=deadline))
        return fut

    def predicted_wait_s(self, extra: int = 1) -> float:
        """Predicted time until `extra` newly queued items are done: the running batch's rest,
        then the queue ahead in full batches, then theirs (fitted a*n+b per batcher)."""
        ahead = self.depth + extra
        full, rest = divmod(ahead, self.max_batch)
        t = full * self.latency.predict(self.name, self.max_batch)
        t += self.latency.predict(self.name, rest) if rest else 0.0
        if self.running_batch:
            t += 0.5 * self.latency.predict(self.name, self.running_batch)
        return t + (self.max_delay_s if self.depth + extra < self.max_batch else 0.0)

    async def _collect(self) -> list[WorkItem]:
        first = await self.queue.get()
        batch = [first]
        close_at = first.enqueued + self.max_delay_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            wait = close_at - time.perf_counter()
            if wait <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), wait))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            now = time.perf_counter()
            live = []
            for item in batch:
                if item.future.done():  # cancelled: the client went away
                    continue
                if item.deadline is not None and now > item.deadline:
                    item.future.set_exception(DeadlineExceeded(self.name, now - item.enqueued, now - item.deadline))
                    continue
                live.append(item)
            if len(live) < len(batch) and self.on_dropped:
                self.on_dropped(self.name, len(batch) - len(live))
            if not live:
                continue
            self.running_batch = len(live)
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [it.payload for it in live])
            except Exception as e:  # a backend failure fails this batch, not the server
                log.exception("batch on %s failed", self.name)
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            finally:
                self.running_batch = 0
            seconds = time.perf_counter() - t0
            self.latency.observe(self.name, len(live), seconds)
            if self.on_batch:
                self.on_batch(self.name, len(live), seconds)
            for it, res in zip(live, results, strict=True):
                if not it.future.done():
                    done = Done((res, t0 - it.enqueued))
                    done.batch_size, done.started, done.run_s = len(live), t0, seconds
                    it.future.set_result(done)
