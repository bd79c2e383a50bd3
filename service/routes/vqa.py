"""POST /vqa: image + question -> answer, at a per-request compute level."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from service.errors import InvalidRequest
from service.routes.common import (
    call,
    deadline_figures,
    deadline_for,
    field,
    gather_items,
    image_payload,
    json_model,
    ms_since,
    parse,
    state,
)
from service.schemas import AnswerScore, ComputeOut, MaxFlops, VQABatch, VQABatchResponse, VQAItem, VQAResponse

router = APIRouter(tags=["tasks"])


async def answer_one(request: Request, item: VQAItem, t0: float) -> VQAResponse:
    st = state(request)
    srv = st.server(item.model)
    request.state.model = srv.id
    if item.num_beams > 1:
        if srv.tasks.vqa_mode != "generative":
            raise InvalidRequest(f"model {srv.id} picks answers from a closed list: num_beams applies to generative models")
        if item.num_beams > st.settings.max_beams:
            raise InvalidRequest(f"num_beams {item.num_beams} exceeds the limit of {st.settings.max_beams}")
    deadline = deadline_for(request, item.deadline_ms)
    payload, inline = st.prepare_image(image_payload(item))

    def preprocess():  # together: one trip to the pool for a large image, none for a small one
        with field("image"):
            pixels = st.decode_image(payload, srv, "vqa")
        with field("question"):
            question = st.tokenize([item.question], srv, "vqa")[0]  # validates the text first
        return pixels, question, srv.unknown_words(item.question)

    pixels, question, unknown = await st.run_pre(preprocess, inline=inline)
    compute = item.compute.model_dump() if isinstance(item.compute, MaxFlops) else item.compute
    async with deadline_figures(request):
        answer = await srv.vqa(pixels, question, compute, item.top_k, call(request, "vqa", deadline), item.num_beams)
    return VQAResponse(
        answer=answer.top[0][0],
        score=answer.top[0][1],
        top_k=[AnswerScore(answer=a, score=s) for a, s in answer.top],
        compute=ComputeOut(**answer.compute.__dict__),
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
    Question words the model never saw in training are named in `warnings` (it still answers).
    A model answers from its closed answer list or, if GET /v1/models shows `vqa: generative`
    (BLIP's VQA checkpoints), writes an open-vocabulary answer with its decoder (greedy, or beam
    search with `num_beams`); `score` is then the probability of the whole answer."""
    st = state(request)
    t0 = time.perf_counter()
    items, is_batch = await parse(request, VQAItem, VQABatch, st.settings.max_items)
    results = await gather_items((answer_one(request, it, t0) for it in items), is_batch)
    return json_model(results if is_batch else results[0], is_batch)
