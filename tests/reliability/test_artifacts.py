"""Damaged model artifacts at start-up: a copy of the default model, damaged
one way per case. The server must stay live (/healthz 200), never turn ready (/readyz 503 with the
reason, naming the file), refuse task requests with 503 model_not_ready, and say so in its log."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from service.repository import FileInfo, load_manifest, sha256_file
from tests.e2e import conftest as e2e_conftest
from tests.e2e.conftest import DEFAULT_MODEL, MODELS, ServerProcess, settings_for
from tests.e2e.test_service import RED_CIRCLE, SHAPE_Q, assert_error, loading_client


def _copy_model(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "models"
    folder = root / DEFAULT_MODEL
    shutil.copytree(MODELS / DEFAULT_MODEL, folder)
    return root, folder


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def _truncate_and_restamp(folder: Path, name: str) -> None:
    """A broken export whose manifest agrees with it: the checksum passes, ONNX Runtime must refuse."""
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = FileInfo(sha256=sha256_file(path), bytes=path.stat().st_size).model_dump()
    (folder / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    # name: (how, words the error must contain)
    "missing_graph": (lambda f: (f / "vision.int8.onnx").unlink(), ["vision.int8.onnx", "missing"]),
    "missing_tokenizer": (lambda f: (f / "tokenizer.json").unlink(), ["tokenizer.json", "missing"]),
    "checksum_mismatch": (lambda f: _flip_byte(f / "fusion.int8.onnx"), ["fusion.int8.onnx", "checksum mismatch"]),
    "truncated_graph_consistent_manifest": (lambda f: _truncate_and_restamp(f, "text.int8.onnx"), ["text.int8.onnx"]),
    "corrupt_manifest": (
        lambda f: (f / "manifest.json").write_text((f / "manifest.json").read_text()[:500]),
        ["manifest.json", "invalid manifest"],
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_model_is_reported_and_never_ready(tmp_path, case):
    root, folder = _copy_model(tmp_path)
    damage, words = DAMAGE[case]
    damage(folder)
    with loading_client(settings_for(tmp_path, models_dir=root)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        body = r.json()
        assert r.status_code == 503 and body["status"] == "unavailable", body
        for word in words:
            assert word in body["error"], (case, body["error"])
        assert_error(c.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q}), 503, "model_not_ready")
        assert c.get("/readyz").status_code == 503  # and it stays so


def test_intact_copy_loads(tmp_path):
    """The control: the same copy, undamaged, passes the start-up checksum check."""
    root, folder = _copy_model(tmp_path)
    assert load_manifest(folder).files
    with loading_client(settings_for(tmp_path, models_dir=root, warmup=False)) as c:
        assert c.app.state.trimvlm.load_error is None
        assert DEFAULT_MODEL in c.app.state.trimvlm.servers


def test_real_server_with_a_damaged_model_stays_live_and_logs_why(tmp_path, monkeypatch):
    """`trimvlm serve` on a model whose graph was altered after export, with TRIMVLM_EXIT_ON_LOAD_ERROR=false
    (the debugging mode; by default it exits 1, tests/reliability/test_startup.py): live, not ready, a clear log line."""
    root, folder = _copy_model(tmp_path)
    _flip_byte(folder / "vision.int8.onnx")
    monkeypatch.setattr(e2e_conftest, "MODELS", root)  # ServerProcess serves `--models MODELS`
    env = {"TRIMVLM_GALLERY_DIR": str(tmp_path / "g"), "TRIMVLM_EXIT_ON_LOAD_ERROR": "false"}
    srv = ServerProcess(env, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(srv.url + "/readyz", timeout=2)
                body = r.json()
                if body.get("error"):
                    break
            except httpx.HTTPError:
                pass
            assert srv.proc.poll() is None, srv.log_tail()
            time.sleep(0.1)
        assert body and body["status"] == "unavailable" and "vision.int8.onnx: checksum mismatch" in body["error"], body
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        assert httpx.get(srv.url + "/readyz", timeout=5).status_code == 503
        log = srv.log_path.read_text()
        assert "model loading failed" in log and "vision.int8.onnx: checksum mismatch" in log, log[-2000:]
        assert srv.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its clean shutdown
    finally:
        srv.kill()
