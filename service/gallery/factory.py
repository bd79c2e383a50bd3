"""Which gallery backend serves a model, from the settings: `embedded` (a folder per model under
TRIMVLM_GALLERY_DIR, one process) or `chroma` (a collection per model in the Chroma server at
TRIMVLM_GALLERY_URL, shared by every replica and worker)."""

from __future__ import annotations

import re

from service.gallery.base import GalleryBackend

BACKENDS = ("embedded", "chroma")
SHARED = {"chroma"}  # backends that several processes may use at once


def collection_name(prefix: str, model_id: str) -> str:
    """`<prefix>-<name>-<version>`, in the characters a Chroma collection name may hold."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{prefix}-{model_id}").strip("._-")
    return name[:512]


def open_gallery(settings, model_id: str, dim: int, *, folder=None) -> GalleryBackend:
    """The gallery for one model. The embedded one opens (and locks) its folder now; a shared one connects on
    first use (or at `connect()`), so a database that is down does not stop the service from starting.
    `folder` overrides the embedded folder (`index build --gallery`)."""
    backend = settings.gallery_backend
    if backend == "embedded":
        from service.gallery.embedded import Gallery

        folder = folder or settings.gallery_dir / model_id.replace("/", "-")
        return Gallery.open(folder, dim, model_id, max_items=settings.gallery_max_items)
    if backend == "chroma":
        from service.gallery.chroma import ChromaGallery

        return ChromaGallery(
            settings.gallery_url,
            collection_name(settings.gallery_collection, model_id),
            dim,
            model_id,
            max_items=settings.gallery_max_items,
            connect_timeout_s=settings.gallery_connect_timeout_s,
            timeout_s=settings.gallery_timeout_s,
            retry_s=settings.gallery_retry_s,
        )
    raise ValueError(f"unknown gallery backend {backend!r}; one of {', '.join(BACKENDS)}")
