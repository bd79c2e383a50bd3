"""Many replicas, one gallery: two real `trimvlm serve` servers (A, and B with `--workers 2`) sharing a
real Chroma server (started and stopped here). Index on A, found by B; delete on B, gone on A; the database
down at start-up (not ready, no crash) and mid-run (503 gallery_unavailable on retrieval only, /vqa
unaffected); back again: both recover without a restart; both restarted: nothing lost. `trimvlm index
build` into the same database, and the backend's contract on its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from benchmarks.chroma_server import ChromaServer, chroma_executable
from tests.e2e.conftest import DEFAULT_MODEL, MODELS, READY_TIMEOUT_S, REPO, ServerProcess
from tests.e2e.test_service import BLUE_RECTANGLE, GREEN_TRIANGLE, RED_CIRCLE, SHAPE_Q, assert_error

pytestmark = pytest.mark.skipif(chroma_executable() is None, reason="chromadb (the dev extra) is not installed")


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        out = check()
        if out:
            return out
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def readyz(srv: ServerProcess) -> httpx.Response | None:
    try:
        return httpx.get(srv.url + "/readyz", timeout=2.0)
    except httpx.HTTPError:
        return None


def search(srv: ServerProcess, text: str, top_k: int = 3) -> httpx.Response:
    return httpx.post(srv.url + "/retrieval/search", json={"text": text, "top_k": top_k}, timeout=30.0)


def test_two_servers_share_one_database(tmp_path):
    db = ChromaServer(tmp_path / "chroma", tmp_path / "chroma.log")
    env = {
        "TRIMVLM_GALLERY_BACKEND": "chroma",
        "TRIMVLM_GALLERY_URL": db.url,
        "TRIMVLM_GALLERY_COLLECTION": "shared-test",
        "TRIMVLM_GALLERY_RETRY_S": "0.5",
        "TRIMVLM_GALLERY_DIR": str(tmp_path / "never-used"),
        "TRIMVLM_WARMUP": "false",
    }
    servers: list[ServerProcess] = []
    try:
        # the database is not there yet: both load their models and wait, not ready, not crashed
        a = ServerProcess(env, tmp_path / "a.log")
        b = ServerProcess(env, tmp_path / "b.log", args=("--workers", "2"))  # workers share it as replicas do
        servers += [a, b]
        for srv in (a, b):
            r = wait_for(
                lambda srv=srv: (r := readyz(srv)) is not None and r.status_code == 503 and "error" in r.json() and r,
                READY_TIMEOUT_S,
                f"{srv.url} never said why it is not ready",
            )
            assert "gallery" in r.json()["error"] and db.url in r.json()["error"], r.json()
            assert srv.proc.poll() is None
        assert "not ready: gallery (chroma at" in a.log_tail(20_000)
        vqa = httpx.post(a.url + "/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q}, timeout=30.0)
        assert vqa.status_code == 200, vqa.text  # the models serve; only the gallery is missing
        assert_error(search(a, "a red circle"), 503, "gallery_unavailable")

        # the database starts: both become ready by themselves
        db.start()
        for srv in (a, b):
            wait_for(lambda srv=srv: (r := readyz(srv)) is not None and r.status_code == 200, 30, f"{srv.url} not ready")

        # index on A, search on B
        for item_id, image in (("red-circle", RED_CIRCLE), ("green-triangle", GREEN_TRIANGLE)):
            body = {"image": image, "id": item_id, "metadata": {"s": item_id}}
            r = httpx.post(a.url + "/retrieval/index", json=body, timeout=30)
            assert r.status_code == 200, r.text
        r = search(b, "a red circle")
        assert r.status_code == 200 and r.json()["gallery_size"] == 2, r.text
        hits = r.json()["results"]
        assert hits[0]["id"] == "red-circle" and hits[0]["metadata"] == {"s": "red-circle"}, hits
        assert hits[0]["score"] != hits[0]["itc_score"]  # re-ranked by ITM with the states A stored
        item = httpx.get(b.url + "/retrieval/index/green-triangle", timeout=10).json()
        assert item == {"id": "green-triangle", "metadata": {"s": "green-triangle"}, "has_states": True}

        # delete on B, gone on A
        assert httpx.delete(b.url + "/retrieval/index/red-circle", timeout=10).status_code == 200
        assert_error(httpx.get(a.url + "/retrieval/index/red-circle", timeout=10), 404, "unknown_id")
        assert [h["id"] for h in search(a, "a red circle", 10).json()["results"]] == ["green-triangle"]

        # the database stops mid-run: retrieval answers 503 with Retry-After, everything else serves
        db.stop()
        r = search(a, "a green triangle")
        assert_error(r, 503, "gallery_unavailable")
        assert int(r.headers["retry-after"]) >= 1
        r = httpx.post(b.url + "/retrieval/index", json={"image": BLUE_RECTANGLE}, timeout=30)
        assert_error(r, 503, "gallery_unavailable")
        assert_error(httpx.get(b.url + "/retrieval/index", timeout=10), 503, "gallery_unavailable")
        for srv in (a, b):
            vqa = httpx.post(srv.url + "/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q}, timeout=30.0)
            assert vqa.status_code == 200, vqa.text
            rank = httpx.post(srv.url + "/retrieval/rank", json={"image": RED_CIRCLE, "texts": ["a red circle", "x"]}, timeout=30)
            assert rank.status_code == 200, rank.text  # ranking given candidates needs no gallery
            assert readyz(srv).status_code == 200  # still ready: the pod keeps serving what it can
        assert "unreachable" in a.log_tail(20_000)

        # the database is back: retrieval recovers without a restart
        db.start()
        for srv in (a, b):
            r = wait_for(lambda srv=srv: (r := search(srv, "a green triangle")).status_code == 200 and r, 30, "no recovery")
            assert [h["id"] for h in r.json()["results"]] == ["green-triangle"]
        assert httpx.post(b.url + "/retrieval/index", json={"image": BLUE_RECTANGLE, "id": "blue"}, timeout=30).status_code == 200

        # restart both: nothing lost
        for srv in (a, b):
            assert srv.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its clean shutdown
        a2 = ServerProcess(env, tmp_path / "a2.log")
        b2 = ServerProcess(env, tmp_path / "b2.log")
        servers += [a2, b2]
        a2.wait_ready(), b2.wait_ready()
        listing = httpx.get(a2.url + "/retrieval/index", timeout=10).json()
        assert [i["id"] for i in listing["items"]] == ["green-triangle", "blue"] and listing["total"] == 2, listing
        assert search(b2, "a blue rectangle", 1).json()["results"][0]["id"] == "blue"
    finally:
        for srv in servers:
            srv.kill()
        db.stop()


def test_index_build_into_the_shared_database_skips_what_is_there(tmp_path):
    from PIL import Image

    from tests.e2e.test_service import BLUE, GREEN, RED, shape

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, kind, colour in (("red.png", "circle", RED), ("green.png", "triangle", GREEN)):
        shape(kind, colour).save(photos / name)
    db = ChromaServer(tmp_path / "chroma", tmp_path / "chroma.log").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMVLM_") or k == "TRIMVLM_CACHE"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRIMVLM_GALLERY_COLLECTION="build-test")
    cmd = [sys.executable, "-m", "service", "index", "build", str(photos), "--models", str(MODELS), "--backend", "chroma"]
    try:
        run = subprocess.run([*cmd, "--url", db.url], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"indexed 2 images into {db.url} for {DEFAULT_MODEL}" in run.stdout, run.stdout
        Image.new("RGB", (32, 32), BLUE).save(photos / "blue.png")  # the folder grew: only the new file is encoded
        run = subprocess.run([*cmd, "--url", db.url], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and re.search(r"indexed 1 images .*2 already there", run.stdout), run.stdout
        run = subprocess.run([*cmd, "--url", db.url, "--no-states"], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "indexed 3 images" in run.stdout, run.stdout  # other options: stored again
        from service.gallery.chroma import ChromaGallery

        g = ChromaGallery(db.url, f"build-test-{DEFAULT_MODEL.replace('/', '-')}", 128, DEFAULT_MODEL)
        assert len(g.ids()) == 3 and g.states("red.png") is None
        db.stop()  # unreachable: one line, exit 1, no traceback
        run = subprocess.run([*cmd, "--url", db.url], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and "gallery_unavailable" not in run.stderr and "does not answer" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    finally:
        db.stop()


def test_chroma_backend_keeps_the_gallery_contract(tmp_path):
    """ChromaGallery against a real server, as tests/unit/test_gallery.py checks the embedded one: search,
    replace, remove, states, paging in insertion order, hashes, refusals; fast 503s while the server is down."""
    import numpy as np

    from service.gallery import GalleryError
    from service.gallery.chroma import ChromaGallery

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((40, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"img/{i}" for i in range(40)]
    db = ChromaServer(tmp_path / "chroma", tmp_path / "chroma.log").start()
    try:
        g = ChromaGallery(db.url, "contract", 16, "m/1", max_items=45, retry_s=0.5)
        states = rng.standard_normal((5, 7)).astype(np.float32)
        g.add_many(vecs, ids, [{"i": i} for i in range(40)], [states] + [None] * 39, ["h0"] + [None] * 39)
        assert len(g) == 40 and "img/3" in g and "nope" not in g
        hits = g.search(vecs[7], top_k=5)
        assert hits[0].id == "img/7" and abs(hits[0].score - 1) < 1e-4 and hits[0].metadata == {"i": 7}
        assert [h.id for h in hits] == [ids[i] for i in np.argsort(-(vecs @ vecs[7]))[:5]]
        np.testing.assert_allclose(g.states("img/0"), states.astype(np.float16))
        assert g.states("img/1") is None and g.states("nope") is None
        assert g.hashes(["img/0", "img/1", "nope"]) == {"img/0": ("h0", True), "img/1": (None, False)}
        assert g.info("img/0").has_states and g.get("img/5").metadata == {"i": 5}
        # replace: new embedding and metadata, no states left behind, moves to the end of the listing
        g.add(vecs[9], "img/0", {"replaced": True})
        assert g.states("img/0") is None and g.info("img/0").metadata == {"replaced": True}
        assert g.search(vecs[9], top_k=2)[0].id in {"img/0", "img/9"}
        assert g.remove("img/5") and not g.remove("img/5") and len(g) == 39
        listed, cursor = [], None
        while True:
            page = g.page(limit=7, cursor=cursor)
            assert page.total == 39
            listed += [i.id for i in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert listed == [i for i in ids if i not in ("img/0", "img/5")] + ["img/0"] and g.ids() == listed
        for bad, code in (
            (lambda: g.add_many(vecs[:7], [f"new{i}" for i in range(7)]), "gallery_full"),
            (lambda: g.search(vecs[0][:8]), "invalid_embedding"),
            (lambda: g.page(cursor="x"), "invalid_cursor"),
        ):
            with pytest.raises(GalleryError) as e:
                bad()
            assert e.value.code == code
        with pytest.raises(GalleryError) as e:
            ChromaGallery(db.url, "contract", 32, "m/1").connect()
        assert e.value.code == "gallery_mismatch" and e.value.status == 503
        db.stop()
        for _ in range(3):  # down: 503 with Retry-After, at once (no waiting on the network)
            t0 = time.monotonic()
            with pytest.raises(GalleryError) as e:
                g.search(vecs[0])
            assert e.value.code == "gallery_unavailable" and e.value.headers["Retry-After"] and time.monotonic() - t0 < 1.0
        db.start()
        time.sleep(0.6)
        assert g.search(vecs[1], top_k=1)[0].id == "img/1" and len(g) == 39  # back, with everything
    finally:
        db.stop()
