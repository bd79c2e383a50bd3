"""Request and response bodies of the OpenAI-compatible routes (service/routes/openai.py).

The fields are OpenAI's (Chat Completions, Embeddings, Models). A request with a field this server does
not support is refused (400, OpenAI's error object naming it as `param`), never silently ignored. TrimVLM's
own choices (task, compute level, deadline, beams) travel in the `trimvlm` extension object, which the
`openai` client sends with `extra_body={"trimvlm": {...}}`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import _COMPUTE_DOC, _PNG, ComputeOut, MaxFlops


class _Strict(BaseModel):
    # strict: the OpenAPI schema says integer, boolean, ...: a string "1" is refused as the schema says
    model_config = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------------------------------ chat


class ImageURL(_Strict):
    url: str = Field(
        description="A data URI (data:image/png;base64,...), plain base64, or an http(s) URL when the server "
        "allows URLs (TRIMVLM_ALLOW_URLS and its allow-list, as for /vqa)."
    )
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="Accepted for compatibility: every image is resized to the model's input size."
    )


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(_Strict):
    type: Literal["text"]
    text: str


ContentPart = Annotated[ImagePart | TextPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["user", "system", "developer", "assistant", "tool"] = Field(
        description="Only one `user` message is answered: the image and its question. Other roles are refused (400)."
    )
    content: str | list[ContentPart] = Field(
        description="One `image_url` part and at most one `text` part. No text, or text asking to describe or caption "
        "the image, captions it (as /caption); other text is a question (as /vqa)."
    )
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatExtension(_Strict):
    """TrimVLM's own request options (OpenAI clients: `extra_body={"trimvlm": {...}}`)."""

    task: Literal["auto", "vqa", "caption"] = Field(
        "auto", description="`auto`: a question answers as /vqa, no text or a request to describe captions as /caption."
    )
    compute: str | MaxFlops = Field("auto", description="VQA only. " + _COMPUTE_DOC)
    deadline_ms: float | None = Field(None, gt=0, description="Answer within this many ms of arrival, or get 504.")
    num_beams: int = Field(1, ge=1, description="1: greedy; more: beam search (captions; generative VQA models).")
    top_k: int = Field(1, ge=1, le=20, description="VQA: the k most likely answers, returned in the response's `trimvlm`.")


class ChatCompletionRequest(_Strict):
    model: str | None = Field(
        None, description="A served model: name or name/version (GET /v1/models); omitted or `default`: the server's default."
    )
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Captions: the most tokens (as /caption's max_length).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens (OpenAI's newer name).")
    stream: bool = Field(False, description="Server-sent events: a caption token by token, a VQA answer in one chunk.")
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Decoding is deterministic (greedy or beam search): 0 or omitted; other values 400."
    )
    top_p: float | None = Field(None, ge=0, le=1, description="1 or omitted; other values 400 (no sampling).")
    seed: int | None = Field(None, description="Accepted: answers are deterministic anyway.")
    user: str | None = None
    trimvlm: ChatExtension | None = Field(
        None,
        description="TrimVLM's extension: `task` (auto | vqa | caption), `compute` (auto | a level | "
        "{max_flops_ratio}), `deadline_ms`, `num_beams`, `top_k`. With the openai package: "
        '`extra_body={"trimvlm": {"compute": "fast", "deadline_ms": 250}}`.',
    )

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "model": "trimvlm-default",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": _PNG}},
                                {"type": "text", "text": "what shape is in the image?"},
                            ],
                        }
                    ],
                    "trimvlm": {"compute": "auto", "deadline_ms": 250},
                }
            ]
        },
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Image tokens the model saw plus the question's text tokens.")
    completion_tokens: int = 0
    total_tokens: int


class AnswerScoreOut(BaseModel):
    answer: str
    score: float


class ChatTrimVLM(BaseModel):
    """What TrimVLM adds to a chat completion: which task ran, at what compute, with what confidence."""

    task: Literal["vqa", "caption"]
    compute: ComputeOut
    score: float | None = Field(None, description="VQA: the answer's probability (as /vqa's `score`).")
    top_k: list[AnswerScoreOut] | None = Field(None, description="VQA: the k most likely answers.")
    warnings: list[str] = Field(default_factory=list)
    latency_ms: float


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    trimvlm: ChatTrimVLM


# ------------------------------------------------------------------------------------ embeddings


class ImageInput(_Strict):
    image: str = Field(description="A data URI, plain base64, or an http(s) URL under the server's URL rules.")


class TextInput(_Strict):
    text: str


EmbeddingItem = str | ImageInput | TextInput


class EmbeddingRequest(_Strict):
    input: str | Annotated[list[EmbeddingItem], Field(min_length=1)] = Field(
        description="A text, or a list of texts and images. A string starting with `data:image/` is an image (as other "
        'servers extend the API); `{"image": ...}` also takes plain base64 or a URL, `{"text": ...}` is always a text. '
        "Token-id inputs are not supported."
    )
    model: str | None = Field(None, description="A served model (name or name/version); omitted or `default`: the default.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: the little-endian float32 array, base64-encoded (as OpenAI's)."
    )
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's ITC embedding size (no truncation).")
    user: str | None = None

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "trimvlm-default", "input": ["a red circle", _PNG]}]},
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="float: the L2-normalised ITC embedding; base64: its float32 bytes.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------------------------------- models


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "trimvlm"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# ---------------------------------------------------------------------------------------- errors


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody
