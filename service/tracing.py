"""OpenTelemetry tracing, off by default (TRIMVLM_TRACING=true; the `otel` extra).

One SERVER span per HTTP request (`POST /vqa`), continuing the client's W3C `traceparent`, with child
spans for the stages every task request goes through:

    parse        reading and validating the body (routes.common.parse; the v2 infer header)
    preprocess   image decode / resize / normalise and tokenisation (AppState.run_pre), per item
    queue wait   submitted to a batcher until its batch was dispatched, per item and batcher
    inference    the batch the item ran in: trimvlm.batch_size, trimvlm.level, trimvlm.batcher
    postprocess  from the last inference to the response's first byte (answers, captions, JSON)

The batch spans are recorded when the item's result arrives, from the batcher's own timestamps (a
batch is shared by several requests, each gets its own span of it). The request's trace id goes into
the access log line (`trace_id`) and, as an exemplar, onto vlm_request_duration_seconds (served in the
OpenMetrics format at /metrics to scrapers that ask for it).

Export: an SDK TracerProvider already installed (by `opentelemetry-instrument`, or a test's in-memory
exporter) is used as it is; otherwise one is made from the standard variables: OTEL_TRACES_EXPORTER
(otlp, console or none; default otlp), OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
(OTLP over HTTP/protobuf, default http://localhost:4318), OTEL_SERVICE_NAME (default trimvlm),
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG], OTEL_BSP_* and OTEL_PROPAGATORS.

With tracing off nothing of OpenTelemetry is imported, no middleware runs, and the stage hooks below
cost one ContextVar read each.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import nullcontext
from contextvars import ContextVar
from typing import Any

_request: ContextVar[RequestTrace | None] = ContextVar("trimvlm_request_trace", default=None)


class RequestTrace:
    """The traced request the running code belongs to: its tracer, its state, and how to date a span."""

    __slots__ = ("tracer", "state", "last_inference_end_ns", "_offset_ns")

    def __init__(self, tracer, state: dict):
        self.tracer, self.state = tracer, state
        self.last_inference_end_ns: int | None = None
        self._offset_ns = time.time_ns() - time.perf_counter_ns()  # one offset a request: its spans line up

    def ns(self, perf_s: float) -> int:
        """A time.perf_counter() instant as epoch nanoseconds (what spans are dated in)."""
        return self._offset_ns + int(perf_s * 1e9)


# ------------------------------------------------------------------------------- stage hooks


def span(name: str, **attributes: Any):
    """A child span of the request's span around a stage (a no-op context when not traced)."""
    rt = _request.get()
    return nullcontext() if rt is None else rt.tracer.start_as_current_span(name, attributes=attributes)


def traced(name: str):
    """Decorate an async function: its await is the stage `name` (a child span) when traced."""

    def wrap(fn):
        @functools.wraps(fn)
        async def run(*args, **kwargs):
            rt = _request.get()
            if rt is None:
                return await fn(*args, **kwargs)
            with rt.tracer.start_as_current_span(name):
                return await fn(*args, **kwargs)

        return run

    return wrap


def batch_item(result, batcher: str, submitted: float):
    """A batcher item's result as the route receives it (unchanged), recording its `queue wait` and
    `inference` spans when traced. `result` is the batcher's (value, seconds queued) with the batch's
    size and run time (service.batching.Done); `submitted`: perf_counter when it was queued."""
    rt = _request.get()
    if rt is None:
        return result
    started = getattr(result, "started", None)  # perf_counter when its batch was dispatched
    start = rt.ns(submitted)
    dispatched = rt.ns(started) if started is not None else start + int(result[1] * 1e9)
    dispatched = max(dispatched, start)
    end = dispatched + int(result.run_s * 1e9) if started is not None else time.time_ns()
    group, _, level = batcher.partition("/")
    model = rt.state.get("model")
    common = {"trimvlm.batcher": batcher, **({"trimvlm.model": model} if model else {})}
    rt.tracer.start_span("queue wait", start_time=start, attributes=common).end(end_time=dispatched)
    attrs = {**common, "trimvlm.level": level or "full", "trimvlm.batch_size": int(getattr(result, "batch_size", 1))}
    rt.tracer.start_span("inference", start_time=dispatched, attributes=attrs).end(end_time=end)
    rt.last_inference_end_ns = max(end, rt.last_inference_end_ns or 0)
    return result


# ------------------------------------------------------------------------------------ set-up


def _provider_from_env():
    """A TracerProvider configured by the standard OTEL_* variables."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "trimvlm"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in (n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")):
        if name == "otlp":
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol)
            if protocol != "http/protobuf":
                raise RuntimeError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: TrimVLM exports OTLP over http/protobuf")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name not in ("none", ""):
            raise RuntimeError(f"OTEL_TRACES_EXPORTER={name}: supported are otlp, console and none")
    return provider


class Tracing:
    """The app's tracing: its tracer, and the ASGI middleware that makes each request's span."""

    def __init__(self):
        try:
            from opentelemetry import propagate, trace
            from opentelemetry.sdk.trace import TracerProvider
        except ImportError as e:
            raise RuntimeError("TRIMVLM_TRACING=true needs the otel extra: pip install 'trimvlm[otel]'") from e
        from service import __version__

        provider = trace.get_tracer_provider()
        self.own_provider = not isinstance(provider, TracerProvider)
        if self.own_provider:  # nobody installed one: ours, from the OTEL_* variables
            provider = _provider_from_env()
            trace.set_tracer_provider(provider)
        self.provider = provider
        self.tracer = provider.get_tracer("trimvlm", __version__)
        self.propagate, self.trace = propagate, trace

    def shutdown(self) -> None:
        """Export what is buffered (at the app's shutdown)."""
        if self.own_provider:
            self.provider.shutdown()
        else:
            self.provider.force_flush()

    def middleware(self, app):
        return _Middleware(app, self)


class _Middleware:
    """Pure ASGI, inside RequestContext (which logs the trace id and observes the exemplar).

    FastAPI's own telemetry (FastAPI >= 0.16x, `FastAPI(telemetry=...)`) makes the request's SERVER span
    when tracing is on (semantic-convention attributes, the client's traceparent, `POST /vqa`, and the
    429s admission refuses before this middleware runs): the stages become its children. With a FastAPI
    that has none, this middleware makes that span itself, alike."""

    def __init__(self, app, tracing: Tracing):
        self.app, self.t = app, tracing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        native = getattr(scope.get("fastapi.telemetry"), "span", None)
        if native is not None and native.is_recording():
            return await self._traced(scope, receive, send, native, own=False)
        t = self.t
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope["method"], scope["path"]
        attrs = {"http.request.method": method, "url.path": path}
        kind = t.trace.SpanKind.SERVER
        with t.tracer.start_as_current_span(
            f"{method} {path}", context=t.propagate.extract(carrier), kind=kind, attributes=attrs
        ) as root:
            await self._traced(scope, receive, send, root, own=True)

    async def _traced(self, scope, receive, send, root, own: bool):
        t = self.t
        state = scope.setdefault("state", {})
        state["trace_id"] = format(root.get_span_context().trace_id, "032x")
        rt = RequestTrace(t.tracer, state)
        token = _request.set(rt)
        status = 500

        def describe() -> None:  # before the response goes out: FastAPI's span ends with its last byte
            root.set_attribute("trimvlm.request_id", state.get("request_id", ""))
            for key in ("model", "level", "error_code"):
                if key in state:
                    root.set_attribute(f"trimvlm.{key}", state[key])

        async def send_traced(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if rt.last_inference_end_ns is not None:  # answers, captions, JSON: until the first byte
                    t.tracer.start_span("postprocess", start_time=rt.last_inference_end_ns).end(end_time=time.time_ns())
                describe()
            await send(message)

        try:
            await self.app(scope, receive, send_traced)
        finally:
            _request.reset(token)
            if own:
                describe()
                route = scope.get("route")
                if route is not None and getattr(route, "path", None):
                    root.update_name(f"{scope['method']} {route.path}")
                    root.set_attribute("http.route", route.path)
                root.set_attribute("http.response.status_code", status)
                if status >= 500:
                    root.set_status(t.trace.Status(t.trace.StatusCode.ERROR))


def fastapi_telemetry(enabled: bool) -> dict:
    """FastAPI's own telemetry settings (`FastAPI(telemetry=...)`, where FastAPI has it): its request span,
    metrics and logs only when TrimVLM's tracing is on (off by default, even with global providers), without its
    per-operation spans (dependencies, endpoint, serialization): the stages above say more."""
    import inspect

    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    # metrics and logs follow too: left on, FastAPI asks OpenTelemetry for the global meter and logger
    # providers on every request (~2% of the event loop's time per /vqa request, profiled)
    return {"telemetry": {"tracing": enabled, "metrics": enabled, "logs": enabled, "operation_spans": False}}
