"""Request and response bodies (pydantic), with the examples shown in the OpenAPI docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_IMAGE_DOC = "Base64 image, a data URI (data:image/png;base64,...), or an http(s) URL when the server allows URLs."
_COMPUTE_DOC = (
    "`auto` (the most accurate level that meets the deadline; without a deadline, the server's "
    "TRIMVLM_AUTO_WITHOUT_DEADLINE, default `full`), a level name, or {max_flops_ratio}. The embedded default's "
    "levels (GET /v1/models lists each model's, with its FLOPs ratio and accuracy): `full` (untrimmed), "
    "`accurate` (light trimming: ~65% of full's FLOPs, within 0.5 point of full's easy-VQA validation accuracy), "
    "`balanced` (~41% of the FLOPs, within 1 point), `fast` (~32%, within 3 points)."
)
_WARNINGS_DOC = (
    "What makes this answer doubtful, e.g. `words not in the model's vocabulary: giraffe` for question words "
    "outside the words of the model's training texts (the manifest's known_words; for a model without that list, "
    "words its tokenizer maps to [UNK]). The model answers anyway, from its closed answer list; empty when nothing "
    "was noticed. An empty list does not mean the image is in the model's domain: it is not checked."
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
    top_k: int = Field(
        1,
        ge=1,
        le=20,
        description="Closed-vocabulary models: the k most likely answers. Generative models (GET /v1/models: "
        "`vqa: generative`) write one answer, so `top_k` lists that one.",
    )
    num_beams: int = Field(
        1, ge=1, description="Generative models only: 1 greedy, more: beam search (at most the server's max_beams)."
    )
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
    reason: str = Field(
        description="Why this level: `requested` (the request named it), `default` (nothing was chosen: the server's "
        "TRIMVLM_DEFAULT_COMPUTE level, or an endpoint without a compute choice, such as /caption, which always runs "
        "full), `no_deadline` (`auto` without a deadline: TRIMVLM_AUTO_WITHOUT_DEADLINE), `fits` (`auto`: the most "
        "accurate level is predicted to meet the deadline), `deadline` (`auto`: a cheaper level, to meet the deadline), "
        "`max_flops_ratio` (the most accurate level within the requested FLOPs budget)."
    )


class VQAResponse(BaseModel):
    answer: str
    score: float
    top_k: list[AnswerScore]
    compute: ComputeOut
    model: str
    latency_ms: float
    warnings: list[str] = Field(default_factory=list, description=_WARNINGS_DOC)

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
                    "warnings": [],
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
    rank_scores: list[float] = Field(
        description="Per candidate, what `ranking` orders by: with rerank, log p(match) + w x ITC cosine (w: the "
        "model's calibrated rerank_itc_weight, 0 = the ITM head alone), else the ITC cosine."
    )
    ranking: list[int] = Field(description="Candidate indices, best first (by rank_scores).")
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
    score: float = Field(description="ITM match probability where re-ranked, else the ITC cosine.")
    itc_score: float
    rank_score: float = Field(
        description="What the results are ordered by: log p(match) + w x ITC cosine where re-ranked (w: the model's "
        "rerank_itc_weight), else the ITC cosine; hits that could not be re-ranked (no stored states) follow the rest."
    )
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


class LevelInfo(BaseModel):
    """A compute level as GET /v1/models shows it (service.levels.Level, less its thresholds)."""

    flops_ratio: float
    accuracy: dict[str, float] = Field(description="Calibration accuracy per validation split (empty: not measured).")


class ModelInfo(BaseModel):
    id: str
    ready: bool
    tasks: list[str]
    levels: dict[str, LevelInfo]
    backend: dict
    precision: str
    default: bool
    description: str | None = Field(
        None, description="What the model was trained on and can answer (from its manifest); null if the exporter gave none."
    )
    vqa: Literal["classifier", "generative"] | None = Field(
        description="How /vqa answers: `classifier` picks from `answers`; `generative` writes the answer with the "
        "model's decoder from the fused question states (BLIP's VQA models; `num_beams` applies); null: this model "
        "cannot answer questions (/vqa answers 422)."
    )
    answer_vocabulary: Literal["closed", "open"] | None = Field(
        description="`closed`: VQA answers are always one of `answers`; `open`: answers are generated (no fixed list); "
        "null: no VQA."
    )
    answers: list[str] | None = Field(description="The closed VQA answer list, in the classifier's order; null when open.")
    image_size: int = Field(description="Images are resized to image_size x image_size pixels before the model sees them.")
    max_text_length: int = Field(description="Questions and texts are cut to this many tokens, [CLS] and [SEP] included.")
    rerank_itc_weight: float = Field(
        0.0,
        description="Retrieval re-ranks by log p(match) + this x ITC cosine (calibrated on validation; 0: the ITM "
        "head alone). The rank_scores / rank_score of /retrieval responses.",
    )
    known_words: list[str] | None = Field(
        None,
        description="The words of the model's training texts (questions, answers, captions); question words outside "
        "them are named in VQA `warnings`. null: the model lists none, and only words its tokenizer maps to [UNK] are.",
    )


class Health(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    models: dict[str, bool] = {}
    error: str | None = Field(None, description="Why loading failed (status `unavailable`).")


class VQABatchResponse(BaseModel):
    results: list[VQAResponse] = Field(description="One per item, in order; each with its own `warnings`.")


class CaptionBatchResponse(BaseModel):
    results: list[CaptionResponse]


class IndexBatchResponse(BaseModel):
    results: list[IndexResponse]


class IndexEntry(BaseModel):
    """One gallery item as listed (`GET /retrieval/index`, `GET /retrieval/index/{id}`): no vectors."""

    id: str
    metadata: dict | None = None
    has_states: bool = Field(description="ITM image states are stored with it: text searches can re-rank it.")


class IndexListResponse(BaseModel):
    items: list[IndexEntry] = Field(description="In insertion order (a replaced id counts as inserted when replaced).")
    total: int = Field(description="Items in the gallery now.")
    next_cursor: str | None = Field(description="Send as `cursor` for the next page; null on the last page.")
    model: str
