"""Retrieval: rank candidates, search the gallery (ITC top-k, ITM re-ranking), manage the gallery."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from fastapi import APIRouter, Query, Request

from service.errors import ServiceError
from service.routes.common import (
    call,
    deadline_for,
    field,
    image_payload,
    item_error,
    json_model,
    ms_since,
    parse,
    state,
)
from service.schemas import (
    IndexBatch,
    IndexBatchResponse,
    IndexEntry,
    IndexItem,
    IndexListResponse,
    IndexResponse,
    RankRequest,
    RankResponse,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from service.server import ModelServer, TextInput

router = APIRouter(prefix="/retrieval", tags=["retrieval"])


async def _pixels(request: Request, srv: ModelServer, payloads: list) -> list[np.ndarray]:
    st = state(request)
    return list(await asyncio.gather(*(st.image_pixels(p, srv, "retrieval") for p in payloads)))


async def _tokens(request: Request, srv: ModelServer, texts: list[str]) -> list[TextInput]:
    st = state(request)
    return await st.run_pre(st.tokenize, texts, srv, "retrieval")


@router.post("/rank", response_model=RankResponse, summary="Rank candidate texts for an image, or candidate images for a text")
async def rank(request: Request, body: RankRequest):
    st = state(request)
    t0 = time.perf_counter()
    srv = st.server(body.model)
    request.state.model = srv.id
    deadline = deadline_for(request, body.deadline_ms)
    image_query = body.image is not None and body.texts is not None
    text_query = body.text is not None and body.images is not None
    if image_query == text_query or (body.image is not None and body.text is not None):
        raise ServiceError("invalid_request", 422, 'send either {"image", "texts": [...]} or {"text", "images": [...]}')
    candidates = body.texts if image_query else body.images
    if not candidates:
        raise ServiceError("invalid_request", 422, "the candidate list is empty")
    if len(candidates) > st.settings.max_candidates:
        raise ServiceError("too_many_items", 413, f"{len(candidates)} candidates; the limit is {st.settings.max_candidates}")
    if image_query:
        [query] = await _pixels(request, srv, [body.image])
        candidates = await _tokens(request, srv, candidates)
    else:
        [query] = await _tokens(request, srv, [body.text])
        candidates = await _pixels(request, srv, candidates)
    ranked = await srv.rank(query, candidates, body.rerank, call(request, "retrieval", deadline))
    ranks = ranked.rank_scores
    ranking = sorted(range(len(ranks)), key=lambda i: -ranks[i])
    return json_model(
        RankResponse(
            scores=[float(s) for s in ranked.scores],
            itc_scores=ranked.itc_scores,
            rank_scores=[float(r) for r in ranks],
            ranking=ranking,
            model=srv.id,
            latency_ms=ms_since(t0),
        )
    )


@router.post("/search", response_model=SearchResponse, summary="Search the gallery with a text or an image")
async def search(request: Request, body: SearchRequest):
    st = state(request)
    t0 = time.perf_counter()
    srv = st.server(body.model)
    request.state.model = srv.id
    if (body.text is None) == (body.image is None):
        raise ServiceError("invalid_request", 422, 'send exactly one of "text" or "image"')
    if body.top_k > st.settings.max_top_k:
        raise ServiceError("invalid_request", 422, f"top_k {body.top_k} exceeds the limit of {st.settings.max_top_k}")
    deadline = deadline_for(request, body.deadline_ms)
    gallery = st.gallery(srv)
    if body.text is not None:
        [query] = await _tokens(request, srv, [body.text])
    else:
        [query] = await _pixels(request, srv, [body.image])
    rerank = st.settings.rerank_top_k if body.rerank else 0
    hits = await srv.search(query, gallery, body.top_k, rerank, call(request, "retrieval", deadline), st.preprocess_pool)
    results = [
        SearchHit(id=h.id, score=h.score, itc_score=h.itc_score, rank_score=h.rank_score, metadata=h.metadata) for h in hits
    ]
    return json_model(SearchResponse(results=results, gallery_size=len(gallery), model=srv.id, latency_ms=ms_since(t0)))


@router.post(
    "/index",
    response_model=IndexResponse | IndexBatchResponse,
    summary="Add an image to the gallery",
    openapi_extra={"x-trimvlm-body": ("IndexItem", "IndexBatch", True)},
)
async def index_add(request: Request):
    """JSON (one item or `{"items": [...]}` -> `{"results": [...]}`) or multipart (`image` file,
    `id` and `metadata` (JSON text) fields). Re-using an id replaces that entry."""
    st = state(request)
    items, is_batch = await parse(request, IndexItem, IndexBatch, st.settings.max_items)

    async def add(item: IndexItem) -> IndexResponse:
        srv = st.server(item.model)
        request.state.model = srv.id
        gallery = st.gallery(srv)
        with field("image"):
            [pixels] = await _pixels(request, srv, [image_payload(item)])
        new_id = await srv.index(pixels, gallery, item.id, item.metadata, call(request, "retrieval", None), st.preprocess_pool)
        return IndexResponse(id=new_id, gallery_size=len(gallery))

    results = []
    for i, it in enumerate(items):  # sequential: ids in a batch may repeat and later ones must win
        try:
            results.append(await add(it))
        except ServiceError as e:  # the items before it are in the gallery: say which one failed
            if not is_batch:
                raise
            raise item_error(i, e) from e
    return json_model(results if is_batch else results[0], is_batch)


@router.get("/index", response_model=IndexListResponse, summary="List the gallery's items, a page at a time")
async def index_list(
    request: Request,
    limit: int | None = Query(None, ge=1, description="Items in this page (default 100; at most TRIMVLM_GALLERY_PAGE_MAX)."),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page; absent: the first page."),
    model: str | None = None,
):
    """Ids and metadata in insertion order, with the total; stable while items are added or removed."""
    st = state(request)
    srv = st.server(model)
    limit = min(100, st.settings.gallery_page_max) if limit is None else limit
    if limit > st.settings.gallery_page_max:
        raise ServiceError("invalid_request", 422, f"limit {limit} exceeds the limit of {st.settings.gallery_page_max}")
    gallery = st.gallery(srv)
    page = await asyncio.get_running_loop().run_in_executor(st.preprocess_pool, gallery.page, limit, cursor)
    items = [IndexEntry(id=i.id, metadata=i.metadata, has_states=i.has_states) for i in page.items]
    return json_model(IndexListResponse(items=items, total=page.total, next_cursor=page.next_cursor, model=srv.id))


# {item_id:path}: ids may hold "/" (`trimvlm index build` names items by their relative path)
@router.get("/index/{item_id:path}", response_model=IndexEntry, summary="One gallery item's metadata")
async def index_get(request: Request, item_id: str, model: str | None = None):
    st = state(request)
    srv = st.server(model)
    gallery = st.gallery(srv)
    info = await asyncio.get_running_loop().run_in_executor(st.preprocess_pool, gallery.info, item_id)
    if info is None:
        raise ServiceError("unknown_id", 404, f"no gallery item {item_id!r}")
    return json_model(IndexEntry(id=info.id, metadata=info.metadata, has_states=info.has_states))


@router.delete("/index/{item_id:path}", summary="Remove an image from the gallery")
async def index_remove(request: Request, item_id: str, model: str | None = None):
    st = state(request)
    srv = st.server(model)
    gallery = st.gallery(srv)
    removed = await asyncio.get_running_loop().run_in_executor(st.preprocess_pool, gallery.remove, item_id)
    if not removed:
        raise ServiceError("unknown_id", 404, f"no gallery item {item_id!r}")
    return {"id": item_id, "removed": True, "gallery_size": len(gallery)}
