"""SIGTERM during load. tests/e2e/test_service.py::test_sigterm_finishes_in_flight_requests
signals a server holding a fixed set of requests; this one signals it in the middle of steady load
and counts every request: sent = 200s + explicit refusals, and no connection error for any request
the server had accepted before the signal. Requests sent after the signal must be refused
explicitly (connection refused, or 429/503), never hang or be dropped half-way."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from tests.e2e.test_service import SHAPE_Q, SHAPES, assert_clean_exit, metric

WORKERS = 16


def test_sigterm_under_load_loses_nothing(start_server):
    srv = start_server(TRIMVLM_MAX_BATCH_SIZE=2)
    before: list[tuple[str, int | str]] = []  # (kind, status or exception name) for requests sent before the signal
    after: list[int | str] = []
    stop_sending = asyncio.Event()

    def body(i: int) -> tuple[str, dict]:
        image = SHAPES[i % 3][1]
        if i % 2:
            return "/caption", {"image": image, "num_beams": 3, "max_length": 16}
        return "/vqa", {"image": image, "question": SHAPE_Q}

    async def worker(c: httpx.AsyncClient, w: int) -> None:
        i = w
        while not stop_sending.is_set():
            path, payload = body(i)
            i += WORKERS
            try:
                r = await c.post(path, json=payload)
                before.append((path, r.status_code))
            except httpx.HTTPError as e:
                before.append((path, type(e).__name__))

    async def run() -> int:
        limits = httpx.Limits(max_connections=WORKERS + 1, max_keepalive_connections=WORKERS + 1)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as c:
            workers = [asyncio.ensure_future(worker(c, w)) for w in range(WORKERS)]
            await asyncio.sleep(3.0)  # steady load
            for _ in range(10):
                stop_sending.set()  # no new requests from here: the ones out now are the in-flight set
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # every outstanding request has reached the server
                    outstanding = sum(not w.done() for w in workers)
                    inflight = metric((await c.get("/metrics")).text, "vlm_inflight_requests")
                    if inflight >= outstanding:
                        break
                    await asyncio.sleep(0.005)
                if inflight >= 1:
                    break
                # on a fast machine the last wave can finish before /metrics is answered: load again
                await asyncio.gather(*workers)
                stop_sending.clear()
                workers += [asyncio.ensure_future(worker(c, w)) for w in range(WORKERS)]
                await asyncio.sleep(0.5)
            in_flight_at_signal = int(inflight)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)  # the listening socket closes; new requests must be refused
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as fresh:
                for i in range(8):
                    path, payload = body(i)
                    try:
                        after.append((await fresh.post(path, json=payload)).status_code)
                    except httpx.ConnectError:
                        after.append("ConnectError")
            await asyncio.gather(*workers)
            return in_flight_at_signal

    in_flight = asyncio.run(run())
    statuses = [s for _, s in before]
    ok = statuses.count(200)
    refused = sum(1 for s in statuses if s in (429, 503))
    print(
        f"sent before the signal {len(before)}: {ok} x 200, {refused} refused; in flight at the signal {in_flight}; "
        f"after: {after}"
    )
    assert in_flight >= 1, "nothing was in flight when the signal came"
    assert len(before) == ok + refused, [s for s in statuses if s not in (200, 429, 503)]  # no connection errors, no 5xx
    assert ok > in_flight  # load ran before the signal, not just the last set
    assert all(s in ("ConnectError", 200, 429, 503) for s in after), after
    assert_clean_exit(srv)
