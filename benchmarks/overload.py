"""`trimvlm bench overload`: the service on loopback driven far past its capacity.

1. capacity: closed-loop clients (benchmarks/loadgen.py) for `capacity_s`; the answered rate is
   the capacity C (requests per second);
2. overload: open-loop arrivals at `factor` x C for `duration_s` (arrivals do not wait for
   answers), the server's RSS sampled meanwhile. With h2load installed (benchmarks/h2load.py) it
   sends most of them, a C client whose own CPU takes little from the server on shared cores, and
   the Python client sends a Poisson sample beside it whose responses are checked in full
   (Retry-After); without it the Python client sends them all;
3. then a plain request must still be answered.

What must hold (report.json "checks"): every request gets an answer, 200 or an explicit refusal
(429/503) carrying Retry-After; no connection errors; the server stays up; RSS growth is reported.
Writes report.json + REPORT.md into `out` (reports/reliability/overload by default).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks import h2load
from benchmarks.loadgen import Result, RunStats, http_request, parse_head, percentile
from benchmarks.service_bench import ServerProcess
from service.machine import machine_info

MiB = 2**20
REFUSALS = (429, 503)
GOODPUT_TARGET = 0.8  # answered 200s per second under overload / the measured capacity
SAMPLE_SHARE = 0.1  # with h2load: the share of arrivals the Python client sends (full response checks)


# ------------------------------------------------------------------------------ shared with soak.py


def shape_images() -> list[tuple[str, str]]:
    """(base64 PNG, shape) for easy-VQA style pictures: one coloured shape on white."""
    from PIL import Image, ImageDraw

    out = []
    for kind, colour in (("circle", (255, 0, 0)), ("rectangle", (0, 0, 255)), ("triangle", (0, 128, 0))):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        if kind == "circle":
            draw.ellipse((13, 13, 51, 51), fill=colour)
        elif kind == "rectangle":
            draw.rectangle((13, 13, 51, 51), fill=colour)
        else:
            draw.polygon([(32, 10), (54, 51), (10, 51)], fill=colour)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append((base64.b64encode(buf.getvalue()).decode(), kind))
    return out


def vqa_factory():
    images = shape_images()

    def make(i: int):
        image, _ = images[i % len(images)]
        return "/vqa", {"image": image, "question": "what shape is in the image?"}, None

    return make


def machine() -> dict:
    """The reliability reports' machine (overload and soak runs)."""
    note = "shared with other jobs; client and server on the same cores (loopback)"
    return machine_info("cpu", "cores", "python", "onnxruntime", "platform", note=note)


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


@dataclass
class RssSampler:
    """Samples a process's RSS every `every_s` seconds while running (an asyncio task)."""

    pid: int
    every_s: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    _task: asyncio.Task | None = None
    _t0: float = 0.0

    async def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self._t0, rss_bytes(self.pid)))
            await asyncio.sleep(self.every_s)

    def start(self, t0: float | None = None) -> None:
        self._t0 = t0 if t0 is not None else time.perf_counter()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.samples.append((time.perf_counter() - self._t0, rss_bytes(self.pid)))

    def summary(self) -> dict:
        values = [b for _, b in self.samples]
        return {
            "start_mib": round(values[0] / MiB, 1),
            "peak_mib": round(max(values) / MiB, 1),
            "end_mib": round(values[-1] / MiB, 1),
            "growth_mib": round((values[-1] - values[0]) / MiB, 1),
            "samples": len(values),
        }


def outcome_counts(results: list[Result], headers_seen: list[Result] | None = None) -> dict:
    """Status counts; Retry-After is checked on the refusals in `headers_seen` (all by default: the
    clients that keep response headers)."""
    statuses = Counter(r.status for r in results)
    refusals = [r for r in results if r.status in REFUSALS]
    checked = refusals if headers_seen is None else [r for r in headers_seen if r.status in REFUSALS]
    return {
        "sent": len(results),
        "ok": statuses.get(200, 0),
        "refused": len(refusals),
        "refusals_checked_for_retry_after": len(checked),
        "refused_without_retry_after": sum(1 for r in checked if not r.retry_after),
        "connection_errors": statuses.get(0, 0),
        "connection_error_kinds": dict(Counter(r.error for r in results if r.status == 0)),
        "other_statuses": {str(k): v for k, v in statuses.items() if k not in (0, 200, *REFUSALS)},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def server_latency(before: str, after: str, code: str, endpoint: str = "vqa") -> dict:
    """p50/p99 of vlm_request_duration_seconds{endpoint, code} between two /metrics scrapes (bucket
    upper bounds): the time inside the server, without the client's own queueing on a shared CPU."""
    from prometheus_client.parser import text_string_to_metric_families

    def buckets(text: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "vlm_request_duration_seconds_bucket" and s.labels.get("endpoint") == endpoint:
                    if s.labels.get("code") == code:
                        le = float(s.labels["le"])
                        out[le] = out.get(le, 0.0) + s.value
        return out

    b0, b1 = buckets(before), buckets(after)
    cum = sorted((le, b1[le] - b0.get(le, 0.0)) for le in b1)
    total = cum[-1][1] if cum else 0.0
    if not total:
        return {"count": 0}

    def q(p: float) -> float | None:
        for le, n in cum:
            if n >= p * total:
                return None if le == float("inf") else round(1000 * le, 1)
        return None

    return {"count": int(total), "p50_ms_at_most": q(0.5), "p99_ms_at_most": q(0.99)}


# ------------------------------------------------------------------------------ overload


def raw_request(port: int, path: str, body: dict) -> bytes:
    return http_request("127.0.0.1", port, path, body, close=True)


class _OneShot(asyncio.Protocol):
    """Writes one prepared request and collects everything until the server closes."""

    def __init__(self, request: bytes, done: asyncio.Future):
        self.request, self.done, self.chunks = request, done, []

    def connection_made(self, transport) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result((b"".join(self.chunks), exc))


async def raw_one(port: int, request: bytes, timeout_s: float = 120.0) -> Result:
    """One request on its own connection, bytes prepared in advance: an open-loop client must cost far
    less CPU than the server it overloads (httpx could not offer 4x here: client and server share 2
    cores), hence a bare protocol rather than streams. Reads to EOF (Connection: close); status and
    Retry-After from the head."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    done: asyncio.Future = loop.create_future()
    transport = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(lambda: _OneShot(request, done), "127.0.0.1", port)
            raw, exc = await done
    except (OSError, TimeoutError) as e:
        return Result(time.perf_counter() - t0, 0, error=type(e).__name__, started_s=t0)
    finally:
        if transport is not None:
            transport.close()
    dt = time.perf_counter() - t0
    if not raw:
        return Result(dt, 0, error=type(exc).__name__ if exc else "NoResponse", started_s=t0)
    try:
        status, headers = parse_head(raw.split(b"\r\n\r\n", 1)[0])
    except ValueError:
        return Result(dt, 0, error="NoResponse", started_s=t0)
    return Result(dt, status, retry_after=headers.get("retry-after"), started_s=t0)


async def open_loop_with_rss(port: int, requests: list[bytes], rate_rps: float, seconds: float, pid: int, seed: int = 0):
    """Poisson arrivals at `rate_rps` for `seconds`; each request its own task (arrivals never wait)."""
    rng = random.Random(seed)
    sampler = RssSampler(pid)
    tasks = []
    t0 = time.perf_counter()
    sampler.start(t0)
    next_at, i = t0, 0
    while next_at - t0 < seconds:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(raw_one(port, requests[i % len(requests)])))
        i += 1
        next_at += rng.expovariate(rate_rps)
    send_s = time.perf_counter() - t0
    results = list(await asyncio.gather(*tasks))
    seconds_all = time.perf_counter() - t0
    await sampler.stop()
    return results, send_s, seconds_all, sampler


async def open_loop_h2load(url: str, body: bytes, requests: list[bytes], port: int, rate_rps: float, seconds: float, pid: int):
    """h2load sends (1 - SAMPLE_SHARE) of the arrivals; the Python client the rest, Poisson."""
    t0 = time.perf_counter()
    bulk = asyncio.create_task(asyncio.to_thread(h2load.run, url, body, (1 - SAMPLE_SHARE) * rate_rps, seconds))
    sample, sample_send_s, _, sampler = await open_loop_with_rss(port, requests, SAMPLE_SHARE * rate_rps, seconds, pid)
    bulk_run = await bulk
    total_s = time.perf_counter() - t0
    send_s = max(sample_send_s, max((r.started_s for r in bulk_run.results), default=0.0))
    return bulk_run, sample, send_s, total_s, sampler


async def raw_closed_loop(port: int, requests: list[bytes], clients: int, seconds: float) -> RunStats:
    """`clients` closed-loop clients (the same cheap raw client) for `seconds`: the capacity."""
    stats = RunStats()
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker():
        for i in counter:
            if time.perf_counter() >= stop_at:
                return
            stats.results.append(await raw_one(port, requests[i % len(requests)]))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    stats.seconds = time.perf_counter() - t0
    return stats


def client_loop() -> asyncio.Runner:
    """The load generator's event loop: uvloop where installed (uvicorn[standard] brings it). The client
    shares the cores with the server here, so what it spends per connection is taken from the server;
    uvloop roughly halves it against asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default, with its waited-for children:
    h2load), its threads included."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + (t.children_user + t.children_system if pid is None else 0.0)


def pick_client(client: str) -> str:
    if client == "auto":
        return "h2load" if h2load.available() else "python"
    if client == "h2load" and not h2load.available():
        raise RuntimeError("--client h2load: h2load is not installed (Debian/Ubuntu: apt-get install nghttp2-client)")
    if client not in ("h2load", "python"):
        raise ValueError(f"unknown client {client!r}: auto, h2load or python")
    return client


def run(
    models: Path,
    out: Path,
    duration_s: float = 60.0,
    factor: float = 4.0,
    capacity_s: float = 10.0,
    clients: int = 32,
    env: dict[str, str] | None = None,
    client: str = "auto",
) -> dict:
    client = pick_client(client)
    out.mkdir(parents=True, exist_ok=True)
    make = vqa_factory()
    server_env = {"TRIMVLM_LOG_LEVEL": "warning", **(env or {})}
    with ServerProcess(models, server_env) as srv:
        requests = [raw_request(srv.port, *make(i)[:2]) for i in range(3)]
        pid = srv.proc.pid
        with client_loop() as loop:
            loop.run(raw_closed_loop(srv.port, requests, clients, min(2.0, capacity_s)))  # warm-up
            cpu0 = (cpu_seconds(pid), cpu_seconds())
            cap = loop.run(raw_closed_loop(srv.port, requests, clients, capacity_s))
            cpu1 = (cpu_seconds(pid), cpu_seconds())
            capacity = cap.summary()["throughput_rps"]
            rate = factor * capacity
            before = httpx.get(srv.url + "/metrics", timeout=30).text
            cpu2 = (cpu_seconds(pid), cpu_seconds())
            if client == "h2load":
                body = json.dumps(make(0)[1]).encode()
                bulk, sample, send_s, total_s, sampler = loop.run(
                    open_loop_h2load(srv.url + "/vqa", body, requests, srv.port, rate, duration_s, pid)
                )
                results, headers_seen = bulk.results + sample, sample
                h2 = {"command": " ".join(bulk.command), "errored": bulk.errored, "timed_out": bulk.timed_out}
            else:
                results, send_s, total_s, sampler = loop.run(open_loop_with_rss(srv.port, requests, rate, duration_s, pid))
                headers_seen, h2 = None, None
            cpu3 = (cpu_seconds(pid), cpu_seconds())
        metrics_after = httpx.get(srv.url + "/metrics", timeout=30).text if srv.proc.poll() is None else before
        alive = srv.proc.poll() is None
        after = httpx.post(srv.url + "/vqa", json=make(0)[1], timeout=60) if alive else None
        counts = outcome_counts(results, headers_seen)
        ok_lat = sorted(1000 * r.latency_s for r in results if r.status == 200)
        ref_lat = sorted(1000 * r.latency_s for r in results if r.status in REFUSALS)
        goodput = counts["ok"] / total_s
        cores = os.cpu_count() or 1
        report = {
            "command": f"trimvlm bench overload --duration {duration_s:g} --factor {factor:g} --capacity-seconds {capacity_s:g}",
            "client": {
                "overload": "h2load + python sample" if client == "h2load" else "python",
                "sample_share": SAMPLE_SHARE if client == "h2load" else 1.0,
                "h2load": h2,
            },
            "machine": machine(),
            "server": {"models": str(models), "env": server_env, "settings": "defaults otherwise (max_queue_size 512)"},
            "capacity": {"clients": clients, "seconds": capacity_s, **cap.summary()},
            "overload": {
                "factor": factor,
                "offered_rps": round(rate, 1),
                "sent_rps": round(len(results) / send_s, 1),
                "duration_s": round(send_s, 2),
                "drain_s": round(total_s - send_s, 2),
                **counts,
                "ok_rps": round(counts["ok"] / total_s, 1),
                "ok_p50_ms": round(percentile(ok_lat, 50), 1) if ok_lat else None,
                "ok_p99_ms": round(percentile(ok_lat, 99), 1) if ok_lat else None,
                "refusal_p50_ms": round(percentile(ref_lat, 50), 1) if ref_lat else None,
                "refusal_p99_ms": round(percentile(ref_lat, 99), 1) if ref_lat else None,
            },
            "goodput": {
                "ok_rps": round(goodput, 1),
                "capacity_rps": capacity,
                "ratio": round(goodput / capacity, 3) if capacity else None,
                "target_ratio": GOODPUT_TARGET,
            },
            # CPU per phase, in cores (CPU seconds per second): the client shares these cores, so what
            # it spends on 4x the connections is not available to the server
            "cpu_cores_used": {
                "capacity": {
                    "server": round((cpu1[0] - cpu0[0]) / cap.seconds, 2),
                    "client": round((cpu1[1] - cpu0[1]) / cap.seconds, 2),
                },
                "overload": {
                    "server": round((cpu3[0] - cpu2[0]) / total_s, 2),
                    "client": round((cpu3[1] - cpu2[1]) / total_s, 2),
                },
                "machine_cores": cores,
            },
            "server_side_200": server_latency(before, metrics_after, "200"),
            "rss": sampler.summary(),
            "after": {"server_alive": alive, "status": after.status_code if after is not None else None},
        }
        o = report["overload"]
        report["checks"] = {
            "every_request_answered": o["ok"] + o["refused"] == o["sent"],
            "refusals_carry_retry_after": o["refused_without_retry_after"] == 0
            and (o["refusals_checked_for_retry_after"] > 0 or not o["refused"]),
            "no_connection_errors": o["connection_errors"] == 0 and not (h2 and (h2["errored"] or h2["timed_out"])),
            "server_alive_and_serving": alive and report["after"]["status"] == 200,
        }
        report["passed"] = all(report["checks"].values())
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    # Latencies seen by the client include its own queueing: client and server share the cores here.
    c, o, m, rss, side = r["capacity"], r["overload"], r["machine"], r["rss"], r["server_side_200"]
    g, cpu = r["goodput"], r["cpu_cores_used"]
    checks = "\n".join(f"| {k.replace('_', ' ')} | {'yes' if v else '**NO**'} |" for k, v in r["checks"].items())
    rows = [
        (
            f"capacity (closed loop, {c['clients']} clients, {c['seconds']:g} s)",
            f"{c['throughput_rps']} req/s, p99 {c['p99_ms']} ms",
        ),
        (
            f"offered (open loop, {o['factor']:g}x; {r['client']['overload']})",
            f"{o['offered_rps']} req/s; sent {o['sent_rps']} req/s",
        ),
        ("requests sent", o["sent"]),
        ("answered 200", f"{o['ok']} ({o['ok_rps']} req/s), p50 {o['ok_p50_ms']} ms, p99 {o['ok_p99_ms']} ms"),
        (
            "refused 429/503",
            f"{o['refused']}, p50 {o['refusal_p50_ms']} ms; Retry-After missing on {o['refused_without_retry_after']} of the "
            f"{o['refusals_checked_for_retry_after']} whose headers the client kept",
        ),
        (
            "goodput / capacity",
            f"**{g['ratio']}** ({g['ok_rps']} of {g['capacity_rps']} req/s; target {g['target_ratio']})",
        ),
        (
            "CPU used (cores), capacity phase",
            f"server {cpu['capacity']['server']}, client {cpu['capacity']['client']} of {cpu['machine_cores']}",
        ),
        (
            "CPU used (cores), overload phase",
            f"server {cpu['overload']['server']}, client {cpu['overload']['client']} of {cpu['machine_cores']}",
        ),
        ("200s inside the server (histogram)", f"p50 <= {side.get('p50_ms_at_most')} ms, p99 <= {side.get('p99_ms_at_most')} ms"),
        ("connection errors", f"{o['connection_errors']} {o['connection_error_kinds'] or ''}"),
        ("other statuses", o["other_statuses"] or "none"),
        (
            "server RSS (MiB)",
            f"{rss['start_mib']} at start, peak {rss['peak_mib']}, {rss['end_mib']} at end ({rss['growth_mib']:+})",
        ),
        ("after the run", f"alive: {r['after']['server_alive']}, a plain request answered {r['after']['status']}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# Overload: {o["factor"]:g}x capacity for {o["duration_s"]:.0f} s

`{r["command"]}` on {m["cpu"]} ({m["cores"]} cores, {m["note"]}), ONNX Runtime {m["onnxruntime"]}.
Server: `trimvlm serve` with default settings, POST /vqa (64-px shape images, compute `full`); every
request opens its own connection. Capacity: the Python client (prepared bytes on uvloop), closed loop.
Overload: h2load (C, when installed) sends {100 * (1 - r["client"]["sample_share"]):.0f}% of the arrivals in evenly spaced
bursts and the Python client the rest as Poisson arrivals, its responses checked in full (Retry-After);
the client shares the server's cores, so the cheaper it is the more the server keeps. Goodput is the
200s answered per second while overloaded, over the measured capacity. Client-side latencies include
the client's own scheduling on the shared cores.

| | |
|---|---|
{table}

| check | holds |
|---|---|
{checks}
"""


if __name__ == "__main__":
    import sys

    print(json.dumps(run(Path(sys.argv[1] if len(sys.argv) > 1 else "models"), Path("reports/reliability/overload")), indent=2))
