"""Fixtures for the service tests against the real app and the real default model
(models/trimvlm-default/1):

- in process: `TestClient(create_app(Settings(...)))` used as a context manager, so the lifespan
  runs (load, warm-up, drain); waits for /readyz 200. Fast; most checks use it.
- real servers: `python -m service serve` as a uvicorn subprocess on a free loopback
  port with TRIMVLM_* settings, for what needs real sockets and signals (concurrency, queue
  bounds, client disconnects, SIGTERM, restarts).

Both are module-scoped or made per test on purpose, so the model loads a few times per run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
DEFAULT_MODEL = "trimvlm-default/1"
READY_TIMEOUT_S = 180.0  # model load + warm-up on a busy 2-core machine

# The in-process app's limits: small enough that the tests can cross each one cheaply.
LIMITS = {
    "max_body_bytes": 512 * 1024,
    "max_image_bytes": 192 * 1024,
    "max_pixels": 4_000_000,
    "max_text_chars": 200,
    "max_items": 16,
}


def settings_for(tmp: Path, **overrides) -> Settings:
    """Settings for an in-process app on the real model repository (no .env file read)."""
    base = {
        "models_dir": MODELS,
        "gallery_dir": tmp / "gallery",
        "demo_page": False,
        "log_level": "warning",
        "intra_op_threads": 1,
        "preprocess_threads": 2,
    }
    return Settings(_env_file=None, **{**base, **overrides})


@contextlib.contextmanager
def ready_client(settings: Settings, timeout_s: float = READY_TIMEOUT_S) -> Iterator[TestClient]:
    """A TestClient with the lifespan running, once /readyz answers 200."""
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            r = client.get("/readyz")
            if r.status_code == 200:
                break
            if r.json().get("error") or time.monotonic() > deadline:
                raise RuntimeError(f"app not ready: {r.status_code} {r.text}")
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """The real default model in process, with the small LIMITS and its own gallery folder."""
    settings = settings_for(tmp_path_factory.mktemp("app"), **LIMITS)
    with ready_client(settings) as c:
        yield c


# ------------------------------------------------------------------------------ real servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**overrides: str) -> dict[str, str]:
    """The environment of a `python -m service serve` subprocess: this checkout's code, one thread
    each, no demo page, and none of the test runner's TRIMVLM_* variables but the cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMVLM_") or k == "TRIMVLM_CACHE"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRIMVLM_INTRA_OP_THREADS="1", TRIMVLM_DEMO_PAGE="false")
    env.update(overrides)
    return env


class ServerProcess:
    """`trimvlm serve` (python -m service serve) on a free loopback port, serving `models` (the
    repository's by default). TRIMVLM_* variables of the test runner are dropped; `env` sets the
    ones a test needs. Logs go to a file (a pipe nobody reads would block the server once full)."""

    def __init__(self, env: dict[str, str], log_path: Path, models: Path | None = None, args: tuple[str, ...] = ()):
        models = MODELS if models is None else models  # read now: tests monkeypatch MODELS
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = server_env(**{"TRIMVLM_LOG_LEVEL": "info", **env})
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--models", str(models), *args]
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2.0)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                return self
            if r is not None and r.json().get("error"):  # loading failed: it will never be ready
                self.kill()
                raise RuntimeError(f"server on {self.url} failed to load: {r.json()['error']}\n{self.log_tail()}")
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"server on {self.url} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (uvicorn's graceful shutdown) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10.0).text


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(TRIMVLM_X="..", ...) -> a ready ServerProcess; any still running at the end is killed."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        srv = ServerProcess({k: str(v) for k, v in env.items()}, tmp_path / f"server-{len(started)}.log")
        started.append(srv)
        return srv.wait_ready()

    yield start
    for srv in started:
        srv.kill()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """A real server, default settings but for a batch window (TRIMVLM_MAX_QUEUE_DELAY_MS): the
    default model's vqa graph takes ~2 ms per item here, less than one HTTP request costs the
    event loop, so with no added wait concurrent requests rarely meet in the queue (mean batch
    1.4-1.75 measured on the shared 2-core machine, too close to call). A 25 ms window makes the
    batches that concurrency offers certain to form, and costs a sequential client nothing but latency."""
    tmp = tmp_path_factory.mktemp("live")
    env = {"TRIMVLM_GALLERY_DIR": str(tmp / "gallery"), "TRIMVLM_MAX_QUEUE_DELAY_MS": "25"}
    srv = ServerProcess(env, tmp / "server.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.kill()
