"""`serve --workers N`: one SO_REUSEPORT socket per worker (the kernel spreads connections over them),
a second server refused from a port the group holds, and the supervisor keeping worker i on socket i
through restarts; the sessions' threads shared among every worker's batches."""

from __future__ import annotations

import errno
import select
import socket

import pytest

from service import workers as W
from service.settings import Settings


def _listening_port(socks) -> int:
    ports = {s.getsockname()[1] for s in socks}
    assert len(ports) == 1, ports
    return ports.pop()


def test_shared_sockets_split_the_connections():
    socks = W.listen_shared("127.0.0.1", 0, 128, 2)
    clients = []
    try:
        port = _listening_port(socks)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
        accepted = []
        for s in socks:
            n = 0
            while select.select([s], [], [], 0.2)[0]:
                conn, _ = s.accept()
                conn.close()
                n += 1
            accepted.append(n)
        # by a hash of the client's address: all 64 on one socket has a chance of 2**-63
        assert sum(accepted) == 64 and min(accepted) > 0, accepted
    finally:
        for c in clients + socks:
            c.close()


@pytest.mark.parametrize("holder", ["plain", "shared"])
def test_a_port_held_by_anyone_is_refused(holder):
    if holder == "plain":
        held = [socket.create_server(("127.0.0.1", 0))]
    else:
        held = W.listen_shared("127.0.0.1", 0, 128, 2)
    try:
        with pytest.raises(OSError) as e:
            W.listen_shared("127.0.0.1", _listening_port(held), 128, 2)
        assert e.value.errno == errno.EADDRINUSE
    finally:
        for s in held:
            s.close()


class FakeProcess:
    """Stands in for uvicorn's worker process: records its socket; `alive` and `exitcode` are set by the test."""

    made: list[FakeProcess] = []

    def __init__(self, config, sockets):
        self.sockets, self.alive, self.exitcode, self.pid = sockets, True, None, len(FakeProcess.made)
        FakeProcess.made.append(self)

    def start(self):
        pass

    def is_alive(self, timeout=5):
        return self.alive

    def kill(self):
        self.alive = False

    def join(self):
        pass

    def terminate(self):
        self.alive = False

    def wait_until_ready(self, timeout, should_exit=None):
        return True


@pytest.fixture
def supervisor(monkeypatch):
    import uvicorn

    monkeypatch.setattr(W, "Process", FakeProcess)
    FakeProcess.made = []
    socks = [object(), object(), object()]
    sup = W.PerSocketWorkers(uvicorn.Config("service.app:create_app", workers=3), socks)
    sup.init_processes()
    return sup, socks


def test_worker_i_gets_socket_i_and_keeps_it_through_restarts(supervisor):
    sup, socks = supervisor
    assert [p.sockets for p in sup.processes] == [[s] for s in socks]
    sup.processes[1].alive = False  # worker 1 dies
    sup.keep_subprocess_alive()
    assert sup.processes[1].pid == 3 and sup.processes[1].sockets == [socks[1]]
    assert [p.pid for p in sup.processes] == [0, 3, 2]
    sup.restart_all()  # SIGHUP: each replaced in turn, on its predecessor's socket
    assert [p.pid for p in sup.processes] == [4, 5, 6]
    assert [p.sockets for p in sup.processes] == [[s] for s in socks]
    assert not sup.should_exit.is_set()


def test_a_worker_that_cannot_start_stops_the_supervisor(supervisor):
    from uvicorn.config import STARTUP_FAILURE

    sup, _ = supervisor
    sup.processes[0].alive, sup.processes[0].exitcode = False, STARTUP_FAILURE
    sup.keep_subprocess_alive()
    assert sup.should_exit.is_set() and len(FakeProcess.made) == 3  # not restarted


def test_the_supervisor_needs_a_socket_per_worker():
    import uvicorn

    with pytest.raises(ValueError, match="3 workers need as many sockets"):
        W.PerSocketWorkers(uvicorn.Config("service.app:create_app", workers=3), [object()])


@pytest.mark.parametrize(
    "workers, concurrency, intra_op, expected",
    [(1, 1, 0, 0), (1, 2, 0, 4), (1, 0, 0, 4), (2, 2, 0, 2), (2, 1, 0, 4), (2, 0, 0, 4), (4, 0, 0, 2), (16, 2, 0, 1)]
    + [(2, 2, 3, 3)],
)
def test_sessions_share_the_cores_among_every_workers_batches(monkeypatch, workers, concurrency, intra_op, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    s = Settings(workers=workers, batch_concurrency=concurrency, intra_op_threads=intra_op)
    assert s.session_threads() == expected


@pytest.mark.parametrize("workers, concurrency, expected", [(1, 0, 2), (2, 0, 1), (8, 0, 1), (2, 3, 3), (1, 1, 1)])
def test_batches_at_once_follow_the_worker_count_unless_set(workers, concurrency, expected):
    assert Settings(workers=workers, batch_concurrency=concurrency).batches_at_once() == expected
