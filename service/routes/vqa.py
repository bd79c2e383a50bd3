"""POST /vqa: image + question -> answer, at a per-request compute level."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from service.errors import ServiceError
from service.routes.common import (
    deadline_figures,
    deadline_for,
    field,
    gather_items,
    image_payload,
    json_model,
    ms_since,
    parse,
    remaining,
    state,
    submit,
)
from service.schemas import AnswerScore, ComputeOut, MaxFlops, VQABatch, VQABatchResponse, VQAItem, VQAResponse

router = APIRouter(tags=["tasks"])


async def answer_one(request: Request, item: VQAItem, t0: float) -> VQAResponse:
    st = state(request)
    srv = st.server(item.model)
    request.state.model = srv.id
    deadline = deadline_for(request, item.deadline_ms)
    payload = image_payload(item)

    def preprocess():  # together: one trip to the pool for a large image, none for a small one
        with field("image"):
            pixels = st.decode_image(payload, srv, "vqa")
        with field("question"):
            ids_mask = st.tokenize([item.question], srv, "vqa")[0]  # validates the text first
        return pixels, ids_mask, srv.tasks.unknown_words(item.question)

    pixels, (ids, mask), unknown = await st.run_pre(preprocess, inline=st.preprocess_inline(payload))
    compute = item.compute
    defaulted = compute == "auto" and isinstance(compute, str) and st.settings.default_compute != "auto"
    if defaulted:
        compute = st.settings.default_compute
    async with deadline_figures(request):
        level, reason = srv.pick_level(compute.model_dump() if isinstance(compute, MaxFlops) else compute, remaining(deadline))
    if defaulted and reason == "requested":  # the server's TRIMVLM_DEFAULT_COMPUTE level, not the client's
        reason = "default"
    st.metrics.level_decisions.labels("vqa", level, reason).inc()
    request.state.level = level
    picked_at, predicted = time.perf_counter(), srv.predicted_s(level)
    try:
        logits, kept = await submit(request, srv.batchers[f"vqa/{level}"], (pixels, ids, mask), deadline, "vqa", srv.id)
    except ServiceError as e:
        if e.status == 504:  # late ones count too (at least this long), or the margin learns only from successes
            srv.record_outcome(level, predicted, time.perf_counter() - picked_at)
        raise
    tp = time.perf_counter()
    top = srv.answers(logits, item.top_k)
    srv.record_outcome(level, predicted, time.perf_counter() - picked_at)
    info = srv.compute_info(level, kept, reason)
    if kept is not None:
        st.metrics.kept_token_ratio.labels(srv.id, level).observe(kept / srv.image_tokens)
    st.metrics.postprocess_duration.labels("vqa").observe(time.perf_counter() - tp)
    return VQAResponse(
        answer=top[0][0],
        score=top[0][1],
        top_k=[AnswerScore(answer=a, score=s) for a, s in top],
        compute=ComputeOut(**info.__dict__),
        model=srv.id,
        latency_ms=ms_since(t0),
        warnings=[f"words not in the model's vocabulary: {', '.join(unknown)}"] if unknown else [],
    )


@router.post(
    "/vqa",
    response_model=VQAResponse | VQABatchResponse,
    summary="Answer a question about an image",
    openapi_extra={"x-trimvlm-body": ("VQAItem", "VQABatch", True)},
)
async def vqa(request: Request):
    """JSON (one item, or `{"items": [...]}` -> `{"results": [...]}`) or multipart (`image` file +
    `question` form field). `compute`: auto | full | accurate | balanced | fast | {"max_flops_ratio": x}.
    Question words the model never saw in training are named in `warnings` (it still answers, from
    its closed answer list: see GET /v1/models for what each model knows)."""
    st = state(request)
    t0 = time.perf_counter()
    items, is_batch = await parse(request, VQAItem, VQABatch, st.settings.max_items)
    results = await gather_items((answer_one(request, it, t0) for it in items), is_batch)
    return json_model(results if is_batch else results[0], is_batch)
