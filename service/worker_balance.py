"""Connections per worker of `serve --workers N`, shared through a small memory-mapped file, so that a
worker holding more than its share of the clients hands some back.

The kernel spreads new connections over the workers' sockets by a hash, not by load, and keep-alive
clients stay where they landed: 64 closed-loop clients split 24/40 as often as 32/32, and the worker
with 40 answers each of them later (p99 171 against 116 ms, README "Server layout"). A worker with
more open connections than the mean plus one answers its next request with `Connection: close`; the
client reconnects and lands anew by the hash, so the split drifts back to even. Each worker writes
only its own slot (its connections less those it is already handing back); sums are read unlocked.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

LOADS_ENV, SLOT_ENV = "TRIMVLM_WORKER_LOADS", "TRIMVLM_WORKER_SLOT"


class WorkerLoads:
    def __init__(self, path: str | Path, slot: int):
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self._loads = memoryview(self._map).cast("q")
        if not 0 <= slot < len(self._loads):
            raise ValueError(f"worker slot {slot} outside the {len(self._loads)} slots of {path}")
        self.slot, self.workers = slot, len(self._loads)

    @staticmethod
    def create(workers: int) -> Path:
        """The shared file for `workers` workers (all zero), made by the supervisor before they start."""
        fd, path = tempfile.mkstemp(prefix="trimvlm-worker-loads-")
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(8 * workers))
        return Path(path)

    @classmethod
    def from_env(cls) -> WorkerLoads | None:
        """This worker's view when the supervisor started it with a shared file; None in a single process."""
        path = os.environ.get(LOADS_ENV)
        return cls(path, int(os.environ.get(SLOT_ENV, "0"))) if path else None

    def set(self, connections: int) -> None:
        self._loads[self.slot] = connections

    def clear(self, slot: int) -> None:
        """Zero a slot (the supervisor, before a replacement worker takes it: a dead worker's count is stale)."""
        self._loads[slot] = 0

    def above_share(self) -> bool:
        """Whether this worker holds more than the mean plus one connection, under some load."""
        total = sum(self._loads)
        return total >= 2 * self.workers and self._loads[self.slot] > total / self.workers + 1

    def close(self) -> None:
        self._loads.release()
        self._map.close()


class BalancedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, keeping this worker's slot of the shared file up to date and
    closing a connection after its response while the worker holds more than its share."""

    loads: WorkerLoads | None = None  # this worker's slot (set below, at import)
    handing_back = 0  # connections of this worker marked to close, not closed yet

    _handed_back = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._publish()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self._handed_back:
            BalancedHttpProtocol.handing_back -= 1
        self._publish()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.loads is not None and not self._handed_back and self.loads.above_share():
            self.cycle.keep_alive = False  # the response says `Connection: close`, then uvicorn closes it
            self._handed_back = True
            BalancedHttpProtocol.handing_back += 1
            self._publish()

    def _publish(self) -> None:
        if self.loads is not None:
            self.loads.set(len(self.connections) - BalancedHttpProtocol.handing_back)


# A worker process imports this module as it unpickles its uvicorn config (http=BalancedHttpProtocol),
# with the supervisor's variables already in its environment; elsewhere there is no file and no balancing.
BalancedHttpProtocol.loads = WorkerLoads.from_env()
