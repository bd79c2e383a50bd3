"""uvicorn's httptools protocol, with each response's writes coalesced into one send().

uvicorn writes a response's status line and headers, then its body, as two transport writes, and
uvloop sends each at once: two send() system calls a response, and on loopback or a virtual NIC
the first one also runs the receiver's side of TCP on our core. Profiled under load, that first
write was ~12% of the event loop's time per /vqa request (README, "Server layout"). Here writes
made in one event-loop iteration (Starlette sends the start and the body back to back) are joined
and sent once, at the end of that iteration; close() sends what is pending first, so nothing is
reordered or lost. Streaming responses still go out chunk by chunk, each a loop iteration later
at most.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose write() is deferred to the end of the loop iteration and joined with the
    writes made before then; everything else is the wrapped transport's."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol writing through a CoalescingTransport (uvicorn.Config(http=...))."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
