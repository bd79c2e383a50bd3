"""Admission (service/admission.py): task requests beyond the in-flight limit get 429 `overloaded`
with Retry-After at once, operations never; the app is never entered for a refusal."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import generate_latest

from service.admission import Admission
from service.metrics import Metrics


class Held:
    """An app whose task requests wait until released; counts how often it was entered."""

    def __init__(self):
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope, receive, send):
        self.entered += 1
        if scope["path"] != "/healthz":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def http(path: str, headers: list | None = None) -> dict:
    return {"type": "http", "path": path, "method": "POST", "headers": headers or []}


async def call(app, scope) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_refuses_beyond_the_limit_and_admits_again_after():
    async def main():
        inner, metrics = Held(), Metrics()
        gate = Admission(inner, limit=2, metrics=metrics)
        held = [asyncio.create_task(call(gate, http(p))) for p in ("/vqa", "/retrieval/search")]
        await asyncio.sleep(0)
        assert gate.inflight == 2
        refused = await call(gate, http("/caption", [(b"x-request-id", b"abc")]))
        health = await asyncio.wait_for(call(gate, http("/healthz")), 1)  # operations are never refused
        assert inner.entered == 3  # two held task requests + /healthz; the refused one never entered
        inner.release.set()
        await asyncio.gather(*held)
        assert gate.inflight == 0
        admitted = await call(gate, http("/vqa"))
        return refused, health, admitted, metrics

    refused, health, admitted, metrics = asyncio.run(main())
    start, body = refused
    headers = dict(start["headers"])
    assert start["status"] == 429 and headers[b"retry-after"] == b"1" and headers[b"x-request-id"] == b"abc"
    assert json.loads(body["body"])["error"]["code"] == "overloaded"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert health[0]["status"] == 200 and admitted[0]["status"] == 200
    text = generate_latest(metrics.registry).decode()
    assert 'vlm_rejections_total{endpoint="caption",reason="overloaded"} 1.0' in text
    assert 'vlm_requests_total{code="429",endpoint="caption",level="none",model="none"} 1.0' in text
    assert 'vlm_inflight_requests{endpoint="vqa"} 0.0' in text


def test_no_limit_and_fresh_request_ids():
    async def main():
        inner = Held()
        inner.release.set()
        unlimited = Admission(inner, limit=0, metrics=Metrics())
        results = await asyncio.gather(*(call(unlimited, http("/vqa")) for _ in range(50)))
        one = Admission(Held(), limit=1, metrics=Metrics())
        held = asyncio.create_task(call(one, http("/vqa")))
        await asyncio.sleep(0)
        refusals = [await call(one, http("/vqa")) for _ in range(2)]
        held.cancel()
        return results, refusals

    results, refusals = asyncio.run(main())
    assert all(r[0]["status"] == 200 for r in results)
    ids = [dict(r[0]["headers"])[b"x-request-id"] for r in refusals]
    assert all(r[0]["status"] == 429 for r in refusals) and ids[0] != ids[1] and len(ids[0]) == 32
