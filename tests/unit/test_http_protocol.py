"""service/http_protocol.py: a response's writes leave as one, in order; close() sends what is pending
first; and uvicorn serves keep-alive requests through the protocol."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from service.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport


class FakeTransport:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


def test_writes_in_one_iteration_leave_together_in_order():
    async def main():
        t = FakeTransport()
        c = CoalescingTransport(t, asyncio.get_running_loop())
        c.write(b"HTTP/1.1 200 OK\r\n\r\n")
        c.write(b"body")
        assert t.writes == []  # nothing sent yet: the end of this iteration sends
        await asyncio.sleep(0)
        assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        c.write(b"next")
        await asyncio.sleep(0)
        assert t.writes[-1] == b"next"
        assert c.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the transport's

    asyncio.run(main())


def test_close_sends_pending_first():
    async def main():
        t = FakeTransport()
        c = CoalescingTransport(t, asyncio.get_running_loop())
        c.write(b"last words")
        c.close()
        assert t.writes == [b"last words"] and t.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        assert t.writes == [b"last words"]

    asyncio.run(main())


async def _app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await receive()
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def test_uvicorn_serves_through_the_protocol():
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app, http=CoalescingHttpToolsProtocol, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port)) as c:
            for _ in range(2):  # keep-alive: the second response too
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(b"}"):
                    data += c.recv(65536)
                assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b'\r\n\r\n{"ok":true}')
    finally:
        server.should_exit = True
        thread.join(10)
