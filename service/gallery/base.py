"""The gallery backend interface and what every backend shares: the item types, the error codes, input checks.

A gallery holds (id -> unit ITC embedding, metadata, optional ITM image states, optional content hash) for one
model, searchable by inner product. Two backends implement it: `embedded` (usearch + SQLite in one folder, one
process: service/gallery/embedded.py) and `chroma` (a Chroma server that every replica shares:
service/gallery/chroma.py). Callers (ModelServer.search/index, the retrieval routes, `trimvlm index build`) see
only this interface; which backend runs is a setting (service/gallery/factory.py).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from service.errors import ServiceError

MAX_ID_CHARS = 128
MAX_METADATA_BYTES = 4096
RETRY_AFTER_S = 2  # what a 503 gallery_unavailable tells the client to wait

# error code -> HTTP status of the response that reports it
STATUS = {
    "invalid_id": 422,
    "invalid_embedding": 422,
    "invalid_metadata": 422,
    "invalid_states": 422,
    "invalid_top_k": 422,
    "invalid_batch": 422,
    "invalid_cursor": 422,
    "invalid_limit": 422,
    "metadata_too_large": 413,
    "not_found": 404,
    "gallery_full": 507,
    # raised on open, i.e. retrieval is unavailable rather than the request being wrong
    "gallery_mismatch": 503,
    "gallery_locked": 503,
    "gallery_corrupt": 503,
    # the shared database does not answer (down, unreachable, timed out): retry later
    "gallery_unavailable": 503,
}


class GalleryError(ServiceError, ValueError):
    """A gallery refusal (the status follows from the code: STATUS)."""

    def __init__(self, code: str, message: str):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if code == "gallery_unavailable" else None
        super().__init__(code, STATUS.get(code, 400), message, headers)


class Hit(NamedTuple):
    id: str
    score: float  # inner product of unit vectors (cosine similarity)
    metadata: dict | None


class ItemInfo(NamedTuple):
    """What the gallery lists about an item (no vectors)."""

    id: str
    metadata: dict | None
    has_states: bool  # ITM image states stored: text searches can re-rank it


class Page(NamedTuple):
    items: list[ItemInfo]
    total: int  # items in the gallery now
    next_cursor: str | None  # pass back as `cursor` for the next page; None on the last page


@dataclass(frozen=True)
class GalleryItem:
    id: str
    embedding: np.ndarray  # float32 [D], unit norm
    metadata: dict | None
    has_states: bool


def check_id(item_id: Any) -> str:
    if not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ID_CHARS or not item_id.isprintable():
        raise GalleryError("invalid_id", f"id must be a printable string of 1..{MAX_ID_CHARS} characters, got {item_id!r:.160}")
    return item_id


def metadata_json(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise GalleryError("invalid_metadata", f"metadata must be a JSON object, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise GalleryError("invalid_metadata", f"metadata is not JSON-serialisable: {e}") from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise GalleryError(
            "metadata_too_large", f"metadata is {len(text.encode())} bytes as JSON; the limit is {MAX_METADATA_BYTES}"
        )
    return text


def states_fp16(states: Any) -> np.ndarray | None:
    """ITM image states as contiguous float16 [N_tokens, width] (ITM input precision; halves the store)."""
    if states is None:
        return None
    arr = np.asarray(states)
    if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise GalleryError("invalid_states", f"states must be a float array [N_tokens, width], got {arr.dtype} {arr.shape}")
    with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
        arr = np.ascontiguousarray(arr, dtype=np.float16)
    if not np.isfinite(arr).all():
        raise GalleryError("invalid_states", "states hold NaN/inf (or values beyond float16 range)")
    return arr


def unit_rows(x: Any, dim: int, single: bool) -> np.ndarray:
    """[B, D] (or one [D] when `single`) as unit rows; refuses a wrong shape, NaN/inf and zero vectors."""
    arr = np.asarray(x, dtype=np.float32)
    if single:
        arr = arr.reshape(1, -1) if arr.size == dim else arr
    if arr.ndim != 2 or arr.shape[1] != dim or (single and arr.shape[0] != 1):
        raise GalleryError("invalid_embedding", f"expected {'[D]' if single else '[B, D]'} with D={dim}, got {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not (np.isfinite(arr).all() and (norms > 0).all()):
        raise GalleryError("invalid_embedding", "embedding holds NaN/inf or is all zeros")
    return arr / norms  # inner product on unit vectors = cosine, whatever the caller sent


def check_positive(value: Any, code: str, name: str) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise GalleryError(code, f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass
class Batch:
    """A validated add_many batch: unit vectors, ids (generated where None), metadata JSON, fp16 states, hashes."""

    vecs: np.ndarray
    ids: list[str]
    metas: list[str | None]
    states: list[np.ndarray | None]
    hashes: list[str | None]


def check_batch(
    embeddings: Any,
    dim: int,
    ids: Sequence[str | None] | None,
    metadata: Sequence[dict | None] | None,
    states: Sequence[np.ndarray | None] | np.ndarray | None,
    hashes: Sequence[str | None] | None,
) -> Batch:
    import uuid

    vecs = unit_rows(embeddings, dim, single=False)
    n = len(vecs)
    ids = [None] * n if ids is None else list(ids)
    metadata = [None] * n if metadata is None else list(metadata)
    states = [None] * n if states is None else list(states)
    hashes = [None] * n if hashes is None else list(hashes)
    if not len(ids) == len(metadata) == len(states) == len(hashes) == n:
        raise GalleryError(
            "invalid_batch",
            f"batch lengths differ: {n} embeddings, {len(ids)} ids, {len(metadata)} metadata, {len(states)} states",
        )
    ids = [uuid.uuid4().hex if i is None else check_id(i) for i in ids]
    if len(set(ids)) != n:
        raise GalleryError("invalid_id", "the batch repeats an id")
    return Batch(vecs, ids, [metadata_json(m) for m in metadata], [states_fp16(s) for s in states], hashes)


class GalleryBackend(ABC):
    """One model's gallery. Every method may raise GalleryError; a shared backend raises
    `gallery_unavailable` (503, Retry-After) while its database does not answer, and recovers by itself.
    Methods block (disk or network): the service calls them on a thread pool, except __len__, which must not
    block (a shared backend answers from the count it saw last)."""

    dim: int
    model_id: str
    kind: str  # "embedded" | "chroma"

    def connect(self) -> None:
        """Reach the store now (the service's readiness check at start-up); raises GalleryError if it cannot."""
        return None

    def add(
        self, embedding: np.ndarray, id: str | None = None, metadata: dict | None = None, states: np.ndarray | None = None
    ) -> str:
        """Store one item (an existing id is replaced); returns its id (uuid4 hex when none was given)."""
        return self.add_many(np.asarray(embedding, dtype=np.float32).reshape(1, -1), [id], [metadata], [states])[0]

    @abstractmethod
    def add_many(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
        states: Sequence[np.ndarray | None] | np.ndarray | None = None,
        hashes: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Store a batch: all of it or (on any invalid item) none of it. `hashes`: content hashes (sha256 of the
        source file) that `index build` uses to skip what is already indexed."""

    @abstractmethod
    def remove(self, id: str) -> bool:
        """Delete an item; False when the id is unknown (the route answers 404)."""

    @abstractmethod
    def search(self, query: np.ndarray, top_k: int = 10, exact: bool | None = None) -> list[Hit]:
        """Top-k items by inner product with the (normalised) query, best first."""

    @abstractmethod
    def states(self, id: str) -> np.ndarray | None:
        """The stored ITM image states (float16 [N_tokens, width]); None for an unknown id or one without states."""

    def states_many(self, ids: Sequence[str]) -> dict[str, np.ndarray | None]:
        return {i: self.states(i) for i in ids}

    @abstractmethod
    def get(self, id: str) -> GalleryItem: ...

    @abstractmethod
    def info(self, id: str) -> ItemInfo | None:
        """One item's id, metadata and whether it has states; None for an unknown id (the route answers 404)."""

    @abstractmethod
    def hashes(self, ids: Sequence[str]) -> dict[str, tuple[str | None, bool]]:
        """For the ids present: (content hash or None, has_states). `index build` skips what matches."""

    @abstractmethod
    def page(self, limit: int = 100, cursor: str | None = None) -> Page:
        """Items in insertion order (a replaced id counts as inserted when replaced), `limit` at a time from
        after `cursor`; stable while items are added or removed."""

    @abstractmethod
    def ids(self) -> list[str]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def __contains__(self, id: object) -> bool:
        return isinstance(id, str) and self.info(id) is not None

    def save(self) -> None:
        """Persist what is only in memory (the embedded index snapshot); a no-op for a database."""
        return None

    def close(self) -> None:
        """Release what the backend holds (the embedded folder lock)."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
