"""The shared gallery backend: one Chroma collection per model in a Chroma server that every replica (and
every worker) reads and writes, so an image indexed through one pod is found by searches answered by another,
and nothing indexed is lost when a pod goes.

Each model has two collections: `<name>` holds what searches read, `<name>-states` what re-ranking reads:
    <name>         id; the unit ITC embedding (float32; HNSW space `ip`: distance = 1 - dot); metadata _seq
                   (insertion order: time in ns), _meta (the item's metadata, JSON), _shape ("N,W" when the item
                   has ITM states), _sha256 (content hash, for `index build`)
    <name>-states  id; a 1-d placeholder embedding; metadata _states: the ITM image states, float16 bytes as
                   base64, shared by every replica so that text searches re-rank alike: 65 x 384 fp16 =
                   48.8 KiB (65 KiB as base64) per image for the default model, 577 x 768 fp16 = 866 KiB
                   (1.15 MiB as base64) at BLIP-base size. Kept apart so that a search, whose results carry
                   their metadata, never transfers states; Chroma stores them as a metadata string (as a
                   document they would be full-text indexed: 16x slower to add, 2.6x the disk, measured).
The states are written before the item, so a reader that finds an item finds its states.

The collection's own metadata names the model and the dim, so another model's embeddings are refused
(gallery_mismatch). The `chromadb` client is imported only when this backend is chosen (`trimvlm[chroma]`).

Failure: while the server does not answer, every call raises GalleryError("gallery_unavailable") (503 with
Retry-After) quickly: after one failure, calls fail at once for `retry_s` before the next real attempt, so a
dead database never holds the service's threads. The first call that gets through reconnects; nothing to
restart. Replacing an id deletes the old record and adds the new one (two calls; a crash between them loses
the item being replaced, nothing else).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np

from service.gallery.base import (
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

log = logging.getLogger("trimvlm.gallery")  # the service's JSON log lines (outages are operational news)

FORMAT = "trimvlm-gallery"
INSTALL_HINT = "the chroma gallery backend needs the Chroma client: pip install 'trimvlm[chroma]'"


def _states_from(meta: dict | None) -> np.ndarray | None:
    text, shape = (meta or {}).get("_states"), (meta or {}).get("_shape")
    if not text or not shape:
        return None
    n, w = (int(x) for x in shape.split(","))
    return np.frombuffer(base64.b64decode(text), dtype=np.float16).reshape(n, w).copy()


def _user_meta(meta: dict | None) -> dict | None:
    text = (meta or {}).get("_meta")
    return None if text is None else json.loads(text)


class ChromaGallery(GalleryBackend):
    kind = "chroma"

    def __init__(
        self,
        url: str,
        collection: str,
        dim: int,
        model_id: str,
        *,
        max_items: int = 100_000,
        connect_timeout_s: float = 2.0,
        timeout_s: float = 10.0,
        retry_s: float = 1.0,
    ):
        self.url, self.collection_name = url.rstrip("/"), collection
        self.dim, self.model_id, self.max_items = int(dim), str(model_id), max_items
        self.connect_timeout_s, self.timeout_s, self.retry_s = connect_timeout_s, timeout_s, retry_s
        parsed = urlparse(self.url if "://" in self.url else f"http://{self.url}")
        self._host, self._ssl = parsed.hostname or "localhost", parsed.scheme == "https"
        self._port = parsed.port or (443 if self._ssl else 8000)
        self._lock = threading.Lock()  # guards connecting and the outage state, not the calls themselves
        self._col: Any = None
        self._states_col: Any = None
        self._client: Any = None
        self._count = 0
        self._down_until = 0.0
        self._outage: str | None = None  # why the last call failed; None while the database answers

    # ---- connection ----------------------------------------------------------------------------------

    def _unavailable(self, why: str) -> GalleryError:
        return GalleryError(
            "gallery_unavailable",
            f"the gallery database (chroma at {self.url}) does not answer: {why}; retrieval resumes when it does",
        )

    def _collection(self) -> Any:
        with self._lock:
            if self._col is not None:
                return self._col
            if time.monotonic() < self._down_until:
                raise self._unavailable(self._outage or "down")
            try:
                self._col = self._open()
            except GalleryError:
                raise
            except ImportError:
                raise RuntimeError(INSTALL_HINT) from None
            except Exception as e:
                self._failed(e)
                raise self._unavailable(self._outage or str(e)) from None
            return self._col

    def _open(self) -> Any:
        import chromadb
        import httpx
        from chromadb.config import Settings as ChromaSettings

        # a cheap look first, with our timeouts (the client's own first request waits for ever)
        scheme = "https" if self._ssl else "http"
        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        httpx.get(f"{scheme}://{self._host}:{self._port}/api/v2/heartbeat", timeout=timeout).raise_for_status()
        client = chromadb.HttpClient(
            host=self._host, port=self._port, ssl=self._ssl, settings=ChromaSettings(anonymized_telemetry=False)
        )
        self._client = client
        session = getattr(getattr(client, "_server", None), "_session", None)
        if session is not None:  # chromadb's HTTP session has no timeout of its own
            session.timeout = timeout
        col = client.get_or_create_collection(
            self.collection_name,
            embedding_function=None,
            metadata={"format": FORMAT, "model_id": self.model_id, "dim": self.dim},
            configuration={"hnsw": {"space": "ip"}},
        )
        self._states_col = client.get_or_create_collection(
            f"{self.collection_name}-states",
            embedding_function=None,
            metadata={"format": FORMAT, "states_of": self.collection_name},
        )
        meta = col.metadata or {}
        for what, wanted in (("dim", self.dim), ("model_id", self.model_id)):
            if meta.get(what) != wanted:
                raise GalleryError(
                    "gallery_mismatch",
                    f"chroma collection {self.collection_name} at {self.url} holds embeddings with {what}={meta.get(what)!r}, "
                    f"but the model gives {what}={wanted!r}; use another TRIMVLM_GALLERY_COLLECTION or delete it",
                )
        self._count = col.count()
        if self._outage is not None:
            log.warning("gallery: chroma at %s answers again; retrieval resumed", self.url)
        else:
            log.info("gallery: chroma collection %s at %s open (%d items)", self.collection_name, self.url, self._count)
        self._outage = None
        return col

    def _failed(self, e: BaseException) -> None:
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if self._outage is None:  # one line per outage, not one per request
            log.error("gallery: chroma at %s unreachable (%s); retrieval answers 503 until it is back", self.url, why)
        self._outage, self._col = why, None
        self._down_until = time.monotonic() + self.retry_s

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        col = self._collection()
        try:
            return fn(col)
        except GalleryError:
            raise
        except Exception as e:
            with self._lock:
                self._failed(e)
            raise self._unavailable(self._outage or str(e)) from None

    def connect(self) -> None:
        self._collection()

    @property
    def available(self) -> bool:
        return self._outage is None

    # ---- mutations -----------------------------------------------------------------------------------

    def add_many(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
        states: Sequence[np.ndarray | None] | np.ndarray | None = None,
        hashes: Sequence[str | None] | None = None,
    ) -> list[str]:
        b = check_batch(embeddings, self.dim, ids, metadata, states, hashes)
        seq0 = time.time_ns()
        metas, with_states = [], []
        for i, (item_id, meta, st, sha) in enumerate(zip(b.ids, b.metas, b.states, b.hashes, strict=True)):
            m: dict[str, Any] = {"_seq": seq0 + i}
            if meta is not None:
                m["_meta"] = meta
            if st is not None:
                m["_shape"] = f"{st.shape[0]},{st.shape[1]}"
                blob = base64.b64encode(st.tobytes()).decode("ascii")
                with_states.append((item_id, {"_states": blob, "_shape": m["_shape"]}))
            if sha is not None:
                m["_sha256"] = sha
            metas.append(m)

        def add(col: Any) -> None:
            existing = col.get(ids=b.ids, include=[])["ids"]
            total = col.count()
            if total + len(b.ids) - len(existing) > self.max_items:
                raise GalleryError("gallery_full", f"gallery holds {total} of at most {self.max_items} items")
            if existing:
                col.delete(ids=existing)
                self._states_col.delete(ids=existing)
            if with_states:  # states first: whoever finds the item finds its states
                ids, smetas = zip(*with_states, strict=True)
                self._states_col.add(ids=list(ids), embeddings=np.zeros((len(ids), 1), np.float32), metadatas=list(smetas))
            col.add(ids=b.ids, embeddings=b.vecs, metadatas=metas)
            self._count = col.count()

        self._call(add)
        return b.ids

    def remove(self, id: str) -> bool:
        def remove(col: Any) -> bool:
            if not col.get(ids=[id], include=[])["ids"]:
                return False
            col.delete(ids=[id])
            self._states_col.delete(ids=[id])
            self._count = col.count()
            return True

        return self._call(remove)

    # ---- queries -------------------------------------------------------------------------------------

    def search(self, query: np.ndarray, top_k: int = 10, exact: bool | None = None) -> list[Hit]:
        """Top-k by inner product (Chroma's HNSW; `exact` is not offered by the server and is ignored)."""
        q = unit_rows(query, self.dim, single=True)
        top_k = check_positive(top_k, "invalid_top_k", "top_k")

        def search(col: Any) -> list[Hit]:
            self._count = n = col.count()
            if n == 0:
                return []
            r = col.query(query_embeddings=q, n_results=min(top_k, n), include=["metadatas", "distances"])
            return [
                Hit(i, 1.0 - float(d), _user_meta(m))
                for i, d, m in zip(r["ids"][0], r["distances"][0], r["metadatas"][0], strict=True)
            ]

        return self._call(search)

    def states_many(self, ids: Sequence[str]) -> dict[str, np.ndarray | None]:
        ids = list(ids)
        if not ids:
            return {}
        r = self._call(lambda col: self._states_col.get(ids=ids, include=["metadatas"]))
        found = {i: _states_from(m) for i, m in zip(r["ids"], r["metadatas"], strict=True)}
        return {i: found.get(i) for i in ids}

    def states(self, id: str) -> np.ndarray | None:
        return self.states_many([id])[id]

    def get(self, id: str) -> GalleryItem:
        r = self._call(lambda col: col.get(ids=[id], include=["embeddings", "metadatas"]))
        if not r["ids"]:
            raise GalleryError("not_found", f"no gallery item with id {id!r:.160}")
        m = r["metadatas"][0]
        return GalleryItem(id, np.asarray(r["embeddings"][0], dtype=np.float32), _user_meta(m), "_shape" in (m or {}))

    def info(self, id: str) -> ItemInfo | None:
        r = self._call(lambda col: col.get(ids=[id], include=["metadatas"]))
        if not r["ids"]:
            return None
        m = r["metadatas"][0]
        return ItemInfo(id, _user_meta(m), "_shape" in (m or {}))

    def hashes(self, ids: Sequence[str]) -> dict[str, tuple[str | None, bool]]:
        ids = list(ids)
        if not ids:
            return {}
        r = self._call(lambda col: col.get(ids=ids, include=["metadatas"]))
        return {i: ((m or {}).get("_sha256"), "_shape" in (m or {})) for i, m in zip(r["ids"], r["metadatas"], strict=True)}

    def page(self, limit: int = 100, cursor: str | None = None) -> Page:
        """Items in insertion order (`_seq`) after `cursor` (the last listed item's `_seq`). The server does not
        sort, so a page reads the seq of every later item: fine for listing, not a hot path."""
        limit = check_positive(limit, "invalid_limit", "limit")
        after = 0
        if cursor is not None:
            if not (isinstance(cursor, str) and cursor.isascii() and cursor.isdigit() and len(cursor) <= 19):
                raise GalleryError("invalid_cursor", f"cursor {cursor!r:.60} is not one this gallery gave out")
            after = int(cursor)

        def page(col: Any) -> tuple[list, int]:
            r = col.get(where={"_seq": {"$gt": after}}, include=["metadatas"])
            self._count = col.count()
            return sorted(zip(r["ids"], r["metadatas"], strict=True), key=lambda x: x[1]["_seq"]), self._count

        rows, total = self._call(page)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [ItemInfo(i, _user_meta(m), "_shape" in m) for i, m in rows]
        return Page(items, total, str(rows[-1][1]["_seq"]) if more else None)

    def ids(self) -> list[str]:
        out, cursor = [], None
        while True:
            p = self.page(10_000, cursor)
            out += [i.id for i in p.items]
            if p.next_cursor is None:
                return out
            cursor = p.next_cursor

    def __len__(self) -> int:
        return self._count  # never blocks: the count seen by the last call (searches refresh it)

    def drop(self) -> None:
        """Delete the collection (tests and benchmarks)."""

        def drop(col: Any) -> None:
            self._client.delete_collection(self.collection_name)
            self._client.delete_collection(f"{self.collection_name}-states")

        self._call(drop)
        self._col = self._states_col = None
