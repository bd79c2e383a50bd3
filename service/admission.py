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
from service.protocol_errors import error_response

access = logging.getLogger("trimvlm.access")

TASK_ENDPOINTS = {"/vqa": "vqa", "/caption": "caption"}
# the protocol routes (service/routes/openai.py, kserve.py), also under /openai/v1
PROTOCOL_ENDPOINTS = {
    "/v1/chat/completions": "chat_completions",
    "/v1/embeddings": "embeddings",
    "/openai/v1/chat/completions": "chat_completions",
    "/openai/v1/embeddings": "embeddings",
}
ENDPOINTS = ("vqa", "caption", "retrieval", "chat_completions", "embeddings", "v2_infer")
RETRY_AFTER_S = 1


def endpoint_of(path: str) -> str | None:
    """The task endpoint a path belongs to (the label of its metrics), None for operations."""
    if path in TASK_ENDPOINTS:
        return TASK_ENDPOINTS[path]
    if path.startswith("/retrieval/"):
        return "retrieval"
    if path in PROTOCOL_ENDPOINTS:
        return PROTOCOL_ENDPOINTS[path]
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    return None


class Admission:
    """Counts task requests in flight in this process (reading, decoding, queued, running) and
    refuses those beyond `limit` at once; 0 means no limit. The batchers' bounded queues only see
    requests already decoded, so without this, decoding and body reading would queue without
    bound under overload and every request would wait."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.inflight = app, limit, 0
        message = f"too many requests in flight (the limit is {limit}); retry later"
        body = json.dumps(error_body("overloaded", message)).encode()
        self._body = body
        self._headers = self._prepared(body)
        # the protocol routes refuse in their protocol's error shape (service/protocol_errors.py)
        self._shaped = {}
        for e, path in (("chat_completions", "/v1/chat/completions"), ("embeddings", "/v1/embeddings"), ("v2_infer", "/v2/x")):
            shaped = json.dumps(error_response(path, 429, "overloaded", message)[1]).encode()
            self._shaped[e] = (shaped, self._prepared(shaped))
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

    @staticmethod
    def _prepared(body: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ]

    async def _refuse(self, scope, send, endpoint: str) -> None:
        rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value[:64]
                break
        rid = rid or os.urandom(16).hex().encode()
        body, headers = self._shaped.get(endpoint, (self._body, self._headers))
        await send({"type": "http.response.start", "status": 429, "headers": [*headers, (b"x-request-id", rid)]})
        await send({"type": "http.response.body", "body": body})
        for counter in self._refused[endpoint]:
            counter.inc()
        if access.isEnabledFor(logging.INFO):
            fields = {"request_id": rid.decode("latin-1"), "path": scope["path"], "status": 429, "error_code": "overloaded"}
            access.info("request", extra={"fields": fields})
