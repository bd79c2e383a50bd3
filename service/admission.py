"""Admission: task requests beyond the in-flight limit are refused (429 `overloaded` + Retry-After)
before anything else runs.

Under overload most connections are refused, so a refusal must cost the event loop almost
nothing: every CPU cycle it takes is one the model threads do not get, and goodput falls with it.
This layer is therefore the outermost one of the app (outside FastAPI's own middleware), and a
refusal is prepared bytes, pre-bound metric children and no JSON encoding.
"""

from __future__ import annotations

import json
import logging
import os

from service.errors import error_body
from service.metrics import Metrics

access = logging.getLogger("trimvlm.access")

TASK_ENDPOINTS = {"/vqa": "vqa", "/caption": "caption"}
ENDPOINTS = ("vqa", "caption", "retrieval")
RETRY_AFTER_S = 1


def endpoint_of(path: str) -> str | None:
    """The task endpoint a path belongs to (the label of its metrics), None for operations."""
    if path in TASK_ENDPOINTS:
        return TASK_ENDPOINTS[path]
    if path.startswith("/retrieval/"):
        return "retrieval"
    return None


class Admission:
    """Counts task requests in flight in this process (reading, decoding, queued, running) and
    refuses those beyond `limit` at once; 0 means no limit. The batchers' bounded queues only see
    requests already decoded, so without this, decoding and body reading would queue without
    bound under overload and every request would wait."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.inflight = app, limit, 0
        body = json.dumps(error_body("overloaded", f"too many requests in flight (the limit is {limit}); retry later")).encode()
        self._body = body
        self._headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ]
        self._gauge = {e: metrics.inflight.labels(e) for e in ENDPOINTS}
        self._refused = {
            e: (
                metrics.rejections.labels(e, "overloaded"),
                metrics.failures.labels(e, "overloaded"),
                metrics.requests.labels(e, "none", "none", "429"),
            )
            for e in ENDPOINTS
        }

    async def __call__(self, scope, receive, send):
        endpoint = endpoint_of(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or not self.limit:
            return await self.app(scope, receive, send)
        if self.inflight >= self.limit:
            return await self._refuse(scope, send, endpoint)
        self.inflight += 1
        self._gauge[endpoint].inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            self._gauge[endpoint].dec()

    async def _refuse(self, scope, send, endpoint: str) -> None:
        rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value[:64]
                break
        rid = rid or os.urandom(16).hex().encode()
        await send({"type": "http.response.start", "status": 429, "headers": [*self._headers, (b"x-request-id", rid)]})
        await send({"type": "http.response.body", "body": self._body})
        for counter in self._refused[endpoint]:
            counter.inc()
        if access.isEnabledFor(logging.INFO):
            fields = {"request_id": rid.decode("latin-1"), "path": scope["path"], "status": 429, "error_code": "overloaded"}
            access.info("request", extra={"fields": fields})
