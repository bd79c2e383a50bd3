"""API key on a real server: every task route answers 401 without the right key,
and neither the key nor a wrong key a client sent ever reaches the server's log (captured at
debug level, every line, including 4xx/5xx error paths and shutdown) or its public outputs.
tests/e2e/test_service.py::test_api_key covers the 401 shapes in process; this is the log side."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.conftest import LIMITS
from tests.e2e.test_service import RED_CIRCLE, RED_CIRCLE_PNG, SHAPE_Q, assert_clean_exit, assert_error

SECRET = "tvk-7Qm2c9XwZ4pL0s8R-not-in-logs"
WRONG = "tvk-WRONG-Hx51bN6eYt0-not-in-logs-either"
VQA = {"image": RED_CIRCLE, "question": SHAPE_Q}
TASKS = [
    ("POST", "/vqa", {"json": VQA}),
    ("POST", "/caption", {"json": {"image": RED_CIRCLE, "max_length": 4}}),
    ("POST", "/retrieval/rank", {"json": {"image": RED_CIRCLE, "texts": ["a red circle"]}}),
    ("POST", "/retrieval/search", {"json": {"text": "a red circle"}}),
    ("POST", "/retrieval/index", {"json": {"image": RED_CIRCLE, "id": "x"}}),
    ("DELETE", "/retrieval/index/x", {}),
]


@pytest.fixture
def keyed_server(start_server, tmp_path):
    env = {f"TRIMVLM_{k.upper()}": str(v) for k, v in LIMITS.items()}
    return start_server(TRIMVLM_API_KEY=SECRET, TRIMVLM_LOG_LEVEL="debug", TRIMVLM_GALLERY_DIR=str(tmp_path / "gallery"), **env)


def test_api_key_required_and_never_logged(keyed_server):
    srv = keyed_server
    bad_headers = [
        {},
        {"authorization": f"Bearer {WRONG}"},
        {"authorization": f"Basic {SECRET}"},  # the right key, the wrong scheme
        {"authorization": f"Bearer {SECRET}x"},
        {"authorization": f"Bearer {SECRET[:-1]}"},
        {"x-api-key": SECRET},  # not how the key is sent
    ]
    good = {"authorization": f"Bearer {SECRET}"}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        refused = 0
        for method, path, kwargs in TASKS:
            for headers in bad_headers:
                r = c.request(method, path, headers=headers, **kwargs)
                assert_error(r, 401, "unauthorized")
                assert r.headers["www-authenticate"] == "Bearer" and SECRET not in r.text and WRONG not in r.text
                refused += 1
        # The right key: success and the error paths (bad image, oversize body, deadline, unknown path, method)
        assert c.post("/vqa", json=VQA, headers=good).json()["answer"] == "circle"
        r = c.post("/vqa", files={"image": ("c.png", RED_CIRCLE_PNG, "image/png")}, data={"question": SHAPE_Q}, headers=good)
        assert r.status_code == 200, r.text
        assert_error(c.post("/vqa", json={**VQA, "image": "@@@"}, headers=good), 400, "invalid_base64")
        big = {"image": "A" * (LIMITS["max_body_bytes"] + 1), "question": "q"}
        assert_error(c.post("/vqa", json=big, headers=good), 413, "payload_too_large")
        assert_error(c.post("/vqa", json=big, headers={"authorization": f"Bearer {WRONG}"}), 413, "payload_too_large")
        assert_error(c.post("/caption", json={"image": RED_CIRCLE, "deadline_ms": 0.001}, headers=good), 504, "deadline_exceeded")
        assert_error(c.get(f"/no/such/{'path'}", headers=good), 404, "not_found")
        assert_error(c.get("/vqa", headers=good), 405, "method_not_allowed")
        assert_error(c.post("/vqa", content=b"{", headers={**good, "content-type": "application/json"}), 400, "invalid_json")
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/models"):  # open, and no key in them
            r = c.get(path, headers={"authorization": f"Bearer {WRONG}"})
            assert r.status_code == 200 and SECRET not in r.text and WRONG not in r.text, path
    assert_clean_exit(srv)  # everything flushed, shutdown lines included
    log = srv.log_path.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    unauthorized = [x for x in lines if x.get("status") == 401]
    assert len(unauthorized) == refused, (len(unauthorized), refused)  # the refused requests were logged ...
    for word in (SECRET, WRONG, SECRET[:12], WRONG[:12]):
        assert word not in log, f"{word!r} appears in the server log"  # ... without the keys
