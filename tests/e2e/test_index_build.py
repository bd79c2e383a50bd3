"""`trimvlm index build` end to end, as a new user runs it: the real CLI in a fresh process (the import
order that crashed it with exit 139 is the process's own), the real default model, real photos
(scikit-image ships them), then the gallery it wrote opened and searched."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.gallery import HEADER, Gallery
from tests.e2e.conftest import DEFAULT_MODEL, MODELS, REPO

skdata = pytest.importorskip("skimage.data")

PHOTOS = {"astronaut.png": "astronaut", "chelsea.png": "chelsea", "coffee.png": "coffee", "rocket.jpg": "rocket"}


def index_build(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMVLM_") or k == "TRIMVLM_CACHE"}
    full_env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "service", "index", "build", *args, "--models", str(MODELS)]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Four real photos, an 8x8 image in a subfolder, and two files that are not images."""
    folder = tmp_path_factory.mktemp("photos")
    sizes = {}
    for name, fn in PHOTOS.items():
        img = Image.fromarray(getattr(skdata, fn)())
        img.save(folder / name)
        sizes[name] = img.size
    (folder / "tiny").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "tiny" / "8x8.png")
    sizes["tiny/8x8.png"] = (8, 8)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # skipped, reported
    (folder / "notes.txt").write_text("not an image")  # not even looked at
    return folder, sizes


def test_index_build_real_photos_then_search(photos, tmp_path):
    folder, sizes = photos
    work = tmp_path / "work"
    work.mkdir()
    target = tmp_path / "gallery"
    r = index_build([str(folder), "--gallery", str(target)], cwd=work)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert re.search(rf"indexed 5 images into {re.escape(str(target))} for {DEFAULT_MODEL}", r.stdout), r.stdout
    assert "broken.jpg" in r.stdout + r.stderr
    assert list(work.iterdir()) == []  # nothing left in the working directory

    header = json.loads((target / HEADER).read_text())
    assert header["count"] == 5 and header["model_id"] == DEFAULT_MODEL
    with Gallery.open(target, header["dim"], DEFAULT_MODEL) as g:
        assert sorted(g.ids()) == sorted(sizes)
        page = g.page(limit=100)
        assert page.total == 5 and page.next_cursor is None
        for item in page.items:
            w, h = sizes[item.id]
            assert item.metadata == {"file": item.id, "width": w, "height": h} and item.has_states
        for item_id in sizes:  # each photo's stored embedding finds that photo first
            stored = g.get(item_id)
            assert stored.embedding.shape == (header["dim"],) and abs(np.linalg.norm(stored.embedding) - 1) < 1e-4
            hits = g.search(stored.embedding, top_k=5)
            assert len(hits) == 5 and hits[0].id == item_id and hits[0].score > 0.99, (item_id, hits)
        # real photos are not one vector: the scores against one another spread out
        astronaut = g.get("astronaut.png").embedding
        others = [h.score for h in g.search(astronaut, top_k=5)[1:]]
        assert max(others) < 0.999, others


def test_index_build_default_gallery_is_user_data_not_the_working_directory(photos, tmp_path):
    """Without --gallery (or TRIMVLM_GALLERY_DIR) the gallery goes to $XDG_DATA_HOME/trimvlm/gallery/<model>:
    a checkout stays clean after `make run` and `trimvlm index build`."""
    folder, sizes = photos
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    r = index_build([str(folder)], cwd=work, XDG_DATA_HOME=str(data))
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    target = data / "trimvlm" / "gallery" / DEFAULT_MODEL.replace("/", "-")
    assert f"indexed 5 images into {target}" in r.stdout, r.stdout
    assert list(work.iterdir()) == []
    header = json.loads((target / HEADER).read_text())
    with Gallery.open(target, header["dim"], DEFAULT_MODEL) as g:
        assert sorted(g.ids()) == sorted(sizes)
