"""Health (live / ready, KServe-V2 aliases), the model list, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.routes.common import state
from service.schemas import Health, ModelInfo

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process serves HTTP")
@router.get("/v2/health/live", include_in_schema=False)
async def live():
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: every model loaded and a real warm-up inference passed",
    response_model=Health,
    response_model_exclude_none=True,
    responses={
        503: {
            "model": Health,
            "description": "Not ready: still loading, loading failed, or the shared gallery unreachable since start-up "
            "(`error` says why)",
        }
    },
)
@router.get("/v2/health/ready", include_in_schema=False)
async def ready(request: Request):
    st = state(request)
    models = {mid: srv.ready for mid, srv in st.servers.items()}
    if st.load_error:
        return JSONResponse({"status": "unavailable", "models": models, "error": st.load_error}, status_code=503)
    if st.loading or not models or not all(models.values()):
        return JSONResponse({"status": "loading", "models": models}, status_code=503)
    if st.gallery_error:  # a shared gallery's database unreachable since start-up
        return JSONResponse({"status": "unavailable", "models": models, "error": st.gallery_error}, status_code=503)
    return {"status": "ok", "models": models}


@router.get(
    "/v1/models",
    response_model=list[ModelInfo],
    summary="Served models: domain, answer list, input size, compute levels and runtime",
)
async def models(request: Request):
    st = state(request)
    return [ModelInfo(id=mid, ready=srv.ready, default=mid == st.default, **srv.describe()) for mid, srv in st.servers.items()]


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request):
    st = state(request)
    for srv in st.servers.values():
        for name, depth in srv.queue_depths().items():
            st.metrics.queue_size.labels(srv.id, name).set(depth)
    if st.settings.tracing and "application/openmetrics-text" in request.headers.get("accept", ""):
        # exemplars (trace ids on vlm_request_duration_seconds) exist only in the OpenMetrics format
        from prometheus_client.openmetrics import exposition

        return Response(exposition.generate_latest(st.metrics.registry), media_type=exposition.CONTENT_TYPE_LATEST)
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)
