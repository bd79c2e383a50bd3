"""Shared route plumbing: request parsing (JSON or multipart), deadlines, waiting on the
batcher while watching for client disconnects, and per-request metrics."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from service import tracing
from service.adaptive import CannotMeetDeadline
from service.batching import DeadlineExceeded
from service.errors import ServiceError
from service.server import Call
from service.state import AppState


def state(request: Request) -> AppState:
    return request.app.state.trimvlm


def request_start(request: Request) -> float:
    return getattr(request.state, "t0", time.perf_counter())


def deadline_for(request: Request, deadline_ms: float | None) -> float | None:
    """Absolute deadline (perf_counter seconds) from the body field, else X-Deadline-Ms, else the
    server default; counted from the request's arrival."""
    if deadline_ms is None:
        header = request.headers.get("x-deadline-ms")
        if header is not None:
            try:
                deadline_ms = float(header)
            except ValueError as e:
                raise ServiceError(
                    "invalid_deadline", 422, f"X-Deadline-Ms must be a number of milliseconds, got {header!r}"
                ) from e
            if not deadline_ms > 0:  # also NaN, which float() accepts
                raise ServiceError("invalid_deadline", 422, "X-Deadline-Ms must be positive")
    if deadline_ms is None:
        deadline_ms = state(request).settings.default_deadline_ms
    deadline = None if deadline_ms is None else request_start(request) + deadline_ms / 1000
    if deadline is not None:
        request.state.deadline = deadline  # the request-metrics middleware counts misses
        request.state.deadline_ms = deadline_ms  # as given, for the messages when it is missed
    return deadline


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.perf_counter()


def deadline_text(request: Request) -> str:
    """'deadline of 250 ms' as the client gave it (or the server default)."""
    ms = getattr(request.state, "deadline_ms", None)
    if ms is None:
        deadline = getattr(request.state, "deadline", None)
        return "deadline" if deadline is None else f"deadline of {1000 * (deadline - request_start(request)):.1f} ms"
    return f"deadline of {ms:g} ms"


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise ServiceError("empty_body", 400, "request body is empty; send JSON")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deeply nested
        raise ServiceError("invalid_json", 400, f"request body is not valid JSON: {e}") from e


def location(loc) -> str:
    """pydantic's error location as the field's path: ("items", 1, "image") -> items[1].image."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "body"


def validate(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ServiceError(
            "invalid_request", 422, f"{location(first['loc'])}: {first['msg']} ({e.error_count()} problem(s))"
        ) from e


@contextmanager
def field(name: str):
    """API errors raised inside are about the request field `name` (`image`, `question`), so that a
    batch request's error names the item and the field (`items[1].image: ...`). The innermost wins."""
    try:
        yield
    except ServiceError as e:
        if e.field is None:
            e.field = name
        raise


def item_error(index: int, e: ServiceError) -> ServiceError:
    """`e` as the error of item `index` of a batch request: its message starts with where
    (`items[1].image: invalid base64 ...`, or `items[1]: ...` when no single field is at fault)."""
    where = f"items[{index}]" + (f".{e.field}" if e.field else "")
    return ServiceError(e.code, e.status, f"{where}: {e.message}", e.headers)


@tracing.traced("parse")
async def parse(request: Request, single: type[BaseModel], batch: type[BaseModel], max_items: int) -> tuple[list, bool]:
    """JSON body: one item, or {"items": [...]}. multipart/form-data: one item, the image as the
    `image` file field, the rest as form fields. Returns (items, is_batch)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=20)
        data: dict[str, Any] = {}
        upload_bytes = None
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key != "image":
                    raise ServiceError("invalid_request", 422, f"unexpected file field {key!r} (send the image as `image`)")
                upload_bytes = await value.read()
            else:
                data[key] = value
        if upload_bytes is None:
            raise ServiceError("invalid_request", 422, "multipart request needs a file field `image`")
        for key in ("top_k", "num_beams", "max_length"):
            if key in data:
                data[key] = _int(key, data[key])
        if "metadata" in data:
            try:
                data["metadata"] = json.loads(data["metadata"])
            except (json.JSONDecodeError, RecursionError) as e:
                raise ServiceError("invalid_request", 422, "metadata must be a JSON object") from e
        if "deadline_ms" in data:
            data["deadline_ms"] = _float("deadline_ms", data["deadline_ms"])
        if isinstance(data.get("compute"), str) and data["compute"].lstrip().startswith("{"):
            # {"max_flops_ratio": 0.5} as a form field: JSON, validated as in a JSON body
            try:
                data["compute"] = json.loads(data["compute"])
            except (json.JSONDecodeError, RecursionError) as e:
                raise ServiceError(
                    "invalid_request",
                    422,
                    f'compute: not valid JSON ({e}); send a level name or a JSON object such as {{"max_flops_ratio": 0.5}}',
                ) from e
        data["image"] = "multipart"
        item = validate(single, data)
        item._upload = upload_bytes  # raw bytes travel beside the validated fields
        return [item], False
    if ctype and not ctype.startswith("application/json"):
        raise ServiceError("unsupported_media_type", 415, f"send application/json or multipart/form-data, not {ctype}")
    data = await json_body(request)
    if isinstance(data, dict) and "items" in data:
        b = validate(batch, data)
        if len(b.items) > max_items:
            raise ServiceError("too_many_items", 413, f"{len(b.items)} items in one request; the limit is {max_items}")
        return list(b.items), True
    return [validate(single, data)], False


def _int(key: str, v: str) -> int:
    try:
        return int(v)
    except ValueError as e:
        raise ServiceError("invalid_request", 422, f"{key} must be an integer") from e


def _float(key: str, v: str) -> float:
    try:
        return float(v)
    except ValueError as e:
        raise ServiceError("invalid_request", 422, f"{key} must be a number") from e


def image_payload(item) -> str | bytes:
    upload = getattr(item, "_upload", None)  # b"" (an empty upload) must fail as empty, not as the placeholder text
    return upload if upload is not None else item.image


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def call(request: Request, endpoint: str, deadline: float | None) -> Call:
    """This request's part in the model server: it waits for queued items while watching for the
    client going away (`wait`), and its compute level goes into the request's metrics."""

    def on_level(level: str) -> None:
        request.state.level = level

    return Call(endpoint, deadline, lambda fut, name: wait(request, fut, deadline, name), on_level)


async def wait(request: Request, fut: asyncio.Future, deadline: float | None, name: str = "the model") -> tuple[Any, float]:
    """A queued item's (result, seconds queued), dropping it (cancelling `fut`) if the client
    disconnects or the deadline passes first."""
    submitted = time.perf_counter()
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            try:
                done, _ = await asyncio.wait({fut, disconnect}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                fut.cancel()  # this request was cancelled (a sibling item failed): drop its queued work
                raise
            # uvloop's timers count from the loop's cached clock (libuv's uv_now, taken at the start
            # of the loop iteration), so a timeout can fire a millisecond or more early: check ours
            if done or deadline is None or time.perf_counter() >= deadline:
                break
        if fut in done:
            try:
                return tracing.batch_item(fut.result(), name, submitted)  # its queue wait / inference spans, when traced
            except DeadlineExceeded as e:  # told with the request's own figures
                e.message = (
                    f"{deadline_text(request)} passed before the request's turn on {name}: it had spent"
                    f" {ms_since(request_start(request)):.1f} ms in all, {1000 * e.queued_s:.1f} ms of it in that queue"
                )
                raise
        fut.cancel()  # the batcher skips cancelled items
        if disconnect in done:
            raise ClientDisconnected()
        message = (
            f"{deadline_text(request)} passed before the answer was ready: the request had spent"
            f" {ms_since(request_start(request)):.1f} ms in all, {ms_since(submitted):.1f} ms of it waiting for {name}"
        )
        raise DeadlineExceeded(name, time.perf_counter() - submitted, time.perf_counter() - deadline, message)
    finally:
        disconnect.cancel()


async def gather_items(coros, is_batch: bool = False) -> list:
    """Run a request's items together; the first failure cancels the others, so their queued
    work is dropped rather than computed for an answer nobody gets. In the batch form an item's
    error names it (`items[1].image: ...`)."""

    async def numbered(i: int, coro):
        try:
            return await coro
        except ServiceError as e:
            raise item_error(i, e) from e

    coros = list(coros)
    if not is_batch and len(coros) == 1:  # one item: awaited in the request's own task, no task or gather to make
        return [await coros[0]]
    tasks = [asyncio.ensure_future(numbered(i, c) if is_batch else c) for i, c in enumerate(coros)]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


class ClientDisconnected(Exception):
    """The client went away; nothing to answer (logged as 499)."""


@asynccontextmanager
async def deadline_figures(request: Request):
    """A refused deadline (CannotMeetDeadline) told with the request's own figures: its deadline
    and how long reading and decoding took."""
    try:
        yield
    except CannotMeetDeadline as e:
        spent = ms_since(request_start(request))
        if e.remaining_s <= 0:
            head = f"{deadline_text(request)} already passed before scheduling (the request spent {spent:.1f} ms"
            e.message = f"{head} reading and decoding){e.fastest_detail()}"
        else:
            head = f"{deadline_text(request)} leaves {1000 * e.remaining_s:.1f} ms after {spent:.1f} ms reading"
            e.message = f"{head} and decoding, and no compute level fits in it{e.fastest_detail()}"
        raise


def json_model(result: BaseModel | list[BaseModel], is_batch: bool = False) -> Response:
    """A route's own response model(s) as the JSON body (`{"results": [...]}` for the batch form),
    serialised by pydantic directly. Returned as a Response, FastAPI skips re-validating the model
    against the route's `response_model` (which still documents it): ~0.15 ms a request."""
    if is_batch:
        body = b'{"results":[' + b",".join(r.model_dump_json().encode() for r in result) + b"]}"
    else:
        body = result.model_dump_json().encode()
    return Response(body, media_type="application/json")


def ms_since(t0: float) -> float:
    return round(1000 * (time.perf_counter() - t0), 3)
