"""The demo page at `/`, end to end: the real server (`trimvlm serve` as a subprocess on a free
loopback port, on the exported models under models/, with an API key) driven by headless
Chromium through Playwright. Playwright drives the system browser (Debian's `chromium`, or the
binary named by TRIMVLM_CHROMIUM); nothing is downloaded. Skipped when no Chromium is installed."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO

API_KEY = "e2e-demo-key"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
UI_TIMEOUT_MS = 30_000  # the first inference on a busy 2-core machine


def chromium_binary() -> str | None:
    explicit = os.environ.get("TRIMVLM_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def models_dir() -> Path:
    return Path(os.environ.get("TRIMVLM_E2E_MODELS", REPO / "models"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def red_circle_png() -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=(220, 30, 30))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_binary()
    if path is None:
        pytest.skip(
            "no Chromium binary (looked for TRIMVLM_CHROMIUM, " + ", ".join(CHROMIUM_NAMES) + " on PATH); "
            "install the Debian package: apt-get install -y chromium"
        )
    return path


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):  # after the Chromium check: no server start just to skip
    """`trimvlm serve` on a free port; yields its base URL once /readyz says 200."""
    models = models_dir()
    if not any(models.glob("*/*/manifest.json")):
        pytest.skip(f"no exported model (*/*/manifest.json) under {models}: export one with `trimvlm export`")
    tmp = tmp_path_factory.mktemp("demo-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMVLM_") or k == "TRIMVLM_CACHE"}
    env.update(
        PYTHONPATH=str(REPO),
        TRIMVLM_API_KEY=API_KEY,
        TRIMVLM_DEMO_PAGE="true",
        TRIMVLM_LOG_JSON="false",
        TRIMVLM_GALLERY_DIR=str(tmp / "gallery"),
        TRIMVLM_INTRA_OP_THREADS="1",  # a shared 2-core machine
    )
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port), "--models", str(models)]
    with open(log_path, "wb") as log:  # cwd=tmp: no .env of the developer's is read
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + 120  # load + warm-up on a busy machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode} before it was ready:\n{log_tail()}")
            try:
                r = httpx.get(base + "/readyz", timeout=2)
                if r.status_code == 200:
                    break
                if r.status_code == 503 and r.json().get("status") == "unavailable":
                    pytest.fail(f"the server could not load the models: {r.json().get('error')}\n{log_tail()}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within 120 s:\n{log_tail()}")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(chromium):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Chromium is installed but playwright is not: pip install -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            try:  # a renderer that crashes (e.g. no font at all) fails here, with a hint, not mid-test
                smoke = b.new_page()
                smoke.set_content("<p>ok</p>")
                assert smoke.inner_text("p") == "ok"
                smoke.close()
            except Exception as e:
                pytest.fail(f"{chromium} starts but cannot render a page ({e}); is a font installed (fonts-dejavu-core)?")
            yield b
        finally:
            b.close()


def _app(tmp_path, **overrides):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    # No `with`: the lifespan (model loading) does not run; the page needs no model.
    return TestClient(create_app(Settings(models_dir=tmp_path, gallery_dir=tmp_path / "g", log_json=False, **overrides)))


def test_page_and_assets_are_served_self_contained(tmp_path):
    """Runs without Chromium or a model: the page, its two assets, the headers, nothing else."""
    client = _app(tmp_path, api_key="k")  # the page itself needs no key
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", r.text), "the page must not load external assets"
    assert not re.search(r"<script>|\son[a-z]+\s*=", r.text), "no inline script or handlers (the CSP forbids them)"
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        a = client.get(f"/static/{name}")
        assert a.status_code == 200 and kind in a.headers["content-type"], name
        assert f'"static/{name}"' in r.text  # relative: works under a path prefix too
        assert not re.search(r"https?://", a.text), f"{name} must not reference other hosts"
    for bad in ("/static/nope.js", "/static/index.html", "/static/..%2Fapp.py", "/static/%2e%2e%2fsettings.py"):
        missing = client.get(bad)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", bad
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/static/{name}" not in paths


def test_demo_page_can_be_turned_off(tmp_path):
    client = _app(tmp_path, demo_page=False)
    assert client.get("/").status_code == 404
    assert client.get("/static/app.js").status_code == 404


def test_demo_page_in_headless_chromium(server, browser, tmp_path):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page_errors, csp_violations, foreign = [], [], []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.on("console", lambda m: csp_violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None)
    try:
        page.goto(server + "/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page).to_have_title("TrimVLM demo")

        # Every control has a label (and so an accessible name).
        unlabelled = page.eval_on_selector_all("input, select", "els => els.filter(e => !e.labels.length).map(e => e.id)")
        assert unlabelled == []

        # The models list comes from GET /v1/models (no key needed) and the default is selected.
        expect(page.locator("#model option:not([value=''])")).not_to_have_count(0)
        assert page.locator("#model").input_value() != ""

        # Submitting without an image: a readable error, no request.
        page.fill("#question", "what shape is in the image?")
        page.click("#ask")
        error = page.locator("#vqa-out .error[role=alert]")
        expect(error).to_be_visible()
        expect(error).to_contain_text("no_image")
        expect(error).to_contain_text("choose an image first")

        # Upload: a preview appears.
        png = tmp_path / "red-circle.png"
        png.write_bytes(red_circle_png())
        page.set_input_files("#image-file", str(png))
        expect(page.locator("#preview")).to_be_visible()
        expect(page.locator("#preview-caption")).to_contain_text("red-circle.png")
        assert page.eval_on_selector("#preview", "img => img.naturalWidth") == 64

        # The server has an API key: without it, its JSON error is shown (code, status, message).
        page.click("#ask")
        expect(error).to_contain_text("unauthorized")
        expect(error).to_contain_text("HTTP 401")
        expect(error).to_contain_text("missing or wrong API key")

        # With the key and a compute level chosen: the answer, the level, FLOPs, tokens, latencies.
        page.fill("#api-key", API_KEY)
        page.select_option("#compute", "balanced")
        page.click("#ask")
        out = page.locator("#vqa-out")
        expect(out.locator(".answer .value")).to_have_text("circle")
        expect(out.locator("[data-field=level]")).to_contain_text("balanced")
        expect(out.locator("[data-field=flops]")).to_have_text(re.compile(r"^0\.\d\d$"))
        expect(out.locator("[data-field=tokens]")).to_have_text(re.compile(r"^\d+ / \d+$"))
        expect(out.locator("[data-field=latency]")).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
        expect(out.locator("[data-field=rtt]")).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
        expect(out.locator(".error")).to_have_count(0)

        # Caption.
        page.click("#caption-btn")
        caption = page.locator("#caption-out .answer .value")
        expect(caption).to_have_text(re.compile(r"\w+"))
        expect(page.locator("#caption-out [data-field=level]")).not_to_be_empty()

        # Add to the gallery, then search it (submitted with Enter: the forms work from the keyboard).
        page.click("#index-btn")
        expect(page.locator("#index-out")).to_contain_text("Added")
        expect(page.locator("#index-out")).to_contain_text("1 image(s)")
        page.fill("#search-text", "a red circle")
        page.press("#search-text", "Enter")
        hits = page.locator("#search-out .result")
        expect(hits).to_have_count(1)
        expect(hits.first).to_contain_text("red-circle.png")
        expect(hits.first.locator("img.thumb")).to_be_visible()
        expect(page.locator("#search-out [data-field=latency]")).to_have_text(re.compile(r" ms$"))
    finally:
        context.close()
    assert not page_errors, page_errors
    assert not csp_violations, csp_violations
    assert not foreign, f"the page requested other origins: {foreign}"
