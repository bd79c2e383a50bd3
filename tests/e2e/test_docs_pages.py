"""/docs (Swagger UI) and /redoc (ReDoc) work offline: their scripts and stylesheets come from this
server (the fastapi-offline package), not a CDN, under a strict Content-Security-Policy; and
/favicon.ico is served. In process for the HTML, headers and assets; then, where Chromium is
installed, a real server on loopback with every request to another host refused, checking that
both pages render the API's operations with no CSP violation. No model is needed: the pages
only read /openapi.json."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.e2e.conftest import settings_for
from tests.e2e.test_demo_page import chromium_binary, free_port

JS_TYPES = ("text/javascript", "application/javascript")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    # not entered as a context manager: no lifespan, so no model loads; the pages do not need one
    return TestClient(create_app(settings_for(tmp, models_dir=tmp / "no-models")))


def asset_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)


def directives(policy: str) -> dict[str, str]:
    return {d.strip().split(" ", 1)[0]: d.strip().partition(" ")[2] for d in policy.split(";") if d.strip()}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = asset_urls(r.text)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert "cdn" not in r.text.lower() and "fonts.googleapis" not in r.text
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        kind = asset.headers["content-type"]
        if url.endswith(".js"):
            assert kind.startswith(JS_TYPES), (url, kind)
            assert len(asset.content) > 100_000  # the real bundle, not a stub
        elif url.endswith(".css"):
            assert kind.startswith("text/css"), (url, kind)
        elif url.endswith(".ico"):
            assert kind == "image/x-icon"
        elif url == "/openapi.json":
            assert asset.json()["info"]["title"] == "TrimVLM"


def test_swagger_page_csp_allows_only_its_own_inline_script(client):
    r = client.get("/docs")
    policy = directives(r.headers["content-security-policy"])
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert policy["style-src"] == "'self'" and policy["connect-src"] == "'self'"
    [nonce] = re.findall(r"'nonce-([^']+)'", policy["script-src"])
    scripts = re.findall(r"<script([^>]*)>", r.text)
    assert scripts and all("src=" in s or f'nonce="{nonce}"' in s for s in scripts), scripts
    assert "'unsafe-inline'" not in policy["script-src"] and "'unsafe-eval'" not in policy["script-src"]
    again = directives(client.get("/docs").headers["content-security-policy"])
    assert again["script-src"] != policy["script-src"]  # a fresh nonce per response
    assert r.headers["x-content-type-options"] == "nosniff"


def test_redoc_page_csp(client):
    policy = directives(client.get("/redoc").headers["content-security-policy"])
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self' 'unsafe-inline'"  # ReDoc writes its styles at run time


def test_demo_page_csp_unchanged(tmp_path):
    """The docs pages' policies are their own: the demo page keeps its stricter one."""
    from service.routes.demo import CSP

    app = TestClient(create_app(settings_for(tmp_path, models_dir=tmp_path / "none", demo_page=True)))
    r = app.get("/")
    assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
    assert "nonce" not in CSP and "unsafe-inline" not in CSP


def test_favicon(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    assert r.content[:4] == b"\x00\x00\x01\x00"  # an ICO file


def test_unknown_asset_is_a_json_404(client):
    r = client.get("/docs/assets/nope.js")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_docs_are_not_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/docs", "/redoc", "/favicon.ico"} & set(paths)


# ---- in a browser, offline -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    if chromium_binary() is None:
        pytest.skip("no Chromium binary (apt-get install -y chromium, or TRIMVLM_CHROMIUM)")
    import uvicorn

    tmp = tmp_path_factory.mktemp("docs-live")
    port = free_port()
    app = create_app(settings_for(tmp, models_dir=tmp / "no-models"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield base
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(live_server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_binary(), headless=True, args=["--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def open_offline(browser, base: str, path: str):
    """A page that may reach only `base`: anything else is aborted and recorded."""
    page = browser.new_page()
    elsewhere, problems = [], []

    def route(r):
        if r.request.url.startswith(base + "/") or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            elsewhere.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(base + path)
    return page, elsewhere, problems


def test_swagger_ui_renders_offline(browser, live_server):
    page, elsewhere, problems = open_offline(browser, live_server, "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/vqa", "/caption", "/v1/models"} <= {p.strip().replace("\u200b", "") for p in paths}, paths
    page.locator(".opblock-summary-path", has_text="/v1/models").first.click()  # expands: the operation's details
    page.wait_for_selector(".opblock-body", timeout=10_000)
    assert not elsewhere, elsewhere
    assert not problems, problems  # a CSP violation or a script error shows here
    page.close()


def test_redoc_renders_offline(browser, live_server):
    page, elsewhere, problems = open_offline(browser, live_server, "/redoc")
    page.wait_for_selector("[data-section-id^='operation/']", timeout=30_000)  # one section per operation
    assert page.locator("[data-section-id^='operation/']").count() >= 5
    assert page.locator("h1").first.inner_text().startswith("TrimVLM")
    assert page.get_by_text("/v1/models", exact=True).count() >= 1
    assert not elsewhere, elsewhere
    # ReDoc's sidebar credit links an image on its CDN: the policy blocks it (no request leaves) and
    # ReDoc drops the image on the error; anything else is a problem
    credit = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    assert not [p for p in problems if credit not in p], problems
    assert page.locator(f"img[src='{credit}']").count() == 0
    page.close()
