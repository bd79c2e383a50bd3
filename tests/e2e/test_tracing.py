"""OpenTelemetry tracing (TRIMVLM_TRACING=true) with the SDK's in-memory exporter: the span tree and its
attributes for /vqa, /caption, a batch request and the protocol routes, the client's W3C traceparent
continued, the trace id in the access log line, exemplars on the request-duration histogram; with tracing
off nothing is traced or imported; and, on a real server, OTLP export configured by the OTEL_* variables."""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.e2e.conftest import REPO, ready_client, server_env, settings_for
from tests.e2e.test_service import BLUE, RED, encode, shape

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

CIRCLE = base64.b64encode(encode(shape("circle", RED))).decode()
SQUARE = base64.b64encode(encode(shape("rectangle", BLUE))).decode()
QUESTION = "what shape is in the image?"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """An in-memory exporter on the process's tracer provider (set once per process, so shared if another
    module set one already): the app uses an installed SDK provider as it is."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture(scope="module")
def client(exporter, tmp_path_factory):
    with ready_client(
        settings_for(tmp_path_factory.mktemp("traced"), tracing=True, max_queue_delay_ms=20, log_level="info")
    ) as c:
        yield c


class Access(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record):
        self.lines.append(getattr(record, "fields", {}))


def traced(exporter, client, method: str, path: str, **kwargs):
    """(response, root span, its children by name) of one request."""
    exporter.clear()
    r = client.request(method, path, **kwargs)
    spans = exporter.get_finished_spans()
    [root] = [s for s in spans if s.parent is None or s.parent.is_remote]
    children: dict[str, list] = {}
    for s in spans:
        if s is not root:
            assert s.parent.span_id == root.context.span_id and s.context.trace_id == root.context.trace_id, s.name
            assert root.start_time <= s.start_time <= s.end_time <= root.end_time, s.name
            children.setdefault(s.name, []).append(s)
    return r, root, children


def test_vqa_span_tree(exporter, client):
    r, root, spans = traced(exporter, client, "POST", "/vqa", json={"image": CIRCLE, "question": QUESTION, "compute": "fast"})
    assert r.status_code == 200 and r.json()["answer"] == "circle"
    assert root.name == "POST /vqa" and root.kind == trace.SpanKind.SERVER
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["http.route"] == "/vqa"
    assert root.attributes["trimvlm.model"] == "trimvlm-default/1" and root.attributes["trimvlm.level"] == "fast"
    assert root.attributes["trimvlm.request_id"] == r.headers["x-request-id"]
    assert {k: len(v) for k, v in spans.items()} == {
        "parse": 1,
        "preprocess": 1,
        "queue wait": 1,
        "inference": 1,
        "postprocess": 1,
    }
    [inference] = spans["inference"]
    assert inference.attributes["trimvlm.level"] == "fast" and inference.attributes["trimvlm.batch_size"] == 1
    assert inference.attributes["trimvlm.batcher"] == "vqa/fast"
    order = [spans[n][0] for n in ("parse", "preprocess", "queue wait", "inference", "postprocess")]
    assert all(a.end_time <= b.start_time + 1000 for a, b in zip(order, order[1:], strict=False)), [
        (s.name, s.start_time) for s in order
    ]


def test_caption_span_tree(exporter, client):
    r, root, spans = traced(exporter, client, "POST", "/caption", json={"image": SQUARE})
    assert r.status_code == 200 and root.name == "POST /caption"
    assert len(spans["queue wait"]) == len(spans["inference"]) == 2  # the vision encoder, then the decoder
    assert sorted(s.attributes["trimvlm.batcher"] for s in spans["inference"]) == ["caption", "vision"]
    assert all(s.attributes["trimvlm.level"] == "full" for s in spans["inference"])
    assert len(spans["parse"]) == len(spans["preprocess"]) == len(spans["postprocess"]) == 1


def test_batch_request_spans_and_batch_size(exporter, client):
    items = [{"image": img, "question": QUESTION, "compute": "full"} for img in (CIRCLE, SQUARE, CIRCLE)]
    r, root, spans = traced(exporter, client, "POST", "/vqa", json={"items": items})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert len(spans["parse"]) == 1 and len(spans["preprocess"]) == len(spans["queue wait"]) == len(spans["inference"]) == 3
    sizes = [s.attributes["trimvlm.batch_size"] for s in spans["inference"]]
    assert sizes == [3, 3, 3], sizes  # one batch of the three items (a 20 ms batch window)
    assert len({(s.start_time, s.end_time) for s in spans["inference"]}) == 1  # the same batch, seen by each item


def test_protocol_routes_are_traced(exporter, client):
    chat = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + CIRCLE}}]}
        ]
    }
    r, root, spans = traced(exporter, client, "POST", "/v1/chat/completions", json=chat)
    assert r.status_code == 200 and root.name == "POST /v1/chat/completions" and len(spans["inference"]) == 2
    infer = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [CIRCLE]}]}
    r, root, spans = traced(exporter, client, "POST", "/v2/models/trimvlm-default/infer", json=infer)
    assert r.status_code == 200 and root.name == "POST /v2/models/{name}/infer" and {"parse", "inference"} <= set(spans)
    # a refusal: the root span says so, no stage after the one that refused
    r, root, spans = traced(exporter, client, "POST", "/vqa", json={"image": "AAAA", "question": QUESTION})
    assert r.status_code >= 400 and root.attributes["trimvlm.error_code"] == r.json()["error"]["code"]
    assert "inference" not in spans


def test_traceparent_trace_id_in_log_and_exemplars(exporter, client):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    handler = Access()
    logging.getLogger("trimvlm.access").addHandler(handler)
    try:
        headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
        r, root, _ = traced(exporter, client, "POST", "/vqa", json={"image": CIRCLE, "question": QUESTION}, headers=headers)
    finally:
        logging.getLogger("trimvlm.access").removeHandler(handler)
    assert r.status_code == 200
    assert format(root.context.trace_id, "032x") == trace_id and format(root.parent.span_id, "016x") == parent_id
    [line] = [f for f in handler.lines if f.get("path") == "/vqa"]
    assert line["trace_id"] == trace_id and line["request_id"] == r.headers["x-request-id"]
    om = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert f'# {{trace_id="{trace_id}"}}' in om.text and "vlm_request_duration_seconds_bucket" in om.text
    plain = client.get("/metrics")  # the text format as before for everyone else
    assert plain.headers["content-type"].startswith("text/plain") and "trace_id" not in plain.text


def test_tracing_off_imports_and_traces_nothing(tmp_path):
    """TrimVLM imports no OpenTelemetry SDK or exporter (FastAPI itself may import the API package)."""
    code = (
        "import sys\n"
        "from tests.e2e.conftest import ready_client, settings_for\n"
        "from pathlib import Path\n"
        f"with ready_client(settings_for(Path({str(tmp_path)!r}))) as c:\n"
        "    assert c.post('/caption', json={'image': " + repr(CIRCLE) + "}).status_code == 200\n"
        "assert not [m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))], 'imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_otlp_export_by_otel_variables(start_server):
    """A real server exports its spans over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT, named by OTEL_SERVICE_NAME."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    collector = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        srv = start_server(
            TRIMVLM_TRACING="true",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.server_port}",
            OTEL_SERVICE_NAME="trimvlm-under-test",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        import httpx

        r = httpx.post(srv.url + "/vqa", json={"image": CIRCLE, "question": QUESTION}, timeout=30)
        assert r.status_code == 200
        deadline = time.monotonic() + 20
        names: set[str] = set()
        while time.monotonic() < deadline and not {"POST /vqa", "inference"} <= names:
            time.sleep(0.2)
            names = {s.name for req in received for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans}
        assert {"POST /vqa", "parse", "preprocess", "queue wait", "inference", "postprocess"} <= names, names
        services = {
            a.value.string_value
            for req in received
            for rs in req.resource_spans
            for a in rs.resource.attributes
            if a.key == "service.name"
        }
        assert services == {"trimvlm-under-test"}
    finally:
        collector.shutdown()
