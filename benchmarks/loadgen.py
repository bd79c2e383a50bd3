"""A small load generator for the service: closed-loop concurrency (N clients, each sending its
next request when the last answer arrives) and open-loop Poisson arrivals, over one keep-alive
HTTP connection pool (httpx, asyncio). Records per-request latency, status and the server's
reported compute level."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
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


async def _one(client: httpx.AsyncClient, path: str, body: dict, deadline_ms: float | None) -> Result:
    t0 = time.perf_counter()
    try:
        r = await client.post(path, json=body)
    except httpx.HTTPError as e:
        return Result(time.perf_counter() - t0, 0, error=type(e).__name__, started_s=t0)
    dt = time.perf_counter() - t0
    level = None
    if r.status_code == 200:
        data = r.json()
        level = (data.get("compute") or {}).get("level")
    late = deadline_ms is not None and r.status_code == 200 and 1000 * dt > deadline_ms
    return Result(dt, r.status_code, level, late=late, retry_after=r.headers.get("retry-after"), started_s=t0)


async def closed_loop(base_url: str, make: RequestFactory, concurrency: int, requests: int, warmup: int = 0) -> RunStats:
    """`concurrency` clients share `requests` requests; each waits for its answer before the next."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60.0) as client:
        for i in range(warmup):
            path, body, dl = make(i)
            await _one(client, path, body, dl)
        stats = RunStats()
        counter = iter(range(requests))

        async def worker():
            for i in counter:
                path, body, dl = make(i)
                stats.results.append(await _one(client, path, body, dl))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        stats.seconds = time.perf_counter() - t0
    return stats


async def open_loop(base_url: str, make: RequestFactory, rate_rps: float, duration_s: float, seed: int = 0) -> RunStats:
    """Poisson arrivals at `rate_rps` for `duration_s`, regardless of how fast answers come."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=httpx.Limits(max_connections=256)) as client:
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
