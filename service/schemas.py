"""Request and response bodies (pydantic), with the examples shown in the OpenAPI docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_IMAGE_DOC = "Base64 image, a data URI (data:image/png;base64,...), or an http(s) URL when the server allows URLs."
_COMPUTE_DOC = (
    "`auto` (the most accurate level that meets the deadline), a level name (full, balanced, fast), or {max_flops_ratio}."
)
# A real (2x2 red) PNG, so the documented examples run as they are (they were a truncated, undecodable stub)
_PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR42mP8z8DAwMDAxMDAwMDAAAANHQEDaB7T3gAAAABJRU5ErkJggg=="  # noqa: E501


class MaxFlops(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_flops_ratio: float = Field(gt=0, le=1, description="Run the most accurate level within this share of full FLOPs.")


Compute = str | MaxFlops


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VQAItem(Strict):
    image: str = Field(description=_IMAGE_DOC)
    question: str = Field(min_length=1)
    top_k: int = Field(1, ge=1, le=20)
    compute: Compute = Field("auto", description=_COMPUTE_DOC)
    deadline_ms: float | None = Field(
        None, gt=0, description="Answer within this many ms of arrival, or get 504 (also X-Deadline-Ms)."
    )
    model: str | None = Field(None, description="name or name/version; default: the server's default model.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image": _PNG, "question": "what shape is in the image?", "top_k": 3, "compute": "auto", "deadline_ms": 250}
            ]
        },
    )


class VQABatch(Strict):
    items: list[VQAItem] = Field(min_length=1)


class AnswerScore(BaseModel):
    answer: str
    score: float


class ComputeOut(BaseModel):
    level: str
    flops_ratio: float
    tokens_kept: int | None = Field(None, description="Image tokens kept (of tokens_total) by per-instance trimming.")
    tokens_total: int | None = None
    reason: str = Field(description="Why this level: requested, fits, deadline, no_deadline, max_flops_ratio.")


class VQAResponse(BaseModel):
    answer: str
    score: float
    top_k: list[AnswerScore]
    compute: ComputeOut
    model: str
    latency_ms: float

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "answer": "circle",
                    "score": 0.97,
                    "top_k": [{"answer": "circle", "score": 0.97}, {"answer": "rectangle", "score": 0.02}],
                    "compute": {
                        "level": "balanced",
                        "flops_ratio": 0.41,
                        "tokens_kept": 9,
                        "tokens_total": 65,
                        "reason": "deadline",
                    },
                    "model": "trimvlm-default/1",
                    "latency_ms": 3.1,
                }
            ]
        }
    )


class CaptionItem(Strict):
    image: str = Field(description=_IMAGE_DOC)
    max_length: int | None = Field(None, ge=1, description="Maximum caption tokens (default: the model's).")
    num_beams: int = Field(1, ge=1, description="1: greedy; more: beam search.")
    deadline_ms: float | None = Field(None, gt=0)
    model: str | None = None

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"image": _PNG, "max_length": 20, "num_beams": 3}]})


class CaptionBatch(Strict):
    items: list[CaptionItem] = Field(min_length=1)


class CaptionResponse(BaseModel):
    caption: str
    compute: ComputeOut
    model: str
    latency_ms: float


class RankRequest(Strict):
    image: str | None = Field(None, description="One image against `texts`.")
    texts: list[str] | None = None
    text: str | None = Field(None, description="One text against `images`.")
    images: list[str] | None = None
    rerank: bool = Field(True, description="Score with the ITM head (more accurate) rather than ITC cosine alone.")
    deadline_ms: float | None = Field(None, gt=0)
    model: str | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image": _PNG, "texts": ["a red circle", "a blue square"]},
                {"text": "a red circle", "images": [_PNG, _PNG]},
            ]
        },
    )


class RankResponse(BaseModel):
    scores: list[float] = Field(description="Per candidate, in request order: ITM match probability (rerank) or ITC cosine.")
    itc_scores: list[float]
    ranking: list[int] = Field(description="Candidate indices, best first.")
    model: str
    latency_ms: float


class SearchRequest(Strict):
    text: str | None = None
    image: str | None = None
    top_k: int = Field(5, ge=1)
    rerank: bool = Field(True, description="Re-rank the ITC top candidates with ITM (text queries).")
    deadline_ms: float | None = Field(None, gt=0)
    model: str | None = None

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "a green triangle", "top_k": 5}]})


class SearchHit(BaseModel):
    id: str
    score: float
    itc_score: float
    metadata: dict | None = None


class SearchResponse(BaseModel):
    results: list[SearchHit]
    gallery_size: int
    model: str
    latency_ms: float


class IndexItem(Strict):
    image: str = Field(description=_IMAGE_DOC)
    id: str | None = Field(
        None, max_length=128, description="Your id; a new one is generated when absent. Re-using an id replaces it."
    )
    metadata: dict | None = None
    model: str | None = None

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image": _PNG, "id": "scene-0001", "metadata": {"source": "camera-3"}}]}
    )


class IndexBatch(Strict):
    items: list[IndexItem] = Field(min_length=1)


class IndexResponse(BaseModel):
    id: str
    gallery_size: int


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelInfo(BaseModel):
    id: str
    ready: bool
    tasks: list[str]
    levels: dict[str, dict]
    backend: dict
    precision: str
    default: bool


class Health(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    models: dict[str, bool] = {}
    error: str | None = Field(None, description="Why loading failed (status `unavailable`).")


class VQABatchResponse(BaseModel):
    results: list[VQAResponse]


class CaptionBatchResponse(BaseModel):
    results: list[CaptionResponse]


class IndexBatchResponse(BaseModel):
    results: list[IndexResponse]
