"""`trimvlm serve` start-up failures: a model repository that cannot load, a
port in use and more than one worker each end the real CLI (a subprocess) with one readable line
on stderr and a non-zero exit, at once where a cheap check can tell, not after loading the model;
never a traceback, never a server that stays up and is never ready. TRIMVLM_EXIT_ON_LOAD_ERROR=false
keeps the old behaviour for debugging: live, never ready, the error on /readyz."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e import conftest as e2e_conftest
from tests.e2e.conftest import DEFAULT_MODEL, MODELS, READY_TIMEOUT_S, REPO, ServerProcess, server_env
from tests.e2e.test_service import RED_CIRCLE, SHAPE_Q
from tests.reliability.test_artifacts import _flip_byte, _truncate_and_restamp

FAST_S = 5.0  # a start-up check that needs no model load (~1 s here; loading the default model takes ~6 s)


def serve(tmp: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> tuple[int, float, str, str]:
    """Run `python -m service serve ARGS` to its end: (exit code, seconds, stdout, stderr)."""
    full_env = server_env(**{"TRIMVLM_GALLERY_DIR": str(tmp / "gallery"), **(env or {})})
    if "--port" not in args:  # 0: any free port, bound by the server itself (no race with other tests)
        args = (*args, "--port", "0")
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "service", "serve", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return p.returncode, time.monotonic() - t0, p.stdout, p.stderr


def assert_one_line_error(rc: int, seconds: float, stdout: str, stderr: str, *words: str) -> None:
    """Exited non-zero within FAST_S, and said why in exactly one line: nothing else was printed."""
    assert rc != 0, (rc, stdout, stderr)
    assert seconds < FAST_S, (seconds, stderr)
    assert stdout == "" and stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    for word in words:
        assert word in stderr, (word, stderr)


def _copy_model(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "models"
    shutil.copytree(MODELS / DEFAULT_MODEL, root / DEFAULT_MODEL)
    return root, root / DEFAULT_MODEL


# ---------------------------------------------------------------- a repository that cannot load


REPOSITORIES = {
    # name: (make the repository under tmp, words the error must contain)
    "missing": (lambda tmp: tmp / "nope", ["nope", "does not exist", "--models", "TRIMVLM_MODELS_DIR"]),
    "empty": (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", ["no exported models", "--models", "trimvlm export"]),
    "corrupt_manifest": (
        lambda tmp: _corrupt_manifest(tmp),
        ["manifest.json", "invalid manifest", "TRIMVLM_EXIT_ON_LOAD_ERROR"],
    ),
}


def _corrupt_manifest(tmp: Path) -> Path:
    root, folder = _copy_model(tmp)
    (folder / "manifest.json").write_text((folder / "manifest.json").read_text()[:500])
    return root


@pytest.mark.parametrize("case", list(REPOSITORIES))
def test_a_repository_that_cannot_load_exits_at_once_with_one_line(tmp_path, case):
    make, words = REPOSITORIES[case]
    rc, seconds, out, err = serve(tmp_path, "--models", str(make(tmp_path)))
    assert rc == 1
    assert_one_line_error(rc, seconds, out, err, *words)


@pytest.mark.parametrize("damage", ["checksum_mismatch", "truncated_graph"])
def test_a_model_that_fails_to_load_stops_the_server_with_exit_1(tmp_path, damage):
    """Damage only loading can find (the manifest is fine): the server starts, loads in the
    background, and on the failure shuts down and exits 1, its last line the error."""
    root, folder = _copy_model(tmp_path)
    if damage == "checksum_mismatch":
        _flip_byte(folder / "vision.int8.onnx")
        words = ["vision.int8.onnx", "checksum mismatch"]
    else:
        _truncate_and_restamp(folder, "text.int8.onnx")  # passes the checksum; ONNX Runtime refuses it
        words = ["text.int8.onnx"]
    rc, _, out, err = serve(tmp_path, "--models", str(root), timeout_s=READY_TIMEOUT_S)
    assert rc == 1, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: model loading failed: "), err[-3000:]
    for word in words:
        assert word in last, last


def test_with_exit_on_load_error_off_it_stays_live_and_never_ready(tmp_path, monkeypatch):
    """The debugging mode (the behaviour before): liveness up, /readyz 503 with the error, task requests 503."""
    monkeypatch.setattr(e2e_conftest, "MODELS", tmp_path / "nope")  # ServerProcess serves `--models MODELS`
    srv = ServerProcess({"TRIMVLM_EXIT_ON_LOAD_ERROR": "false"}, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 60
        body = {}
        while time.monotonic() < deadline and not body.get("error"):
            assert srv.proc.poll() is None, srv.log_tail()
            try:
                body = httpx.get(srv.url + "/readyz", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.1)
        assert "no exported models" in body.get("error", ""), body
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        assert httpx.get(srv.url + "/readyz", timeout=5).status_code == 503
        r = httpx.post(srv.url + "/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready", r.text
        time.sleep(0.5)
        assert srv.proc.poll() is None, srv.log_tail()
        assert srv.terminate() in (0, -signal.SIGTERM)
    finally:
        srv.kill()


def test_invalid_settings_are_one_line(tmp_path):
    rc, seconds, out, err = serve(tmp_path, "--models", str(MODELS), env={"TRIMVLM_LISTEN_BACKLOG": "1"})
    assert rc == 1
    assert_one_line_error(rc, seconds, out, err, "invalid settings", "listen_backlog")


# ---------------------------------------------------------------- a port in use


def test_a_port_in_use_fails_before_the_model_loads(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, seconds, out, err = serve(tmp_path, "--models", str(MODELS), "--port", str(port))
    assert rc == 1
    assert_one_line_error(rc, seconds, out, err, f"127.0.0.1:{port}", "in use", "--port", "TRIMVLM_PORT")


# ---------------------------------------------------------------- workers


@pytest.mark.parametrize("workers", ["2", "0"])
def test_more_than_one_worker_is_refused(tmp_path, workers):
    """Each worker would open (and lock) the same gallery folder: 503 gallery_locked for most searches."""
    rc, seconds, out, err = serve(tmp_path, "--models", str(MODELS), "--workers", workers)
    assert rc == 2
    assert_one_line_error(rc, seconds, out, err, f"--workers {workers}", "gallery", "replicas")
