"""`serve --workers N`: one SO_REUSEPORT socket per worker (the kernel spreads connections over them),
a second server refused from a port the group holds, the supervisor keeping worker i on socket i
through restarts, a worker above its share of the connections handing some back; the sessions'
threads shared among every worker's batches."""

from __future__ import annotations

import errno
import os
import select
import socket

import pytest

from service import workers as W
from service.settings import Settings
from service.worker_balance import BalancedHttpProtocol, WorkerLoads


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
    for name in (W.LOADS_ENV, W.SLOT_ENV):  # the supervisor sets them for each spawn: restored afterwards
        monkeypatch.setenv(name, "")
    socks = [object(), object(), object()]
    sup = W.PerSocketWorkers(uvicorn.Config("service.app:create_app", workers=3), socks)
    sup.init_processes()
    yield sup, socks
    sup.loads.close()
    sup.loads_path.unlink()


def test_worker_i_gets_socket_i_and_keeps_it_through_restarts(supervisor):
    sup, socks = supervisor
    assert [p.sockets for p in sup.processes] == [[s] for s in socks]
    assert os.environ[W.LOADS_ENV] == str(sup.loads_path) and os.environ[W.SLOT_ENV] == "2"  # as the last spawn saw it
    sup.loads.set(7)  # slot 0's count, then worker 0 dies: its replacement starts from zero
    sup.processes[0].alive = False
    sup.keep_subprocess_alive()
    assert sup.loads._loads[0] == 0 and os.environ[W.SLOT_ENV] == "0"
    sup.processes[1].alive = False  # worker 1 dies
    sup.keep_subprocess_alive()
    assert sup.processes[1].pid == 4 and sup.processes[1].sockets == [socks[1]]
    assert [p.pid for p in sup.processes] == [3, 4, 2]
    sup.restart_all()  # SIGHUP: each replaced in turn, on its predecessor's socket
    assert [p.pid for p in sup.processes] == [5, 6, 7]
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


# ---------------------------------------------------------------- handing connections back


def test_worker_loads_say_who_holds_more_than_its_share(tmp_path):
    path = W.WorkerLoads.create(2)
    try:
        a, b = WorkerLoads(path, 0), WorkerLoads(path, 1)
        a.set(40), b.set(24)
        assert a.above_share() and not b.above_share()
        a.set(33), b.set(31)  # within one of the mean: nobody moves
        assert not a.above_share() and not b.above_share()
        a.set(2), b.set(0)  # hardly any load: not worth a reconnect
        assert not a.above_share()
        a.clear(1)
        a.set(40)
        assert a.above_share()
        with pytest.raises(ValueError, match="slot 2 outside the 2 slots"):
            WorkerLoads(path, 2)
        a.close(), b.close()
    finally:
        path.unlink()


def test_a_worker_above_its_share_closes_connections_until_it_is_not(monkeypatch):
    """A real uvicorn server with the balancing protocol, as worker 0 of 2 whose sibling holds nothing:
    of 6 keep-alive connections it hands back 3 (`Connection: close`), one a request (6, 5, 4 held: each
    above the mean plus one), and keeps 3, where the two workers hold fewer than 2 each on average."""
    import threading
    import time

    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    path = W.WorkerLoads.create(2)
    loads = WorkerLoads(path, 0)
    monkeypatch.setattr(BalancedHttpProtocol, "loads", loads)
    monkeypatch.setattr(BalancedHttpProtocol, "handing_back", 0)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=BalancedHttpProtocol, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    clients = []
    try:
        while not server.started:
            time.sleep(0.01)
        port = sock.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        time.sleep(0.2)  # all six accepted and counted
        closed = []
        for c in clients:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = c.recv(4096).lower()
            assert head.startswith(b"http/1.1 200")
            closed.append(b"connection: close" in head)
        assert closed == [True] * 3 + [False] * 3, closed
        time.sleep(0.2)
        assert loads._loads[0] == 3  # what the siblings see: the three it kept
    finally:
        server.should_exit = True
        thread.join(10)
        for c in clients:
            c.close()
        loads.close()
        path.unlink()
