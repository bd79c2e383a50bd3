"""Open-loop arrivals from h2load (nghttp2's load generator, C on libev; Debian `nghttp2-client`).

On a shared 2-core machine the load generator's own CPU is taken from the server it measures:
the project's Python client (uvloop, prepared bytes) spends about 0.2 cores offering 4x overload
here, h2load about 0.04. h2load's rate mode opens `rate` connections every `period`, each client
sending one request on its own connection, so arrivals are evenly spaced bursts rather than Poisson.
Its per-request log gives status and latency; it does not keep response headers, so Retry-After is
checked on the requests the Python client sends beside it (benchmarks/overload.py).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.loadgen import Result

SUMMARY = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)


def available() -> bool:
    return shutil.which("h2load") is not None


def rate_schedule(rate_rps: float, min_period_ms: int = 5) -> tuple[int, int]:
    """(connections per period, period in ms), integers as h2load takes them, closest to `rate_rps`."""
    best = None
    for per_period in range(1, 65):
        period_ms = max(min_period_ms, round(1000 * per_period / rate_rps))
        error = abs(1000 * per_period / period_ms - rate_rps)
        if best is None or error < best[0]:
            best = (error, per_period, period_ms)
    return best[1], best[2]


@dataclass
class H2LoadRun:
    results: list[Result]  # one per request h2load sent (status 0: no response)
    errored: int  # h2load's count of requests failed by a connection error
    timed_out: int
    seconds: float  # from the first request sent to the last answer
    command: list[str]


def parse_log(text: str) -> list[Result]:
    """h2load's --log-file: start (µs since epoch), status (-1: failed), duration (µs), tab-separated."""
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not rows:
        return []
    t0 = min(int(r[0]) for r in rows)
    out = []
    for r in rows:
        status = int(r[1])
        out.append(
            Result(
                latency_s=int(r[2]) / 1e6,
                status=max(status, 0),
                error="h2load" if status < 0 else None,
                started_s=(int(r[0]) - t0) / 1e6,
            )
        )
    return out


def run(url: str, body: bytes, rate_rps: float, seconds: float, timeout_s: float = 120.0) -> H2LoadRun:
    """POST `body` (JSON) to `url` at `rate_rps` new connections per second for `seconds`."""
    if not available():
        raise RuntimeError("h2load is not installed (Debian/Ubuntu: apt-get install nghttp2-client)")
    per_period, period_ms = rate_schedule(rate_rps)
    n = max(1, math.floor(seconds * 1000 / period_ms) * per_period)
    with tempfile.TemporaryDirectory() as tmp:
        data, log = Path(tmp) / "body.json", Path(tmp) / "requests.tsv"
        data.write_bytes(body)
        # -c == -n: every client sends one request on its own connection
        cmd = ["h2load", "--h1", "-n", str(n), "-c", str(n), "-r", str(per_period), "--rate-period", f"{period_ms}ms"]
        cmd += ["-d", str(data), "-H", "content-type: application/json", "-T", f"{int(timeout_s)}s", "--log-file", str(log), url]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 60)
        elapsed = time.perf_counter() - t0
        summary = SUMMARY.search(proc.stdout)
        if proc.returncode != 0 or summary is None:
            raise RuntimeError(f"h2load failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}")
        results = parse_log(log.read_text())
    total, started, done, _, _, errored, timed_out = (int(x) for x in summary.groups())
    # requests never logged (not started, or cut by a connection error before a stream existed)
    results += [Result(latency_s=0.0, status=0, error="h2load-not-done") for _ in range(total - len(results))]
    seconds_all = max((r.started_s + r.latency_s for r in results), default=elapsed)
    shown = [{str(data): "body.json", str(log): "requests.tsv"}.get(c, c) for c in cmd]
    return H2LoadRun(results, errored, timed_out, seconds_all, shown)
