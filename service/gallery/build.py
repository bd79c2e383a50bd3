"""`trimvlm index build`: index a folder of images into a gallery (either backend), resumably.

Ids are the files' relative POSIX paths. Each file's sha256 is stored with its item, so a re-run (after an
interruption, or on a folder that grew) skips every image already indexed with the same content and the same
options, and re-indexes only new or changed files. Every stored batch is durable on its own.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.gallery.base import GalleryBackend, check_id
from service.preprocess import ImageSpec, image_to_uint8, load_image

log = logging.getLogger("service.gallery")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_index(
    folder_of_images: Path,
    gallery: Path | Callable[[int], GalleryBackend],
    encode: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray | None]],
    spec: ImageSpec,
    batch: int = 32,
    progress: bool = True,
    *,
    model_id: str,
    store_states: bool = True,
    max_items: int = 100_000,
    dim: int | None = None,
    stats: dict | None = None,
) -> int:
    """Index every image file under `folder_of_images`; returns how many were stored (skipped ones not counted).

    `gallery`: an embedded gallery folder, or `open(dim) -> GalleryBackend` (service/gallery/factory.py).
    `encode` gets uint8 [H, W, 3] images resized per `spec` and returns (embeddings [B, D], states [B, N, W] or None).
    With `dim` known up front, files already indexed with the same content hash (and with states iff
    `store_states`) are skipped before decoding; without it the gallery opens after the first batch is encoded.
    Unreadable files (and paths too long for an id) are skipped and reported, not fatal. `stats`, if given,
    receives {"stored", "unchanged", "unreadable"}.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if isinstance(gallery, str | Path):
        folder = Path(gallery)

        def opener(d: int) -> GalleryBackend:
            from service.gallery.embedded import Gallery

            return Gallery.open(folder, d, model_id, max_items=max_items)
    else:
        opener = gallery
    root = Path(folder_of_images)
    files = image_files(root)
    store: GalleryBackend | None = opener(dim) if dim is not None else None
    stored, unchanged, skipped = 0, 0, []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(f"indexing {root}", total=len(files))
            for start in range(0, len(files), batch):
                chunk = files[start : start + batch]
                rels, hashes = [], {}
                for path in chunk:
                    rel = path.relative_to(root).as_posix()
                    try:
                        check_id(rel)
                        hashes[rel] = file_sha256(path)
                    except Exception as e:
                        skipped.append(rel)
                        log.warning("gallery: skipped %s: %s", rel, e)
                        if progress:
                            bar.console.print(f"[yellow]skipped[/] {rel}: {e}")
                        continue
                    rels.append((rel, path))
                if store is not None and rels:
                    have = store.hashes([rel for rel, _ in rels])
                    todo = [(r, p) for r, p in rels if have.get(r) != (hashes[r], store_states)]
                    unchanged += len(rels) - len(todo)
                    rels = todo
                images, ids, metas, sums = [], [], [], []
                for rel, path in rels:
                    try:
                        img = load_image(path)
                        images.append(image_to_uint8(img, spec))  # decoding happens here too: errors land below
                    except Exception as e:  # any undecodable file is skipped, whatever PIL raised
                        skipped.append(rel)
                        log.warning("gallery: skipped %s: %s", rel, e)
                        if progress:
                            bar.console.print(f"[yellow]skipped[/] {rel}: {e}")
                        continue
                    ids.append(rel)
                    metas.append({"file": rel, "width": img.width, "height": img.height})
                    sums.append(hashes[rel])
                if images:
                    embeddings, states = encode(images)
                    embeddings = np.asarray(embeddings, dtype=np.float32)
                    if store is None:  # the dim is known once the model has encoded something
                        store = opener(embeddings.shape[1])
                    store.add_many(embeddings, ids, metas, states if store_states else None, sums)
                    stored += len(ids)
                bar.advance(task, len(chunk))
    finally:
        if store is not None:
            store.close()
    if skipped:
        log.warning("gallery: indexed %d image(s), skipped %d unreadable: %s", stored, len(skipped), ", ".join(skipped[:20]))
    if stats is not None:
        stats.update(stored=stored, unchanged=unchanged, unreadable=len(skipped))
    return stored
