"""POST /caption: image -> caption (greedy or beam search)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from service.errors import ServiceError
from service.routes.common import call, deadline_for, field, gather_items, image_payload, json_model, ms_since, parse, state
from service.schemas import CaptionBatch, CaptionBatchResponse, CaptionItem, CaptionResponse, ComputeOut

router = APIRouter(tags=["tasks"])


def caption_limit(srv, service_limit: int) -> tuple[int, str]:
    """The longest caption a request may ask of this model, and why when the model sets it: the
    service's TRIMVLM_MAX_CAPTION_LENGTH, or less when the model's decoder has fewer text positions
    (the manifest's preprocessing.max_positions: [DEC] at position 0, a caption of n tokens feeds
    positions 0..n-1). Beyond them the decoder graph fails, so they are refused (422) up front."""
    positions = srv.decoder_positions
    if positions is not None and positions < service_limit:
        return positions, f" (the model's decoder has {positions} text positions)"
    return service_limit, ""


async def caption_one(request: Request, item: CaptionItem, t0: float) -> CaptionResponse:
    st = state(request)
    srv = st.server(item.model)
    request.state.model = srv.id
    s = st.settings
    limit, why = caption_limit(srv, s.max_caption_length)
    max_length = item.max_length or min(srv.max_caption_length, limit)
    if max_length > limit:
        raise ServiceError("invalid_request", 422, f"max_length {max_length} exceeds the limit of {limit}{why}")
    if item.num_beams > s.max_beams:
        raise ServiceError("invalid_request", 422, f"num_beams {item.num_beams} exceeds the limit of {s.max_beams}")
    deadline = deadline_for(request, item.deadline_ms)
    payload = image_payload(item)
    with field("image"):
        pixels = await st.image_pixels(payload, srv, "caption")
    text, compute = await srv.caption(pixels, max_length, item.num_beams, call(request, "caption", deadline))
    return CaptionResponse(caption=text, compute=ComputeOut(**compute.__dict__), model=srv.id, latency_ms=ms_since(t0))


@router.post(
    "/caption",
    response_model=CaptionResponse | CaptionBatchResponse,
    summary="Caption an image",
    openapi_extra={"x-trimvlm-body": ("CaptionItem", "CaptionBatch", True)},
)
async def caption(request: Request):
    """JSON (one item or `{"items": [...]}`) or multipart (`image` file; `max_length`, `num_beams` fields)."""
    st = state(request)
    t0 = time.perf_counter()
    items, is_batch = await parse(request, CaptionItem, CaptionBatch, st.settings.max_items)
    results = await gather_items((caption_one(request, it, t0) for it in items), is_batch)
    return json_model(results if is_batch else results[0], is_batch)
