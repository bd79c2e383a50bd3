"""The FastAPI app: lifespan (load + warm up models in the background, drain on shutdown),
request context (id, body limit, JSON log line, request metrics), errors as JSON, auth, CORS."""

from __future__ import annotations

import asyncio
import gc
import hmac
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.admission import Admission, endpoint_of
from service.direct_routes import DirectRoutes
from service.errors import ServiceError, error_body
from service.protocol_errors import error_response
from service.routes import caption, docs, kserve, ops, retrieval, vqa
from service.routes import openai as openai_routes
from service.routes.common import ClientDisconnected
from service.settings import Settings
from service.state import AppState, lower_priority

log = logging.getLogger("trimvlm.app")
access = logging.getLogger("trimvlm.access")


class TrimVLMApp(FastAPI):
    """FastAPI with admission (the in-flight limit) outside its own middleware stack: under
    overload most requests are refused, and each layer a refusal passes through costs the event
    loop CPU the model threads need (service/admission.py)."""

    def build_middleware_stack(self):
        st: AppState = self.state.trimvlm
        self.admission = Admission(super().build_middleware_stack(), st.settings.max_inflight_requests, st.metrics)
        return self.admission


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if settings.log_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("trimvlm")
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    root.propagate = False


class RequestContext:
    """Pure ASGI (no BaseHTTPMiddleware: it would hide client disconnects from the routes):
    request id, body-size limit while the body streams in, one JSON log line and the request
    metrics per request. Admission (the in-flight limit) runs before it, outside FastAPI."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings
        # request ids: 16 random hex digits for this process, then a counter; unique across workers and
        # replicas, and cheaper than a uuid4 (os.urandom) a request (~3% of the event loop's time, profiled)
        self.id_prefix, self.id_count = secrets.token_hex(8), itertools.count()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers", []))
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or f"{self.id_prefix}{next(self.id_count):016x}"
        scope.setdefault("state", {}).update(t0=t0, request_id=rid)
        limit = self.settings.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            # a client that waits for `100 Continue` has sent nothing yet: nothing to drain
            drain = headers.get(b"expect", b"").lower() != b"100-continue" and self._drainable(int(length))
            message = f"request body of {int(length)} bytes exceeds {limit}"
            return await self._reject(scope, send, rid, t0, 413, "payload_too_large", message, drain=receive if drain else None)
        endpoint = endpoint_of(scope["path"])
        seen, over, body_ended = 0, False, False

        async def limited_receive():
            nonlocal seen, over, body_ended
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_ended = not message.get("more_body", False)
                if seen > limit:
                    over = True  # the answer (413) closes the connection after draining the rest
                    raise ServiceError("payload_too_large", 413, f"request body exceeds {limit} bytes")
            return message

        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                if over:
                    message["headers"].append((b"connection", b"close"))
            elif over and not body_ended and not message.get("more_body", False) and self._drainable(None):
                # the answer's last part waits until the refused body is read (see Settings.max_drain_bytes)
                await send({**message, "more_body": True})
                await self._drain(receive)
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        st: AppState = scope["app"].state.trimvlm
        try:
            await self.app(scope, limited_receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            state = scope["state"]
            if endpoint:
                model, level = state.get("model", "none"), state.get("level", "none")
                exemplar = {"trace_id": state["trace_id"]} if "trace_id" in state else None  # tracing on
                st.metrics.request_duration.labels(endpoint, model, level, str(status)).observe(seconds, exemplar)
                st.metrics.requests.labels(endpoint, model, level, str(status)).inc()
                if status >= 400:
                    st.metrics.failures.labels(endpoint, state.get("error_code", "http_error")).inc()
                deadline = state.get("deadline")
                if deadline is not None and (status == 504 or time.perf_counter() > deadline):
                    st.metrics.deadline_misses.labels(endpoint, level).inc()
            fields = {
                "request_id": rid,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "ms": round(1000 * seconds, 3),
            }
            for key in ("model", "level", "error_code", "trace_id"):
                if key in state:
                    fields[key] = state[key]
            access.info("request", extra={"fields": fields})

    def _drainable(self, pending: int | None) -> bool:
        """Whether to read the rest of a refused body before closing (`pending` bytes of it, None:
        unknown): draining is on and what is left is within its cap."""
        cap = self.settings.max_drain_bytes
        return cap > 0 and self.settings.drain_timeout_s > 0 and (pending is None or pending <= cap)

    async def _drain(self, receive) -> None:
        """Read and discard the request body until it ends, up to `max_drain_bytes` or for
        `drain_timeout_s` (a slow client cannot hold the connection longer), as nginx's lingering
        close does. Closing while the client still sends makes the kernel answer with a reset, which
        can reach the client before it has read the answer (urllib, requests: "connection reset by
        peer" instead of the 413). Nothing is kept: each chunk is dropped as it comes."""
        cap, drained = self.settings.max_drain_bytes, 0
        try:
            async with asyncio.timeout(self.settings.drain_timeout_s):
                while drained <= cap:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    drained += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            pass

    async def _reject(self, scope, send, rid, t0, status, code, message, drain=None):
        """Answer an oversized body without running the app. `drain`: the request's receive, to read
        and discard the body after the answer; the connection is closed after either way."""
        shaped = error_response(scope["path"], status, code, message)  # OpenAI / KServe v2 routes: their shape
        status, payload = shaped if shaped is not None else (status, error_body(code, message))
        body = json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": drain is not None})
        if drain is not None:
            await self._drain(drain)
            await send({"type": "http.response.body", "body": b""})
        endpoint = endpoint_of(scope["path"])
        if endpoint:
            st: AppState = scope["app"].state.trimvlm
            st.metrics.failures.labels(endpoint, code).inc()
            st.metrics.requests.labels(endpoint, "none", "none", str(status)).inc()
        access.info("request", extra={"fields": {"request_id": rid, "path": scope["path"], "status": status, "error_code": code}})


def freeze_heap() -> None:
    """Move what start-up allocated (models' metadata, tokenizers, FastAPI's routes and schemas, the
    libraries) out of the cyclic garbage collector's sight: its full collections, triggered by the
    allocations every request makes, otherwise walk all of it again and again on the event loop.
    Objects made later are collected as before."""
    gc.collect()
    gc.freeze()


async def require_api_key(request: Request) -> None:  # async: a sync dependency costs a thread hop
    key = request.app.state.trimvlm.settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise ServiceError(
            "unauthorized", 401, "missing or wrong API key (Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"}
        )


def _error(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    request.state.error_code = code
    # the OpenAI-compatible and Open Inference Protocol routes answer in their protocol's error shape
    shaped = error_response(request.url.path, status, code, message, getattr(request.state, "error_param", None))
    if shaped is not None:  # the code too, in a header: a KServe v2 error is a bare message
        return JSONResponse(shaped[1], status_code=shaped[0], headers={**(headers or {}), "X-Error-Code": code})
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def create_app(settings: Settings | None = None, on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app. Models load in the background, so /healthz answers during warm-up. If loading fails,
    /readyz reports the error; `on_load_error(error)` (given by `trimvlm serve` under
    `exit_on_load_error`) is called too, to stop the server."""
    settings = settings or Settings()
    configure_logging(settings)
    st = AppState.create(settings)

    tasks: list[asyncio.Task] = []

    async def connect_gallery(first: bool) -> bool:
        """A shared gallery's database must answer before the service is ready; never fatal."""
        try:
            await asyncio.get_running_loop().run_in_executor(st.preprocess_pool, st.connect_galleries)
            return True
        except Exception:
            if first:
                log.error(
                    "not ready: %s; /readyz answers 503 until it answers (retrying every %g s)",
                    st.gallery_error,
                    settings.gallery_retry_s,
                )
            return False

    async def retry_gallery() -> None:
        while not await connect_gallery(first=False):
            await asyncio.sleep(settings.gallery_retry_s)
        log.info("ready: %s (default %s); gallery at %s answers", sorted(st.servers), st.default, settings.gallery_url)

    async def load() -> None:
        loop = asyncio.get_running_loop()
        try:
            # its own thread, at worker priority: ONNX Runtime's thread pools inherit it
            with ThreadPoolExecutor(1, "load", initializer=lower_priority, initargs=(settings.worker_nice,)) as loader:
                await loop.run_in_executor(loader, st.load_models)
            for srv in st.servers.values():
                await srv.start()
            st.metrics.set_build_info(models=",".join(st.servers), default=st.default or "")
            if settings.gc_freeze:
                freeze_heap()
            if settings.gallery_backend != "embedded" and not await connect_gallery(first=True):
                tasks.append(asyncio.create_task(retry_gallery()))
                return
            log.info("ready: %s (default %s)", sorted(st.servers), st.default)
        except Exception as e:  # readiness reports it; liveness stays up so the error can be read
            st.load_error = f"{type(e).__name__}: {e}"
            if on_load_error is None:
                log.exception("model loading failed")
            else:  # the server stops: one line (the traceback only at debug level)
                log.error("model loading failed: %s", st.load_error, exc_info=log.isEnabledFor(logging.DEBUG))
                on_load_error(st.load_error)
        finally:
            st.loading = False

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load())
        yield
        await task if not task.done() else None
        for t in tasks:
            t.cancel()
        for srv in st.servers.values():
            await srv.stop()  # finishes queued work first (graceful shutdown)
        for gallery in st.galleries.values():
            gallery.close()  # saves the index snapshot and releases the folder lock
        st.preprocess_pool.shutdown(wait=True)
        st.inference_pool.shutdown(wait=True)
        if traces is not None:
            traces.shutdown()  # export the spans still buffered
        if settings.gc_freeze:
            gc.unfreeze()  # an app made again in this process (tests) must not keep this one's heap

    from service.tracing import fastapi_telemetry  # imports no OpenTelemetry

    app = TrimVLMApp(
        **fastapi_telemetry(settings.tracing),
        title="TrimVLM",
        version=__version__,
        summary="Visual question answering, captioning and image-text retrieval with per-request adaptive compute.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from service/routes/docs.py: assets served locally, not from a CDN
        redoc_url=None,
    )
    app.state.trimvlm = st

    @app.exception_handler(ServiceError)  # every refusal the service raises (images, gallery, levels, queues, ...)
    async def service_error(request: Request, e: ServiceError):
        return _error(request, e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        # Routes with a typed JSON body (retrieval): the same statuses as the routes that parse their own
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return _error(request, 400, "invalid_json", f"request body is not valid JSON: {detail}")
        ctype = request.headers.get("content-type", "")
        if ctype and not ctype.startswith("application/json") and tuple(first["loc"])[:1] == ("body",):
            return _error(request, 415, "unsupported_media_type", f"send application/json, not {ctype}")
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return _error(request, 422, "invalid_request", f"{where}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}  # 400: unparsable body or multipart
        # e.headers: a 405 carries the Allow header RFC 9110 requires
        return _error(request, e.status_code, codes.get(e.status_code, "http_error"), str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, e: ClientDisconnected):
        request.state.error_code = "client_disconnected"
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(request, 500, "internal_error", "internal server error (logged with the request id)")

    auth = [Depends(require_api_key)]
    app.include_router(ops.router)
    docs.install(app)  # /docs, /redoc (assets from the fastapi-offline package), /favicon.ico
    app.include_router(vqa.router, dependencies=auth)
    app.include_router(caption.router, dependencies=auth)
    app.include_router(retrieval.router, dependencies=auth)
    # Protocols other clients speak (docs/PROTOCOLS.md): OpenAI-compatible, Open Inference Protocol (KServe v2)
    app.include_router(openai_routes.router, dependencies=auth)
    app.include_router(openai_routes.alias, dependencies=auth)
    app.include_router(openai_routes.models_router)
    app.include_router(kserve.router)  # metadata and readiness open (as /v1/models, /v2/health/*)
    app.include_router(kserve.infer_router, dependencies=auth)
    if settings.demo_page:
        from service.routes import demo

        app.include_router(demo.router)
    # innermost of the app's middleware: the hot task endpoints skip routing (service/direct_routes.py)
    app.add_middleware(
        DirectRoutes, fastapi=app, routes=[*vqa.router.routes, *caption.router.routes], guards=tuple(d.dependency for d in auth)
    )
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"]
        )
    traces = None
    if settings.tracing:  # OpenTelemetry (service/tracing.py): inside RequestContext, which logs the trace id
        from service.tracing import Tracing

        traces = Tracing()
        app.add_middleware(traces.middleware)
    app.add_middleware(RequestContext, settings=settings)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus the request bodies of routes that parse JSON-or-multipart
    themselves (one item, a batch of items, or a multipart upload)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    from pydantic import TypeAdapter

    from service import schemas

    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for ops_ in spec["paths"].values():
        for op in ops_.values():
            extra = op.pop("x-trimvlm-body", None)
            if not extra:
                continue
            single, batch, multipart = extra
            for name in (single, batch):
                schema = TypeAdapter(getattr(schemas, name)).json_schema(ref_template="#/components/schemas/{model}")
                for dname, d in schema.pop("$defs", {}).items():
                    components.setdefault(dname, d)
                components[name] = schema
            content = {
                "application/json": {
                    "schema": {"oneOf": [{"$ref": f"#/components/schemas/{single}"}, {"$ref": f"#/components/schemas/{batch}"}]},
                    "examples": {"one": {"value": getattr(schemas, single).model_config["json_schema_extra"]["examples"][0]}},
                }
            }
            if multipart:
                props = {k: v for k, v in components[single]["properties"].items() if k != "image"}
                content["multipart/form-data"] = {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "string", "format": "binary"}, **props},
                        "required": ["image"],
                    }
                }
            op["requestBody"] = {"required": True, "content": content}
    # Every operation answers its errors as ErrorResponse (400/401/404/405/413/415/422/429/503/504), never
    # FastAPI's HTTPValidationError (the validation handler above rewrites those): declare it so, for every
    # operation, so schema-driven clients and fuzzers (tests/reliability/test_fuzz.py) see the real shapes.
    error = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for ops_ in spec["paths"].values():
        for op in ops_.values():
            responses = op.setdefault("responses", {})
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                del responses["422"]
            responses.setdefault("default", error)  # the protocol routes declare their own error shape
    for name, schema in kserve.openapi_components().items():  # the v2 infer body (read by the route itself)
        components.setdefault(name, schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components["ErrorResponse"] = TypeAdapter(schemas.ErrorResponse).json_schema(ref_template="#/components/schemas/{model}")
    for dname, d in components["ErrorResponse"].pop("$defs", {}).items():
        components.setdefault(dname, d)
    app.openapi_schema = spec
    return spec
