"""A small load generator for the service: closed-loop concurrency (N clients, each sending its
next request when the last answer arrives) and open-loop Poisson arrivals, over keep-alive HTTP/1.1
connections. Records per-request latency, status and the server's reported compute level.

The client is a minimal HTTP/1.1 client on asyncio streams (RawClient), not httpx: the load
generator shares the 2 cores with the server, so it must cost far less CPU than the server. With
httpx, 64 closed-loop clients used a full core at ~140 req/s and its own queueing showed up as
server latency (p99 2 s) and as "batching is slower than none"; this client used ~0.03 core at
500 req/s on the same test."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Result:
    latency_s: float
    status: int
    level: str | None = None
    late: bool = False  # answered after its deadline
    retry_after: str | None = None  # the Retry-After header of a refusal (429/503)
    error: str | None = None  # the exception's class name when no response came (status 0)
    started_s: float = 0.0  # perf_counter when the request was sent


@dataclass
class RunStats:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        ok = [r for r in self.results if r.status == 200]
        lat = sorted(1000 * r.latency_s for r in ok)
        statuses = Counter(r.status for r in self.results)
        with_deadline_misses = sum(1 for r in self.results if r.late or r.status in (503, 504))
        return {
            "requests": len(self.results),
            "ok": len(ok),
            "seconds": round(self.seconds, 3),
            "throughput_rps": round(len(ok) / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": round(percentile(lat, 50), 3) if lat else None,
            "p95_ms": round(percentile(lat, 95), 3) if lat else None,
            "p99_ms": round(percentile(lat, 99), 3) if lat else None,
            "mean_ms": round(statistics.fmean(lat), 3) if lat else None,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "connection_errors": dict(Counter(r.error for r in self.results if r.error)),  # status 0, by exception
            "levels": dict(Counter(r.level for r in ok if r.level)),
            "deadline_misses": with_deadline_misses,
            "deadline_miss_rate": round(with_deadline_misses / len(self.results), 4) if self.results else 0.0,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list (numpy's default method)."""
    return float(np.percentile(np.asarray(sorted_values, dtype=np.float64), q))


RequestFactory = Callable[[int], tuple[str, dict, float | None]]  # i -> (path, json body, deadline_ms)


class ProtocolError(Exception):
    """A response this client cannot read (no Content-Length, a malformed head)."""


def http_request(host: str, port: int, path: str, body: dict, close: bool = False) -> bytes:
    """The bytes of a JSON POST (HTTP/1.1; `close` asks the server to close after answering)."""
    data = json.dumps(body).encode()
    fields = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json", f"Content-Length: {len(data)}"]
    if close:
        fields.append("Connection: close")
    return ("\r\n".join(fields) + "\r\n\r\n").encode() + data


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and lower-cased headers of a response head; ValueError when it is not one."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except IndexError as e:
        raise ValueError(f"not an HTTP status line: {lines[0][:80]!r}") from e
    return status, {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}


class RawClient:
    """HTTP/1.1 keep-alive POSTs of JSON over a pool of asyncio stream connections: an idle
    connection is reused, else a new one opened (closed-loop clients keep one each). Responses
    are read by Content-Length, which the service always sends."""

    def __init__(self, base_url: str, timeout_s: float = 60.0):
        url = urlsplit(base_url)
        self.host, self.port, self.timeout_s = url.hostname or "127.0.0.1", url.port or 80, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()

    async def post(self, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
        request = http_request(self.host, self.port, path, body)
        async with asyncio.timeout(self.timeout_s):
            reused = bool(self._idle)
            try:
                return await self._exchange(request)
            except (asyncio.IncompleteReadError, ConnectionResetError):
                if not reused:
                    raise
                # the server closed an idle keep-alive connection (its keep-alive timeout) before
                # reading this request: nothing was processed, send it once more on a new one
                self._idle.clear()
                return await self._exchange(request)

    async def _exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(request)
            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if "content-length" not in headers:
                raise ProtocolError(f"no Content-Length in a {status} response")
            content = await reader.readexactly(int(headers["content-length"]))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, headers, content


async def _one(client: RawClient, path: str, body: dict, deadline_ms: float | None) -> Result:
    t0 = time.perf_counter()
    try:
        status, headers, content = await client.post(path, body)
    except (OSError, TimeoutError, ValueError, ProtocolError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        return Result(time.perf_counter() - t0, 0, error=type(e).__name__, started_s=t0)
    dt = time.perf_counter() - t0
    level = None
    if status == 200:
        data = json.loads(content)
        level = (data.get("compute") or {}).get("level") if isinstance(data, dict) else None
    late = deadline_ms is not None and status == 200 and 1000 * dt > deadline_ms
    return Result(dt, status, level, late=late, retry_after=headers.get("retry-after"), started_s=t0)


async def closed_loop(
    base_url: str,
    make: RequestFactory,
    concurrency: int,
    requests: int | None = None,
    warmup: int = 0,
    seconds: float | None = None,
    timeout_s: float = 60.0,
) -> RunStats:
    """`concurrency` clients share `requests` requests (or send until `seconds` have passed); each
    waits for its answer before the next (at most `timeout_s`: a request past it counts as failed)."""
    async with RawClient(base_url, timeout_s) as client:
        for i in range(warmup):
            path, body, dl = make(i)
            await _one(client, path, body, dl)
        stats = RunStats()
        counter = iter(range(requests if requests is not None else 10**12))
        stop_at = None if seconds is None else time.perf_counter() + seconds

        async def worker():
            for i in counter:
                if stop_at is not None and time.perf_counter() >= stop_at:
                    return
                path, body, dl = make(i)
                stats.results.append(await _one(client, path, body, dl))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        stats.seconds = time.perf_counter() - t0
    return stats


async def open_loop(base_url: str, make: RequestFactory, rate_rps: float, duration_s: float, seed: int = 0) -> RunStats:
    """Poisson arrivals at `rate_rps` for `duration_s`, regardless of how fast answers come."""
    rng = random.Random(seed)
    async with RawClient(base_url) as client:  # as many connections as requests outstanding
        stats = RunStats()
        tasks = []
        t0 = time.perf_counter()
        next_at, i = t0, 0
        while next_at - t0 < duration_s:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            path, body, dl = make(i)
            tasks.append(asyncio.create_task(_one(client, path, body, dl)))
            i += 1
            next_at += rng.expovariate(rate_rps)
        stats.results = list(await asyncio.gather(*tasks))
        stats.seconds = time.perf_counter() - t0
    return stats
