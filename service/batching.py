"""Dynamic batching: one batcher per graph group and compute level (Triton-style
max_batch_size + max_queue_delay), a bounded queue, per-item deadlines, and items dropped when
their client has gone away. Knows nothing of HTTP: its refusals are ServiceErrors (code, status).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
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
    before running; items past their deadline fail with DeadlineExceeded without running.
    `concurrency` batches may run at once (each in its own executor thread): with single-threaded
    runtime sessions, two batches in flight keep both cores busy without the intra-op barrier
    stalls a 2-thread session suffers whenever the event loop takes one of its cores.

    The queue is a deque and the collector sleeps on one future a batch (woken only when the first
    item arrives or the batch fills, or by a timer at the delay's end): an asyncio.Queue with
    wait_for cost a task and a timer per item, on the event loop the HTTP layer also needs."""

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
        concurrency: int = 1,
    ):
        self.name, self.run_batch, self.executor, self.latency = name, run_batch, executor, latency
        self.max_batch, self.max_delay_s, self.max_queue = max(1, max_batch), max(0.0, max_delay_s), max_queue
        self.on_batch, self.on_dropped = on_batch, on_dropped
        self.concurrency = max(1, concurrency)
        self._items: deque[WorkItem] = deque()
        self._wakeup: asyncio.Future | None = None  # the collector's sleep, while it waits for items
        self._wake_at = 0  # queue length that wakes it: 1 (waiting for a first item) or max_batch (filling)
        self.running_batch = 0  # items in the batches being executed (0: idle)
        self.batches_running = 0
        self._running: set[asyncio.Task] = set()
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return len(self._items)

    def start(self) -> None:
        if self._task is None:
            self._slots = asyncio.Semaphore(self.concurrency)
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
        self._items.append(WorkItem(payload, fut, deadline=deadline))
        if self._wakeup is not None and len(self._items) >= self._wake_at and not self._wakeup.done():
            self._wakeup.set_result(None)
        return fut

    def predicted_wait_s(self, extra: int = 1) -> float:
        """Predicted time until `extra` newly queued items are done: the running batches' rest
        (when they hold every slot), then the queue ahead in full batches, `concurrency` at a time,
        then theirs (fitted a*n+b per batcher)."""
        ahead = self.depth + extra
        full, rest = divmod(ahead, self.max_batch)
        waves, leftover = divmod(full, self.concurrency)
        t = waves * self.latency.predict(self.name, self.max_batch)
        if leftover:  # a last wave of full batches: the rest runs beside them (leftover < concurrency)
            t += self.latency.predict(self.name, self.max_batch)
        elif rest:
            t += self.latency.predict(self.name, rest)
        if self.batches_running >= self.concurrency:
            t += 0.5 * self.latency.predict(self.name, self.running_batch // self.batches_running)
        return t + (self.max_delay_s if self.depth + extra < self.max_batch else 0.0)

    async def _sleep(self, wake_at: int, timeout: float | None) -> None:
        """Until the queue holds `wake_at` items, or `timeout` seconds pass."""
        loop = asyncio.get_running_loop()
        self._wakeup, self._wake_at = loop.create_future(), wake_at
        timer = None if timeout is None else loop.call_later(timeout, _resolve, self._wakeup)
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    async def _collect(self) -> list[WorkItem]:
        while not self._items:
            await self._sleep(1, None)
        close_at = self._items[0].enqueued + self.max_delay_s
        while len(self._items) < self.max_batch:
            wait = close_at - time.perf_counter()
            if wait <= 0:
                break
            await self._sleep(self.max_batch, wait)
            if not self._items:  # nothing to do: cannot happen (items leave only here), but never run empty
                return []
        n = min(self.max_batch, len(self._items))
        return [self._items.popleft() for _ in range(n)]

    async def _loop(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
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
                self._slots.release()
                continue
            self.running_batch += len(live)
            self.batches_running += 1
            if self.concurrency == 1:  # one at a time: no task to create
                await self._execute(live)
            else:
                task = asyncio.get_running_loop().create_task(self._execute(live))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _execute(self, live: list[WorkItem]) -> None:
        """Run one batch in the executor and hand each item its result (releases its slot)."""
        assert self._slots is not None
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, [it.payload for it in live])
        except Exception as e:  # a backend failure fails this batch, not the server
            log.exception("batch on %s failed", self.name)
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        finally:
            self.running_batch -= len(live)
            self.batches_running -= 1
            self._slots.release()
        seconds = time.perf_counter() - t0
        self.latency.observe(self.name, len(live), seconds)
        if self.on_batch:
            self.on_batch(self.name, len(live), seconds)
        for it, res in zip(live, results, strict=True):
            if not it.future.done():
                done = Done((res, t0 - it.enqueued))
                done.batch_size, done.started, done.run_s = len(live), t0, seconds
                it.future.set_result(done)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
