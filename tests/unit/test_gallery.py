"""Retrieval gallery: exact search, removal, replacement, persistence, crash safety, limits, bulk build."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.gallery import DB, HEADER, INDEX, Gallery, GalleryError, build_index
from service.preprocess import ImageSpec

REPO = Path(__file__).resolve().parents[2]
D = 32


def unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(vectors: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> list[str]:
    return [ids[i] for i in np.argsort(-(vectors @ q), kind="stable")[:k]]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def filled(tmp_path, rng):
    vecs = unit(rng, 300)
    ids = [f"img-{i}" for i in range(300)]
    g = Gallery.open(tmp_path / "g", D, "m1")
    g.add_many(vecs, ids, [{"i": i} for i in range(300)])
    yield g, vecs, ids
    g.close()


def test_search_is_exact_top_k(filled, rng):
    g, vecs, ids = filled
    for q in unit(rng, 5):
        hits = g.search(q, top_k=10)
        assert [h.id for h in hits] == brute_force(vecs, ids, q, 10)
        np.testing.assert_allclose([h.score for h in hits], np.sort(vecs @ q)[::-1][:10], atol=1e-5)
        assert hits[0].metadata == {"i": int(hits[0].id.split("-")[1])}
        # the HNSW path is approximate; on 300 items it should still find nearly all of them
        approx = g.search(q, top_k=10, exact=False)
        assert len({h.id for h in approx} & {h.id for h in hits}) >= 8
    assert len(g.search(vecs[0], top_k=1000)) == 300  # top_k beyond the size is clipped


def test_add_generates_ids_and_normalises(tmp_path, rng):
    with Gallery.open(tmp_path, D, "m1") as g:
        v = unit(rng, 1)[0]
        item_id = g.add(3.0 * v)
        assert len(item_id) == 32 and item_id in g and len(g) == 1 and g.ids() == [item_id]
        hit = g.search(v, 1)[0]
        assert hit.id == item_id and hit.score == pytest.approx(1.0, abs=1e-5) and hit.metadata is None
        np.testing.assert_allclose(g.get(item_id).embedding, v, atol=1e-6)


def test_remove(filled):
    g, vecs, ids = filled
    assert g.remove("img-7") is True
    assert g.remove("img-7") is False and g.remove("never") is False
    assert len(g) == 299 and "img-7" not in g and "img-7" not in g.ids()
    assert "img-7" not in [h.id for h in g.search(vecs[7], 20)]
    with pytest.raises(GalleryError) as e:
        g.get("img-7")
    assert (e.value.code, e.value.status) == ("not_found", 404)


def test_readd_replaces(filled, rng):
    g, vecs, ids = filled
    new = unit(rng, 1)[0]
    assert g.add(new, "img-3", {"v": 2}) == "img-3"
    assert len(g) == 300 and g.ids()[-1] == "img-3"
    assert g.search(new, 1)[0] == ("img-3", pytest.approx(1.0, abs=1e-5), {"v": 2})
    assert g.search(vecs[3], 1)[0].id != "img-3" or g.search(vecs[3], 1)[0].score < 0.99


def test_persists_across_reopen_including_removals(tmp_path, rng):
    vecs, ids = unit(rng, 50), [f"a/{i}.png" for i in range(50)]
    g = Gallery.open(tmp_path, D, "m1")
    g.add_many(vecs, ids, [{"n": i} for i in range(50)])
    g.remove("a/0.png")
    g.add(vecs[0], "a/1.png", {"replaced": True})
    g.close()
    header = json.loads((tmp_path / HEADER).read_text())
    assert header["dim"] == D and header["model_id"] == "m1" and header["count"] == 49 and header["version"] == 1

    with Gallery.open(tmp_path, D, "m1") as g2:
        assert len(g2) == 49 and "a/0.png" not in g2
        assert set(g2.ids()) == set(ids[1:])
        assert g2.search(vecs[0], 1)[0] == ("a/1.png", pytest.approx(1.0, abs=1e-5), {"replaced": True})
        expect = {**{ids[i]: vecs[i] for i in range(2, 50)}, "a/1.png": vecs[0]}
        keys = list(expect)
        for q in unit(rng, 3):
            assert [h.id for h in g2.search(q, 5)] == brute_force(np.stack(list(expect.values())), keys, q, 5)


def test_mutations_survive_a_crash_without_save(tmp_path, rng):
    """A process that adds, removes and dies (os._exit, no close, no snapshot) loses nothing."""
    vecs = unit(rng, 20)
    np.save(tmp_path / "v.npy", vecs)
    script = f"""
import os, numpy as np
from service.gallery import Gallery
v = np.load({str(tmp_path / "v.npy")!r})
g = Gallery.open({str(tmp_path / "g")!r}, {D}, "m1", flush_every=10**9)
g.add_many(v[:10], [f"x{{i}}" for i in range(10)])
g.save()  # snapshot of the first 10, then more work that only the database knows about
g.add_many(v[10:], [f"x{{i}}" for i in range(10, 20)], states=np.ones((10, 3, 4), np.float16))
g.remove("x0")
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with Gallery.open(tmp_path / "g", D, "m1") as g:
        assert len(g) == 19 and "x0" not in g
        assert g.search(vecs[15], 1)[0].id == "x15"
        assert g.states("x15").shape == (3, 4)
        assert [h.id for h in g.search(vecs[0], 3)] == brute_force(vecs[1:], [f"x{i}" for i in range(1, 20)], vecs[0], 3)


def test_crash_mid_save_keeps_previous_snapshot(tmp_path, rng, monkeypatch):
    vecs = unit(rng, 12)
    g = Gallery.open(tmp_path, D, "m1", flush_every=10**9)
    g.add_many(vecs[:8], [f"i{i}" for i in range(8)])
    g.save()
    before = {name: (tmp_path / name).read_bytes() for name in (INDEX, HEADER)}
    g.add_many(vecs[8:], [f"i{i}" for i in range(8, 12)])
    g.remove("i1")

    def crash(*args, **kwargs):
        raise OSError("simulated crash inside os.replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        g.save()
    with pytest.raises(OSError, match="simulated"):
        g.close()  # still releases the folder
    monkeypatch.undo()
    # the previous snapshot and header are untouched, no temp file is left behind
    assert {name: (tmp_path / name).read_bytes() for name in (INDEX, HEADER)} == before
    assert not list(tmp_path.glob("*.tmp"))

    with Gallery.open(tmp_path, D, "m1") as g2:
        want = [f"i{i}" for i in range(12) if i != 1]
        assert sorted(g2.ids()) == sorted(want)
        rows = np.stack([vecs[int(i[1:])] for i in want])
        for q in vecs:
            assert [h.id for h in g2.search(q, 4)] == brute_force(rows, want, q, 4)
    assert json.loads((tmp_path / HEADER).read_text())["count"] == 11


def test_corrupt_or_missing_snapshot_is_rebuilt(tmp_path, rng):
    vecs = unit(rng, 10)
    with Gallery.open(tmp_path, D, "m1") as g:
        g.add_many(vecs, [str(i) for i in range(10)])
    (tmp_path / INDEX).write_bytes(b"not an index")
    with Gallery.open(tmp_path, D, "m1") as g:
        assert len(g) == 10 and g.search(vecs[4], 1)[0].id == "4"
    (tmp_path / INDEX).unlink()
    with Gallery.open(tmp_path, D, "m1") as g:
        assert g.search(vecs[6], 1)[0].id == "6"


def test_flush_every_mutation_keeps_snapshot_current(tmp_path, rng):
    vecs = unit(rng, 3)
    with Gallery.open(tmp_path, D, "m1", flush_every=1) as g:
        g.add(vecs[0], "a")
        size = (tmp_path / INDEX).stat().st_size
        g.add(vecs[1], "b")
        assert (tmp_path / INDEX).stat().st_size > size
        assert json.loads((tmp_path / HEADER).read_text())["count"] == 2


def test_dim_or_model_mismatch(tmp_path, rng):
    with Gallery.open(tmp_path, D, "m1") as g:
        g.add(unit(rng, 1)[0], "a")
    for dim, model in ((D + 1, "m1"), (D, "m2")):
        with pytest.raises(GalleryError) as e:
            Gallery.open(tmp_path, dim, model)
        assert e.value.code == "gallery_mismatch" and e.value.status == 503
        assert ("dim" if dim != D else "model_id") in str(e.value)
    (tmp_path / HEADER).unlink()  # the database alone still knows what the gallery holds
    with pytest.raises(GalleryError, match="model_id"):
        Gallery.open(tmp_path, D, "m2")
    with Gallery.open(tmp_path, D, "m1") as g:  # and the header is written again
        assert len(g) == 1
    assert (tmp_path / HEADER).exists()


def test_one_process_per_folder(tmp_path):
    with Gallery.open(tmp_path, D, "m1"):
        with pytest.raises(GalleryError) as e:
            Gallery.open(tmp_path, D, "m1")
        assert (e.value.code, e.value.status) == ("gallery_locked", 503)
    Gallery.open(tmp_path, D, "m1").close()  # released on close


def test_limits_and_error_codes(tmp_path, rng):
    vecs = unit(rng, 5)
    g = Gallery.open(tmp_path, D, "m1", max_items=3)
    g.add_many(vecs[:3], ["a", "b", "c"])
    snapshot = (g.ids(), [h.id for h in g.search(vecs[0], 3)])

    def code(fn) -> tuple[str, int]:
        with pytest.raises(GalleryError) as e:
            fn()
        assert isinstance(e.value, ValueError)
        return e.value.code, e.value.status

    assert code(lambda: g.add(vecs[3], "d")) == ("gallery_full", 507)
    assert code(lambda: g.add_many(vecs[3:5], ["a", "d"])) == ("gallery_full", 507)  # all or nothing
    assert code(lambda: g.add(vecs[0], "x" * 129)) == ("invalid_id", 422)
    assert code(lambda: g.add(vecs[0], "bad\nid")) == ("invalid_id", 422)
    assert code(lambda: g.add(vecs[0], "")) == ("invalid_id", 422)
    assert code(lambda: g.add(vecs[0], 5)) == ("invalid_id", 422)
    assert code(lambda: g.add_many(vecs[:2], ["a", "a"])) == ("invalid_id", 422)
    assert code(lambda: g.add(vecs[0], "a", {"blob": "x" * 5000})) == ("metadata_too_large", 413)
    assert code(lambda: g.add(vecs[0], "a", {"s": {1, 2}})) == ("invalid_metadata", 422)
    assert code(lambda: g.add(vecs[0], "a", {"f": float("nan")})) == ("invalid_metadata", 422)
    assert code(lambda: g.add(vecs[0], "a", ["not", "a", "dict"])) == ("invalid_metadata", 422)
    assert code(lambda: g.add(vecs[0][:-1], "a")) == ("invalid_embedding", 422)
    assert code(lambda: g.add(np.zeros(D), "a")) == ("invalid_embedding", 422)
    assert code(lambda: g.add(np.full(D, np.nan), "a")) == ("invalid_embedding", 422)
    assert code(lambda: g.add(vecs[0], "a", states=np.zeros(5))) == ("invalid_states", 422)
    assert code(lambda: g.add(vecs[0], "a", states=np.full((2, 2), 1e6))) == ("invalid_states", 422)
    assert code(lambda: g.add_many(vecs[:2], ["a"])) == ("invalid_batch", 422)
    assert code(lambda: g.search(vecs[0], 0)) == ("invalid_top_k", 422)
    assert code(lambda: g.search(vecs[0][:5], 1)) == ("invalid_embedding", 422)
    assert code(lambda: g.get("zzz")) == ("not_found", 404)
    # no refused request changed anything, and a replacement is allowed when full
    assert (g.ids(), [h.id for h in g.search(vecs[0], 3)]) == snapshot
    g.add(vecs[4], "b", {"ok": 1}, states=None)
    assert len(g) == 3 and g.get("b").metadata == {"ok": 1}
    assert g.remove("c")
    assert g.add(vecs[0], "ok/ünïcode path.png") == "ok/ünïcode path.png"  # ids may hold '/', spaces, unicode
    g.close()
    with Gallery.open(tmp_path, D, "m1", max_items=3) as g2:
        assert sorted(g2.ids()) == ["a", "b", "ok/ünïcode path.png"]


def test_states_round_trip(tmp_path, rng):
    states16 = rng.standard_normal((17, 24)).astype(np.float16)
    states32 = rng.standard_normal((5, 8)).astype(np.float32)
    vecs = unit(rng, 3)
    with Gallery.open(tmp_path, D, "m1") as g:
        g.add(vecs[0], "h", states=states16)
        g.add(vecs[1], "f", states=states32)
        g.add(vecs[2], "none")
        assert g.get("h").has_states and not g.get("none").has_states
    with Gallery.open(tmp_path, D, "m1") as g:
        got = g.states("h")
        assert got.dtype == np.float16 and got.shape == (17, 24) and np.array_equal(got, states16)
        got.fill(0)  # a writable copy: the store is not affected
        assert np.array_equal(g.states("h"), states16)
        assert np.array_equal(g.states("f"), states32.astype(np.float16))
        assert g.states("none") is None and g.states("unknown") is None
        g.add(vecs[0], "h")  # replacing without states drops the old ones
        assert g.states("h") is None


def _png(path: Path, color: tuple[int, int, int], size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def fake_encode(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour -> a fixed random projection: different colours, different unit vectors."""
    proj = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    x = np.stack([im.reshape(-1, 3).mean(0) / 255.0 - 0.5 for im in images]).astype(np.float32) @ proj
    states = np.stack([np.full((4, 6), im.mean() / 255.0, np.float32) for im in images])
    return x, states


def test_build_index_from_folder(tmp_path, caplog):
    images = tmp_path / "images"
    colours = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "sub/c.png": (0, 0, 255), "sub/deep/d.PNG": (255, 255, 0)}
    colours |= {f"more/{i}.png": (40 * i, 20, 200 - 30 * i) for i in range(4)}
    for rel, colour in colours.items():
        _png(images / rel, colour)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (images / "notes.txt").write_text("not an image, not even tried")
    seen: list[int] = []

    def encode(batch):
        seen.append(len(batch))
        assert all(im.shape == (24, 24, 3) and im.dtype == np.uint8 for im in batch)
        return fake_encode(batch)

    with caplog.at_level(logging.WARNING, logger="service.gallery"):
        n = build_index(images, tmp_path / "gallery", encode, ImageSpec(size=24), batch=3, progress=False, model_id="m1")
    assert n == 8 and sum(seen) == 8 and max(seen) <= 3
    assert "broken.png" in caplog.text

    with Gallery.open(tmp_path / "gallery", 16, "m1") as g:
        assert sorted(g.ids()) == sorted(colours)
        emb, _ = fake_encode([np.full((24, 24, 3), (0, 0, 255), np.uint8)])
        hit = g.search(emb[0], 1)[0]
        assert hit.id == "sub/c.png" and hit.metadata == {"file": "sub/c.png", "width": 40, "height": 30}
        assert g.states("sub/c.png").shape == (4, 6)

    # running it again replaces rather than duplicates; states are optional
    n = build_index(
        images, tmp_path / "gallery", fake_encode, ImageSpec(size=24), progress=False, model_id="m1", store_states=False
    )
    with Gallery.open(tmp_path / "gallery", 16, "m1") as g:
        assert n == 8 and len(g) == 8 and g.states("a.png") is None
    with pytest.raises(GalleryError, match="model_id"):
        build_index(images, tmp_path / "gallery", fake_encode, ImageSpec(size=24), progress=False, model_id="other")


def test_concurrent_add_and_search(tmp_path, rng):
    vecs = unit(rng, 400)
    g = Gallery.open(tmp_path, D, "m1", flush_every=50)
    g.add_many(vecs[:100], [f"base{i}" for i in range(100)])
    errors: list[BaseException] = []
    stop = threading.Event()

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # surfaced by the assertion below
                errors.append(e)

        return run

    def adder(lo: int, hi: int):
        for i in range(lo, hi):
            g.add(vecs[i], f"t{i}", {"i": i}, states=np.zeros((2, 2), np.float16))
            if i % 10 == 0:
                g.remove(f"t{i}")

    def searcher():
        while not stop.is_set():
            for h in g.search(vecs[int(rng.integers(400))], 5):
                assert isinstance(h.id, str)
            g.states("t150")

    adders = [threading.Thread(target=guard(lambda a=a: adder(a, a + 150))) for a in (100, 250)]
    searchers = [threading.Thread(target=guard(searcher)) for _ in range(2)]
    for t in adders + searchers:
        t.start()
    for t in adders:
        t.join()
    stop.set()
    for t in searchers:
        t.join()
    assert not errors, errors
    assert len(g) == 100 + 300 - 30
    g.close()
    with Gallery.open(tmp_path, D, "m1") as g2:
        assert len(g2) == 370 and g2.search(vecs[399], 1)[0].id == "t399"


def test_database_is_the_only_other_file(tmp_path, rng):
    with Gallery.open(tmp_path, D, "m1") as g:
        g.add(unit(rng, 1)[0], "a")
    names = {p.name for p in tmp_path.iterdir()}
    assert {HEADER, DB, INDEX, "gallery.lock"} <= names and not [n for n in names if n.endswith(".tmp")]


def test_import_order_cannot_segfault():
    """`import usearch.index` and then `import onnxruntime` kills the process with SIGSEGV (usearch 2.26.6,
    onnxruntime 1.32.0): `trimvlm index build` did exactly that (exit 139, no output). The gallery imports
    onnxruntime first, so importing it and then onnxruntime, in a fresh process, is fine."""
    code = "import service.gallery; import onnxruntime; import usearch.index; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_page_lists_in_insertion_order_with_a_stable_cursor(tmp_path, rng):
    vecs = unit(rng, 7)
    with Gallery.open(tmp_path, D, "m1") as g:
        assert g.page() == ([], 0, None)
        g.add_many(vecs[:5], [f"i{i}" for i in range(5)], [{"n": i} for i in range(5)], [np.ones((2, 3))] + [None] * 4)
        first = g.page(limit=2)
        assert [i.id for i in first.items] == ["i0", "i1"] and first.total == 5 and first.next_cursor
        assert first.items[0].metadata == {"n": 0} and first.items[0].has_states and not first.items[1].has_states
        # mutations between pages: a removed item is skipped, a new one and a replaced one come last
        g.remove("i2")
        g.add(vecs[5], "new")
        g.add(vecs[6], "i0", {"n": "again"})
        rest, cursor = [], first.next_cursor
        while cursor:
            page = g.page(limit=2, cursor=cursor)
            assert len(page.items) <= 2 and page.total == 5
            rest += [i.id for i in page.items]
            cursor = page.next_cursor
        assert rest == ["i3", "i4", "new", "i0"]
        assert [i.id for i in g.page(limit=100).items] == g.ids() == ["i1", "i3", "i4", "new", "i0"]
        assert g.page(limit=5).next_cursor is None  # exactly one full page: no empty page after it
        assert g.info("i0") == ("i0", {"n": "again"}, False) and g.info("i1").metadata == {"n": 1}
        assert g.info("i2") is None
        for bad in (0, -1, True, 1.5):
            with pytest.raises(GalleryError) as e:
                g.page(limit=bad)
            assert e.value.code == "invalid_limit" and e.value.status == 422
        for bad in ("x", "-1", "1e3", "", "9" * 40):
            with pytest.raises(GalleryError) as e:
                g.page(cursor=bad)
            assert e.value.code == "invalid_cursor" and e.value.status == 422
    with Gallery.open(tmp_path, D, "m1") as g:  # the order survives a reopen
        assert [i.id for i in g.page().items] == ["i1", "i3", "i4", "new", "i0"]


def test_default_gallery_dir_is_per_user_data_not_the_working_directory(tmp_path, monkeypatch):
    from service.settings import Settings

    monkeypatch.delenv("TRIMVLM_GALLERY_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert Settings(_env_file=None).gallery_dir == tmp_path / "data" / "trimvlm" / "gallery"
    for unset in ("", "relative/ignored"):  # XDG: unset or relative means ~/.local/share
        monkeypatch.setenv("XDG_DATA_HOME", unset)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert Settings(_env_file=None).gallery_dir == tmp_path / "home" / ".local" / "share" / "trimvlm" / "gallery"
    monkeypatch.setenv("TRIMVLM_GALLERY_DIR", "/data/gallery")  # what the images and the chart set
    assert Settings(_env_file=None).gallery_dir == Path("/data/gallery")


def test_build_index_skips_what_is_indexed_by_content_hash(tmp_path):
    """Resumable: a re-run encodes only new or changed files (same id, same sha256, same options: skipped)."""
    images = tmp_path / "images"
    for i in range(5):
        _png(images / f"{i}.png", (50 * i, 0, 0))
    seen: list[int] = []

    def encode(batch):
        seen.append(len(batch))
        return fake_encode(batch)

    stats: dict = {}
    assert build_index(images, tmp_path / "g", encode, ImageSpec(size=24), batch=2, progress=False, model_id="m1", dim=16) == 5
    _png(images / "0.png", (0, 255, 0))  # changed content
    _png(images / "new.png", (0, 0, 255))
    seen.clear()
    n = build_index(images, tmp_path / "g", encode, ImageSpec(size=24), progress=False, model_id="m1", dim=16, stats=stats)
    assert n == 2 and sum(seen) == 2 and stats == {"stored": 2, "unchanged": 4, "unreadable": 0}
    with Gallery.open(tmp_path / "g", 16, "m1") as g:
        assert len(g) == 6 and set(g.hashes(["0.png", "new.png", "nope"])) == {"0.png", "new.png"}
