"""`trimvlm serve --workers N`: N server processes, each accepting on its own listening socket.

The sockets share one port through SO_REUSEPORT, so the kernel spreads new connections over the
workers by a hash of their addresses. With one socket shared by every worker, whichever worker sat idle
in epoll accepted a whole burst of keep-alive connections and kept them: 32 clients served at 338 req/s
against 577 with a socket each (README, "Server layout").
"""

from __future__ import annotations

import os
import socket

from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process, logger

from service.worker_balance import LOADS_ENV, SLOT_ENV, WorkerLoads


def listen_shared(host: str, port: int, backlog: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on one port (SO_REUSEPORT; port 0: a free one, which the rest join).
    Raises OSError(EADDRINUSE) when the port is taken, including by another server's SO_REUSEPORT
    sockets, which a plain bind cannot join: without that check a second server started on the same
    port would silently take a share of the connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        socket.create_server((host, port), family=family).close()  # fails if anyone listens there
    first = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=True)
    port = first.getsockname()[1]
    rest = [socket.create_server((host, port), family=family, backlog=backlog, reuse_port=True) for _ in range(count - 1)]
    return [first, *rest]


class PerSocketWorkers(Multiprocess):
    """uvicorn's supervisor (health checks, restarts, signals, SIGHUP reloads) with worker i always on
    socket i: a replacement takes its predecessor's socket, so no socket of the group is left without a
    process accepting on it (its share of new connections would hang)."""

    def __init__(self, config, sockets: list[socket.socket]):
        super().__init__(config, sockets)
        if len(sockets) != self.processes_num:
            raise ValueError(f"{self.processes_num} workers need as many sockets, got {len(sockets)}")
        self.loads_path = WorkerLoads.create(self.processes_num)  # connections per worker (worker_balance.py)
        self.loads = WorkerLoads(self.loads_path, 0)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.loads.close()
            self.loads_path.unlink(missing_ok=True)

    def _spawn(self, slot: int) -> Process:
        self.loads.clear(slot)
        # a spawned worker reads its environment as it is at start()
        os.environ[LOADS_ENV], os.environ[SLOT_ENV] = str(self.loads_path), str(slot)
        process = Process(self.config, [self.sockets[slot]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._spawn(slot) for slot in range(self.processes_num)]

    def restart_all(self) -> None:
        """As uvicorn's: each replacement serves before its predecessor stops (on the same socket)."""
        for slot, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._spawn(slot)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    logger.error(f"New worker [{new.pid}] was not ready in time; keeping [{old.pid}], restart aborted.")
                return
            old.terminate()
            old.join()
            self.processes[slot] = new

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for slot, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or already gone
            process.join()
            if process.exitcode == STARTUP_FAILURE:  # the app cannot start: a restart would fail the same way
                logger.error(f"Worker [{process.pid}] failed to start, stopping the parent process.")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info(f"Worker [{process.pid}] died; starting a replacement on its socket")
            self.processes[slot] = self._spawn(slot)
