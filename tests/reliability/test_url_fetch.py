"""Image URLs, end to end through POST /vqa: the real app with URLs enabled
(private targets not allowed), a real HTTP server the test starts on loopback, and two seams of
service/images.py patched: the resolver (names of our choosing resolve to public, private,
loopback and link-local addresses) and the TCP connect (the made-up public address reaches the
loopback server; any other connection is recorded as a failure).

tests/unit/test_images.py covers fetch_url itself (every private range, IPv6 forms, TLS, timing);
this module checks that the service refuses all of it with the documented JSON errors and keeps
serving: redirects to private/loopback/link-local targets, names that resolve there, oversize,
slow and trickling responses, non-image content types, and a bomb behind a URL."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from PIL import Image

import service.images as images
from tests.e2e.conftest import LIMITS, ready_client, settings_for
from tests.e2e.test_service import RED_CIRCLE_PNG, SHAPE_Q, assert_error, assert_serves, encode

FAKE_PUBLIC = "93.184.216.34"  # what our resolver answers for *.public.test; the connector sends it to loopback
NAMES = {
    "img.public.test": [FAKE_PUBLIC],
    "internal.test": ["10.0.0.7"],
    "loopback.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "v6-loopback.test": ["::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "mixed.test": [FAKE_PUBLIC, "127.0.0.1"],  # one bad answer spoils the name
}
URL_TIMEOUT_S = 1.0
BOMB = encode(Image.new("1", (20_000, 20_000)), "PNG", optimize=True)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str | None = None, headers: dict | None = None) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        parts = urlsplit(self.path)
        try:
            if parts.path == "/ok.png":
                self._send(200, RED_CIRCLE_PNG, "image/png")
            elif parts.path == "/octet":
                self._send(200, RED_CIRCLE_PNG, "application/octet-stream")
            elif parts.path == "/page.html":
                self._send(200, b"<!doctype html><html><body>not an image</body></html>", "text/html; charset=utf-8")
            elif parts.path == "/png-labelled-html":
                self._send(200, RED_CIRCLE_PNG, "text/html")
            elif parts.path == "/data.json":
                self._send(200, b'{"image": "no"}', "application/json")
            elif parts.path == "/text-as-image":
                self._send(200, b"plain text pretending to be a PNG\n" * 4, "image/png")
            elif parts.path == "/bomb.png":
                self._send(200, BOMB, "image/png")
            elif parts.path == "/redirect":
                self._send(302, headers={"Location": parse_qs(parts.query)["to"][0]})
            elif parts.path == "/slow":
                time.sleep(3 * URL_TIMEOUT_S)
                self._send(200, RED_CIRCLE_PNG, "image/png")
            elif parts.path == "/trickle":  # alive, but never finishing within the deadline
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                for _ in range(40):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif parts.path == "/declared-huge":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
            elif parts.path == "/endless":  # no Content-Length: the service must count
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                for _ in range(400):
                    self.wfile.write(b"\0" * 16384)
            else:
                self._send(404, b"nope", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the service gave up on purpose


@pytest.fixture(scope="module")
def origin():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def url_client(tmp_path_factory, origin):
    """The app with URLs on, private targets off, and the resolver/connect seams patched."""
    connected: list[str] = []
    real_resolve = images.resolve_host

    def resolve(host: str, port: int) -> list[str]:
        return NAMES[host] if host in NAMES else real_resolve(host, port)

    def connect(ip: str, port: int, timeout: float) -> socket.socket:
        connected.append(ip)
        if ip != FAKE_PUBLIC:
            raise AssertionError(f"connected to unchecked address {ip}")
        return socket.create_connection(("127.0.0.1", origin), timeout=timeout)

    settings = settings_for(
        Path(tmp_path_factory.mktemp("urls")), **LIMITS, allow_urls=True, url_timeout_s=URL_TIMEOUT_S, warmup=False
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "resolve_host", resolve)
        mp.setattr(images, "_connect_tcp", connect)
        with ready_client(settings) as c:
            c.connected = connected
            yield c
    assert set(connected) <= {FAKE_PUBLIC}, connected


def _ask(client, url: str):
    return client.post("/vqa", json={"image": url, "question": SHAPE_Q})


def test_public_url_is_fetched_and_answered(url_client, origin):
    base = f"http://img.public.test:{origin}"
    for path in ("/ok.png", "/octet", f"/redirect?to={quote('/ok.png')}"):
        r = _ask(url_client, base + path)
        assert r.status_code == 200 and r.json()["answer"] == "circle", (path, r.text)


def _private_targets(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/ok.png",
        f"http://localhost:{port}/ok.png",  # the system resolver's own answer
        f"http://[::1]:{port}/ok.png",
        f"http://2130706433:{port}/ok.png",  # 127.0.0.1 as one number
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/a.png",
        f"http://loopback.test:{port}/ok.png",
        "http://metadata.test/latest/meta-data/",
        "http://internal.test/a.png",
        f"http://v6-loopback.test:{port}/ok.png",
        f"http://mapped.test:{port}/ok.png",
        f"http://mixed.test:{port}/ok.png",
    ]


def test_private_loopback_and_link_local_targets_are_refused(url_client, origin):
    """Addresses and names that resolve to them, directly: 400 url_not_allowed, nothing connected."""
    before = len(url_client.connected)
    for url in _private_targets(origin):
        error = assert_error(_ask(url_client, url), 400, "url_not_allowed")
        assert "non-public" in error["message"], (url, error)
    assert len(url_client.connected) == before  # refused before any connection
    assert_serves(url_client)


def test_redirects_to_private_targets_are_refused(url_client, origin):
    """A public first hop redirecting inside: every hop is re-checked, the redirect is refused."""
    base = f"http://img.public.test:{origin}"
    for target in [*_private_targets(origin), "file:///etc/passwd", "gopher://127.0.0.1/"]:
        assert_error(_ask(url_client, f"{base}/redirect?to={quote(target, safe='')}"), 400, "url_not_allowed")
    assert_serves(url_client)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/page.html", 415, "unsupported_format"),
        ("/png-labelled-html", 415, "unsupported_format"),  # the Content-Type decides, even for PNG bytes
        ("/data.json", 415, "unsupported_format"),
        ("/text-as-image", 415, "not_an_image"),  # an image type, but the bytes are not one
        ("/declared-huge", 413, "image_too_large"),
        ("/endless", 413, "image_too_large"),
        ("/bomb.png", 413, "too_many_pixels"),
        ("/missing", 502, "url_fetch_failed"),
        ("/slow", 504, "url_timeout"),
        ("/trickle", 504, "url_timeout"),
    ],
)
def test_bad_responses_are_refused(url_client, origin, path, status, code):
    start = time.monotonic()
    assert_error(_ask(url_client, f"http://img.public.test:{origin}{path}"), status, code)
    assert time.monotonic() - start < URL_TIMEOUT_S + 2.0, path  # the deadline covers the whole fetch
    assert_serves(url_client)
