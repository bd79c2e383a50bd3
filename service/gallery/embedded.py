"""The embedded gallery backend: ITC image embeddings in a usearch index, persisted in one folder, surviving restarts.

A gallery folder holds:

    gallery.json    header: format version, dim, model_id, metric, count (rewritten atomically)
    items.sqlite    the source of truth: id <-> int64 key, embedding, metadata, ITM image states
                    (WAL journal, synchronous=FULL: a committed mutation survives a crash)
    index.usearch   snapshot of the vector index (rewritten atomically): a cache of items.sqlite
    gallery.lock    flock held by the one process that has the gallery open

Durability: every add/remove commits to SQLite before it returns. The index snapshot is rewritten on save(),
close() and every `flush_every` mutations. On open the snapshot is reconciled with SQLite by key (keys are never
reused: a replaced item gets a new key), so a stale, missing or corrupt snapshot costs re-adding the difference,
never data. One process per gallery folder (the lock enforces it): each process keeps the index in memory, so
this backend serves one replica with one worker; replicas share a gallery through the chroma backend.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

# onnxruntime before usearch, always: `import usearch.index` and then `import onnxruntime` segfaults the
# process (exit 139, no message; usearch 2.26.6 + onnxruntime 1.32.0 wheels), the other order is fine. Every
# usearch import in the project is this one, so whoever imports the gallery first (`trimvlm index build` does,
# before any model loads) gets the safe order. tests/unit/test_import_order.py checks it in a fresh process.
import onnxruntime  # noqa: F401
import usearch
from usearch.index import Index, MetricKind

from service.gallery.base import (
    STATUS,
    GalleryBackend,
    GalleryError,
    GalleryItem,
    Hit,
    ItemInfo,
    Page,
    check_batch,
    check_positive,
    unit_rows,
)

log = logging.getLogger("service.gallery")

FORMAT, FORMAT_VERSION = "trimvlm-gallery", 1
HEADER, DB, INDEX, LOCK = "gallery.json", "items.sqlite", "index.usearch", "gallery.lock"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder, fsync, os.replace, fsync the folder: all or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def _key_array(keys: Sequence[int]) -> np.ndarray:
    return np.asarray(keys, dtype=np.uint64)


class Gallery(GalleryBackend):
    """A persistent set of (id -> unit embedding, metadata, optional ITM states), searchable by inner product."""

    kind = "embedded"

    def __init__(
        self,
        folder: Path,
        dim: int,
        model_id: str,
        *,
        max_items: int = 100_000,
        flush_every: int = 1000,
        exact_below: int = 10_000,
    ):
        self.folder, self.dim, self.model_id = Path(folder), int(dim), str(model_id)
        self.max_items, self.flush_every, self.exact_below = max_items, flush_every, exact_below
        self._lock = threading.RLock()  # guards the index, the maps and the connection (searches included)
        self._items: dict[str, tuple[int, str | None]] = {}  # id -> (key, metadata JSON), in insertion order
        self._id_of: dict[int, str] = {}
        self._dirty = 0  # mutations not yet in the index snapshot
        self._conn: sqlite3.Connection | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lockfile: IO[str] | None = self._acquire_lock()
        try:
            self._check_header()
            self._conn = self._open_db()
            for key, item_id, meta in self._conn.execute("SELECT key, id, metadata FROM items ORDER BY key"):
                self._items[item_id] = (key, meta)
                self._id_of[key] = item_id
            self._index = self._load_index()
            self._reconcile()
            self._write_header()
        except BaseException:
            self._release()
            raise
        log.info("gallery: %s open for %s (%d items)", self.folder.resolve(), self.model_id, len(self._items))

    @classmethod
    def open(
        cls,
        folder: Path | str,
        dim: int,
        model_id: str,
        *,
        max_items: int = 100_000,
        flush_every: int = 1000,
        exact_below: int = 10_000,
    ) -> Gallery:
        """Create the gallery in `folder`, or load it; raises GalleryError("gallery_mismatch") for another dim/model."""
        return cls(Path(folder), dim, model_id, max_items=max_items, flush_every=flush_every, exact_below=exact_below)

    # ---- opening -------------------------------------------------------------------------------------

    def _acquire_lock(self) -> IO[str]:
        f = open(self.folder / LOCK, "a+")  # held open (and locked) for the gallery's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise GalleryError("gallery_locked", f"gallery {self.folder} is open elsewhere (one process per gallery)") from None
        return f

    def _mismatch(self, what: str, found: Any, wanted: Any) -> GalleryError:
        return GalleryError(
            "gallery_mismatch",
            f"gallery {self.folder} holds embeddings with {what}={found!r}, but the model gives {what}={wanted!r}; "
            "embeddings of another model are meaningless here: use another folder or rebuild the gallery",
        )

    def _check_header(self) -> None:
        path = self.folder / HEADER
        if not path.exists():
            return
        try:
            header = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise GalleryError("gallery_corrupt", f"{path} is unreadable: {e}") from None
        if header.get("format") != FORMAT or int(header.get("version", 0)) > FORMAT_VERSION:
            raise GalleryError("gallery_mismatch", f"{path} is not a {FORMAT} v{FORMAT_VERSION} header: {header!r:.200}")
        if header.get("dim") != self.dim:
            raise self._mismatch("dim", header.get("dim"), self.dim)
        if header.get("model_id") != self.model_id:
            raise self._mismatch("model_id", header.get("model_id"), self.model_id)

    def _open_db(self) -> sqlite3.Connection:
        path = self.folder / DB
        try:
            conn = sqlite3.connect(path, check_same_thread=False)  # shared across threads under self._lock
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a returned commit survives power loss
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
                # AUTOINCREMENT: keys are never reused, which is what lets the snapshot be reconciled by key
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS items (key INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,"
                    " embedding BLOB NOT NULL, metadata TEXT, states BLOB, states_shape TEXT, sha256 TEXT)"
                )
                columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
                if "sha256" not in columns:  # a gallery written before content hashes were kept
                    conn.execute("ALTER TABLE items ADD COLUMN sha256 TEXT")
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('dim', ?), ('model_id', ?)", (str(self.dim), self.model_id))
            meta = dict(conn.execute("SELECT name, value FROM meta"))
        except sqlite3.DatabaseError as e:
            raise GalleryError("gallery_corrupt", f"{path}: {e}") from None
        # the header may be missing (crash during creation); the database decides too
        if int(meta["dim"]) != self.dim:
            conn.close()
            raise self._mismatch("dim", int(meta["dim"]), self.dim)
        if meta["model_id"] != self.model_id:
            conn.close()
            raise self._mismatch("model_id", meta["model_id"], self.model_id)
        return conn

    def _new_index(self) -> Index:
        return Index(ndim=self.dim, metric="ip", dtype="f32")

    def _load_index(self) -> Index:
        path = self.folder / INDEX
        if not path.exists():
            return self._new_index()
        try:
            index = Index.restore(str(path))
        except Exception as e:  # a corrupt snapshot is only a cache: rebuild it from the database
            log.warning("gallery: index snapshot %s unreadable (%s); rebuilding from %s", path, e, DB)
            return self._new_index()
        if index is None or index.ndim != self.dim or index.metric_kind != MetricKind.IP:
            log.warning("gallery: index snapshot %s does not match dim=%d/ip; rebuilding from %s", path, self.dim, DB)
            return self._new_index()
        return index

    def _reconcile(self) -> None:
        """Make the in-memory index hold exactly the database's keys (after a stale snapshot or a failed update)."""
        have = {int(k) for k in np.asarray(self._index.keys)} if len(self._index) else set()
        stale, missing = have - self._id_of.keys(), self._id_of.keys() - have
        if stale:
            self._index.remove(_key_array(sorted(stale)))
        if missing:
            keys, vecs = [], []
            for key, blob in self._conn.execute("SELECT key, embedding FROM items"):
                if key in missing:
                    keys.append(key)
                    vecs.append(np.frombuffer(blob, dtype=np.float32))
            self._index.add(_key_array(keys), np.stack(vecs), threads=0)
        if stale or missing:
            log.info("gallery: index snapshot reconciled with %s (+%d, -%d)", DB, len(missing), len(stale))
            self._dirty += len(stale) + len(missing)

    # ---- mutations -----------------------------------------------------------------------------------

    def _unit_rows(self, x: Any, single: bool) -> np.ndarray:
        return unit_rows(x, self.dim, single)

    def add_many(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
        states: Sequence[np.ndarray | None] | np.ndarray | None = None,
        hashes: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Store a batch in one transaction: all of it or (on any invalid item) none of it."""
        b = check_batch(embeddings, self.dim, ids, metadata, states, hashes)
        vecs, ids, metas, n = b.vecs, b.ids, b.metas, len(b.ids)
        blobs = [None if s is None else (s.tobytes(), json.dumps(list(s.shape))) for s in b.states]
        with self._lock:
            self._check_open()
            new = sum(i not in self._items for i in ids)
            if len(self._items) + new > self.max_items:
                raise GalleryError("gallery_full", f"gallery holds {len(self._items)} of at most {self.max_items} items")
            old_keys, keys = [], []
            with self._conn:  # one transaction: committed (durable) on exit, rolled back on error
                for item_id, vec, meta, blob, sha in zip(ids, vecs, metas, blobs, b.hashes, strict=True):
                    if item_id in self._items:
                        old_keys.append(self._items[item_id][0])
                        self._conn.execute("DELETE FROM items WHERE key = ?", (old_keys[-1],))
                    cur = self._conn.execute(
                        "INSERT INTO items (id, embedding, metadata, states, states_shape, sha256) VALUES (?, ?, ?, ?, ?, ?)",
                        (item_id, vec.tobytes(), meta, *(blob or (None, None)), sha),
                    )
                    keys.append(cur.lastrowid)
            for item_id, key, meta in zip(ids, keys, metas, strict=True):
                old = self._items.pop(item_id, None)  # pop first: a replaced id moves to the end of ids()
                if old is not None:
                    del self._id_of[old[0]]
                self._items[item_id] = (key, meta)
                self._id_of[key] = item_id
            try:
                if old_keys:
                    self._index.remove(_key_array(old_keys))
                self._index.add(_key_array(keys), vecs, threads=0 if n > 1 else 1)
            except Exception:
                log.exception("gallery: index update failed; reconciling with the database")
                self._reconcile()
            self._mutated(n)
        return ids

    def remove(self, id: str) -> bool:
        """Delete an item; False when the id is unknown (the route answers 404)."""
        with self._lock:
            self._check_open()
            entry = self._items.get(id)
            if entry is None:
                return False
            with self._conn:
                self._conn.execute("DELETE FROM items WHERE key = ?", (entry[0],))
            del self._items[id], self._id_of[entry[0]]
            self._index.remove(entry[0])
            self._mutated(1)
            return True

    def _mutated(self, n: int) -> None:
        self._dirty += n
        if self.flush_every and self._dirty >= self.flush_every:
            try:
                self._save_locked()
            except OSError:  # the mutation itself is committed; the next save retries the snapshot
                log.exception("gallery: index snapshot flush failed")

    # ---- queries -------------------------------------------------------------------------------------

    def search(self, query: np.ndarray, top_k: int = 10, exact: bool | None = None) -> list[Hit]:
        """Top-k items by inner product with the (normalised) query, best first.

        exact=None: brute force while the gallery has at most `exact_below` items (cheap and exact), HNSW above.
        """
        q = self._unit_rows(query, single=True)[0]
        top_k = check_positive(top_k, "invalid_top_k", "top_k")
        with self._lock:
            self._check_open()
            n = len(self._items)
            if n == 0:
                return []
            exact = n <= self.exact_below if exact is None else exact
            found = self._index.search(q, min(int(top_k), n), exact=exact, threads=1)
            hits = []
            for key, distance in zip(found.keys, found.distances, strict=True):
                item_id = self._id_of[int(key)]
                meta = self._items[item_id][1]
                hits.append(
                    Hit(item_id, 1.0 - float(distance), None if meta is None else json.loads(meta))
                )  # ip distance = 1 - dot
            return hits

    def states(self, id: str) -> np.ndarray | None:
        """The stored ITM image states (float16 [N_tokens, width]); None for an unknown id or one stored without states."""
        with self._lock:
            self._check_open()
            entry = self._items.get(id)
            if entry is None:
                return None
            row = self._conn.execute("SELECT states, states_shape FROM items WHERE key = ?", (entry[0],)).fetchone()
        if row is None or row[0] is None:
            return None
        return np.frombuffer(row[0], dtype=np.float16).reshape(json.loads(row[1])).copy()

    def get(self, id: str) -> GalleryItem:
        with self._lock:
            self._check_open()
            entry = self._items.get(id)
            if entry is None:
                raise GalleryError("not_found", f"no gallery item with id {id!r:.160}")
            blob, has_states = self._conn.execute(
                "SELECT embedding, states IS NOT NULL FROM items WHERE key = ?", (entry[0],)
            ).fetchone()
        meta = None if entry[1] is None else json.loads(entry[1])
        return GalleryItem(id, np.frombuffer(blob, dtype=np.float32).copy(), meta, bool(has_states))

    def info(self, id: str) -> ItemInfo | None:
        """One item's id, metadata and whether it has states; None for an unknown id (the route answers 404)."""
        with self._lock:
            self._check_open()
            entry = self._items.get(id)
            if entry is None:
                return None
            (has_states,) = self._conn.execute("SELECT states IS NOT NULL FROM items WHERE key = ?", (entry[0],)).fetchone()
        return ItemInfo(id, None if entry[1] is None else json.loads(entry[1]), bool(has_states))

    def hashes(self, ids: Sequence[str]) -> dict[str, tuple[str | None, bool]]:
        with self._lock:
            self._check_open()
            out = {}
            for item_id in ids:
                entry = self._items.get(item_id)
                if entry is not None:
                    row = self._conn.execute("SELECT sha256, states IS NOT NULL FROM items WHERE key = ?", (entry[0],)).fetchone()
                    out[item_id] = (row[0], bool(row[1]))
            return out

    def page(self, limit: int = 100, cursor: str | None = None) -> Page:
        """Items in insertion order (as ids()), `limit` at a time from after `cursor` (None: the start).

        The cursor is the last listed item's key (keys only grow), so paging is stable while items are added or
        removed: nothing is listed twice, and items present throughout are all listed; new ones come last.
        """
        limit = check_positive(limit, "invalid_limit", "limit")
        after = 0
        if cursor is not None:
            if not (isinstance(cursor, str) and cursor.isascii() and cursor.isdigit() and len(cursor) <= 19):
                raise GalleryError("invalid_cursor", f"cursor {cursor!r:.60} is not one this gallery gave out")
            after = int(cursor)
        with self._lock:
            self._check_open()
            rows = self._conn.execute(
                "SELECT key, id, metadata, states IS NOT NULL FROM items WHERE key > ? ORDER BY key LIMIT ?",
                (after, int(limit) + 1),
            ).fetchall()
            total = len(self._items)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [ItemInfo(i, None if m is None else json.loads(m), bool(h)) for _, i, m, h in rows]
        return Page(items, total, str(rows[-1][0]) if more else None)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, id: object) -> bool:
        return id in self._items

    def ids(self) -> list[str]:
        """Ids in insertion order (a replaced id counts as inserted when replaced)."""
        with self._lock:
            return list(self._items)

    # ---- persistence ---------------------------------------------------------------------------------

    def _write_header(self) -> None:
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "model_id": self.model_id,
            "metric": "ip",
            "count": len(self._items),
            "index": INDEX,
            "library": f"usearch {usearch.__version__}",
        }
        atomic_write(self.folder / HEADER, lambda p: p.write_text(json.dumps(header, indent=2) + "\n"))

    def _save_locked(self) -> None:
        # index first, header second: a crash between leaves a newer snapshot, which reconciliation accepts
        atomic_write(self.folder / INDEX, lambda p: self._index.save(str(p)))
        self._write_header()
        self._dirty = 0

    def save(self) -> None:
        """Write the index snapshot and header now (the items themselves are already durable)."""
        with self._lock:
            self._check_open()
            self._save_locked()

    def _check_open(self) -> None:
        if self._conn is None:
            raise RuntimeError(f"gallery {self.folder} is closed")

    def _release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lockfile is not None:
            self._lockfile.close()  # releases the flock
            self._lockfile = None

    def close(self) -> None:
        """Flush the snapshot if it is behind, then release the database and the folder lock."""
        with self._lock:
            try:
                if self._conn is not None and self._dirty:
                    self._save_locked()
            finally:
                self._release()

    def __enter__(self) -> Gallery:
        return self


__all__ = ["DB", "HEADER", "INDEX", "LOCK", "STATUS", "Gallery", "atomic_write"]
