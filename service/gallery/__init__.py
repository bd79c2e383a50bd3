"""The retrieval gallery: one interface (base.py), two backends (embedded.py: usearch + SQLite in a folder, one
process; chroma.py: a Chroma server shared by every replica, imported only when chosen), the factory that picks
one from the settings (factory.py) and the bulk indexer (build.py)."""

from service.gallery.base import (
    STATUS,
    GalleryBackend,
    GalleryError,
    GalleryItem,
    Hit,
    ItemInfo,
    Page,
    check_id,
)
from service.gallery.build import build_index, image_files
from service.gallery.embedded import DB, HEADER, INDEX, LOCK, Gallery, atomic_write
from service.gallery.factory import BACKENDS, open_gallery

__all__ = [
    "BACKENDS",
    "DB",
    "HEADER",
    "INDEX",
    "LOCK",
    "STATUS",
    "Gallery",
    "GalleryBackend",
    "GalleryError",
    "GalleryItem",
    "Hit",
    "ItemInfo",
    "Page",
    "atomic_write",
    "build_index",
    "check_id",
    "image_files",
    "open_gallery",
]
