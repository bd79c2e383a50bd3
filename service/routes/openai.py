"""OpenAI-compatible API: POST /v1/chat/completions, POST /v1/embeddings, and under /openai/v1/ the same
two plus GET /openai/v1/models (OpenAI's model list: /v1/models is TrimVLM's own, a JSON list).

Thin, as the other routes: a chat completion with a question is /vqa's `answer_one`, one describing the
image is /caption's `caption_one` (same model server, batchers, preprocessing, limits and errors, so
the answers are /vqa's and /caption's); a streamed caption runs the same caption batcher and is told
each token as the greedy decoder picks it. Embeddings are the ITC embeddings of the vision and text
batchers (as the gallery's). Errors are OpenAI's error object (service/protocol_errors.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service import tracing
from service.errors import ServiceError, UnknownModel
from service.protocol_errors import openai_error
from service.routes.caption import caption_limit, caption_one
from service.routes.common import call, deadline_for, field, json_model, ms_since, state, validate
from service.routes.vqa import answer_one
from service.schemas import CaptionItem, VQAItem
from service.schemas_openai import (
    AnswerScoreOut,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatExtension,
    ChatTrimVLM,
    Choice,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ImageInput,
    ImagePart,
    OpenAIErrorResponse,
    OpenAIModel,
    OpenAIModelList,
    TextInput,
    TextPart,
    Usage,
)
from service.server import ModelServer
from service.state import AppState

log = logging.getLogger("trimvlm.openai")

router = APIRouter(tags=["openai"])
# The same two routes under /openai/v1, next to OpenAI's model list: base_url=http://host:8000/openai/v1
alias = APIRouter(prefix="/openai", tags=["openai"], include_in_schema=False)
models_router = APIRouter(prefix="/openai", tags=["openai"])

ERRORS = {"default": {"model": OpenAIErrorResponse, "description": "OpenAI's error object"}}
# "describe the image", "caption this", "a description of ..." ask for a caption, not an answer
DESCRIBE = re.compile(r"\b(describe|description|caption|captions|captioning)\b", re.IGNORECASE)


def bad(request: Request, param: str | None, message: str, status: int = 400, code: str = "invalid_request") -> ServiceError:
    """A refusal naming the request field (`param` in OpenAI's error object)."""
    request.state.error_param = param
    return ServiceError(code, status, message)


def served(st: AppState, model: str | None) -> ModelServer:
    """The model a request names: name or name/version; omitted or `default`: the server's default."""
    if model == "default" and not any(k.split("/")[0] == "default" for k in st.servers):
        model = None
    return st.server(model)


# ------------------------------------------------------------------------------------------ chat


def image_and_text(request: Request, body: ChatCompletionRequest) -> tuple[str, str | None]:
    """The one user message's image (URL or data URI) and text (None when it has none)."""
    if len(body.messages) != 1 or body.messages[0].role != "user":
        roles = [m.role for m in body.messages]
        raise bad(
            request,
            "messages",
            f"send one `user` message with the image and its question (got roles {roles}): each request "
            "answers one image, without a conversation or system prompt",
        )
    content = body.messages[0].content
    if isinstance(content, str):
        raise bad(request, "messages[0].content", "the message has no image: send content parts, one of type `image_url`")
    images = [p.image_url.url for p in content if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise bad(request, "messages[0].content", f"send exactly one `image_url` part (got {len(images)})")
    text = " ".join(p.text for p in content if isinstance(p, TextPart)).strip()
    return images[0], text or None


def check_sampling(request: Request, body: ChatCompletionRequest) -> int | None:
    """Refuse what this server cannot do (no sampling, one choice); returns max_tokens."""
    if body.temperature not in (None, 0):
        raise bad(request, "temperature", "decoding is deterministic (greedy or beam search): send temperature 0 or none")
    if body.top_p not in (None, 1):
        raise bad(request, "top_p", "decoding is deterministic (greedy or beam search): send top_p 1 or none")
    if body.stream_options is not None and not body.stream:
        raise bad(request, "stream_options", "stream_options applies only with stream: true")
    if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
        raise bad(request, "max_tokens", "max_tokens and max_completion_tokens differ: send one")
    return body.max_tokens or body.max_completion_tokens


def token_count(srv: ModelServer, text: str) -> int:
    return len(srv.tasks.tokenizer.encode(text, add_special_tokens=False).ids) if text else 0


def question_tokens(srv: ModelServer, text: str | None) -> int:
    return 0 if text is None else int(srv.tasks.tokenize([text])[1].sum())


class Reply:
    """One chat completion's identity and its chunks (non-streamed: the whole ChatCompletion)."""

    def __init__(self, request: Request, model: str):
        self.id = "chatcmpl-" + getattr(request.state, "request_id", "")
        self.created, self.model = int(time.time()), model

    def chunk(self, delta: dict | None = None, finish: str | None = None, usage: Usage | None = None) -> str:
        choices = [] if usage is not None else [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage.model_dump()
        return f"data: {json.dumps(out)}\n\n"

    def completion(self, content: str, finish: str, usage: Usage, extra: ChatTrimVLM) -> ChatCompletion:
        choice = Choice(index=0, message=AssistantMessage(content=content), finish_reason=finish)
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage, trimvlm=extra)


def sse_error(e: ServiceError) -> str:
    return f"data: {json.dumps(openai_error(e.status, e.code, e.message))}\n\n"


async def chat_completions(request: Request, body: ChatCompletionRequest):
    """One image and its question (answered as /vqa) or none / a request to describe it (captioned as
    /caption). `stream: true` sends server-sent events: a caption token by token as the decoder picks
    them (greedy; with beam search, once decoded), a VQA answer in one chunk. TrimVLM's options go in
    the `trimvlm` extension object (task, compute, deadline_ms, num_beams, top_k)."""
    st = state(request)
    t0 = time.perf_counter()
    with tracing.span("parse"):  # the body is parsed by FastAPI: what is left to check of it
        max_tokens = check_sampling(request, body)
        url, text = image_and_text(request, body)
    ext = body.trimvlm or ChatExtension()
    task = ext.task if ext.task != "auto" else ("caption" if text is None or DESCRIBE.search(text) else "vqa")
    srv = served(st, body.model)
    request.state.model = srv.id
    reply = Reply(request, srv.id)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if task == "vqa":
        if text is None:
            raise bad(request, "messages[0].content", "a question needs a `text` part (or leave trimvlm.task to auto to caption)")
        item = validate(
            VQAItem,
            {
                "image": url,
                "question": text,
                "top_k": ext.top_k,
                "num_beams": ext.num_beams,
                "compute": ext.compute,
                "deadline_ms": ext.deadline_ms,
                "model": srv.id,
            },
        )
        r = await answer_one(request, item, t0)
        usage = usage_of(srv, text, r.answer)
        extra = ChatTrimVLM(
            task="vqa",
            compute=r.compute,
            score=r.score,
            top_k=[AnswerScoreOut(answer=a.answer, score=a.score) for a in r.top_k],
            warnings=r.warnings,
            latency_ms=ms_since(t0),
        )
        if not body.stream:
            return json_model(reply.completion(r.answer, "stop", usage, extra))
        return events(one_chunk(reply, r.answer, usage if include_usage else None))
    if ext.compute != "auto" or ext.top_k != 1:
        what = "compute" if ext.compute != "auto" else "top_k"
        raise bad(request, f"trimvlm.{what}", f"trimvlm.{what} applies to questions (VQA); captions always run at full compute")
    limit, why = caption_limit(srv, st.settings.max_caption_length)
    if max_tokens is not None and max_tokens > limit:
        raise bad(request, "max_tokens", f"max_tokens {max_tokens} exceeds the limit of {limit}{why}")
    max_length = max_tokens or min(srv.max_caption_length, limit)
    if not body.stream:
        item = validate(
            CaptionItem,
            {"image": url, "max_length": max_length, "num_beams": ext.num_beams, "deadline_ms": ext.deadline_ms, "model": srv.id},
        )
        r = await caption_one(request, item, t0)
        n = token_count(srv, r.caption)
        usage = Usage(prompt_tokens=srv.image_tokens, completion_tokens=n, total_tokens=srv.image_tokens + n)
        extra = ChatTrimVLM(task="caption", compute=r.compute, latency_ms=ms_since(t0))
        return json_model(reply.completion(r.caption, "length" if n >= max_length else "stop", usage, extra))
    stream = await CaptionStream.start(request, srv, url, max_length, ext, t0)
    return events(stream.chunks(reply, include_usage))


def usage_of(srv: ModelServer, question: str, answer: str) -> Usage:
    prompt, done = srv.image_tokens + question_tokens(srv, question), token_count(srv, answer)
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


def events(chunks: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


async def one_chunk(reply: Reply, content: str, usage: Usage | None) -> AsyncIterator[str]:
    yield reply.chunk({"role": "assistant", "content": ""})
    yield reply.chunk({"content": content})
    yield reply.chunk({}, "stop")
    if usage is not None:
        yield reply.chunk(usage=usage)
    yield "data: [DONE]\n\n"


class CaptionStream:
    """A caption decoded on the caption batcher, its tokens streamed as the decoder picks them. The
    checks and preprocessing are /caption's (`caption_one`); errors before the first token (a bad
    image, a full queue, a missed deadline) are HTTP errors, later ones an error event."""

    def __init__(self, srv: ModelServer, task: asyncio.Future, tokens: asyncio.Queue, max_length: int, t0: float):
        self.srv, self.task, self.tokens, self.max_length, self.t0 = srv, task, tokens, max_length, t0
        self.first: asyncio.Future | None = None

    @classmethod
    async def start(cls, request: Request, srv: ModelServer, url: str, max_length: int, ext: ChatExtension, t0: float):
        st = state(request)
        if ext.num_beams > st.settings.max_beams:
            raise bad(request, "trimvlm.num_beams", f"num_beams {ext.num_beams} exceeds the limit of {st.settings.max_beams}")
        deadline = deadline_for(request, ext.deadline_ms)
        with field("image"):
            pixels = await st.image_pixels(url, srv, "caption")
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()

        def on_token(token: int) -> None:  # in the inference thread
            try:
                loop.call_soon_threadsafe(tokens.put_nowait, token)
            except RuntimeError:  # the loop is closing: nobody reads the stream
                pass

        task = asyncio.ensure_future(srv.caption(pixels, max_length, ext.num_beams, call(request, "caption", deadline), on_token))
        self = cls(srv, task, tokens, max_length, t0)
        self.first = asyncio.ensure_future(tokens.get())
        try:
            await asyncio.wait({task, self.first}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.close()
            raise
        if task.done() and task.exception() is not None:
            self.close()
            raise task.exception()
        return self

    def close(self) -> None:
        for f in (self.first, self.task):
            if f is not None and not f.done():
                f.cancel()

    async def chunks(self, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        sep = self.srv.tasks.manifest.tokens.sep
        ids: list[int] = []
        sent, ended = "", False
        try:
            yield reply.chunk({"role": "assistant", "content": ""})
            while True:
                pending = self.first or asyncio.ensure_future(self.tokens.get())
                self.first = None
                await asyncio.wait({pending, self.task}, return_when=asyncio.FIRST_COMPLETED)
                got = [pending.result()] if pending.done() else []
                if not got:
                    pending.cancel()
                if self.task.done():  # every token was queued before the batch's result: take them all
                    while not self.tokens.empty():
                        got.append(self.tokens.get_nowait())
                for token in got:
                    if ended:
                        continue
                    if token == sep:
                        ended = True
                        continue
                    ids.append(token)
                    text = self.srv.tasks.decode(ids)
                    if len(text) > len(sent) and text.startswith(sent):  # WordPiece: a `##` piece extends the last word
                        yield reply.chunk({"content": text[len(sent) :]})
                        sent = text
                if self.task.done():
                    break
            try:
                caption, _ = self.task.result()
            except ServiceError as e:
                yield sse_error(e)
                return
            if caption != sent and caption.startswith(sent):  # beam search: the caption arrives whole
                yield reply.chunk({"content": caption[len(sent) :]})
            elif caption != sent:
                log.warning("streamed caption %r differs from the decoded one %r", sent, caption)
            n = token_count(self.srv, caption)
            finish = "stop" if ended or (not ids and n < self.max_length) else "length"
            yield reply.chunk({}, finish)
            if include_usage:
                image = self.srv.image_tokens
                yield reply.chunk(usage=Usage(prompt_tokens=image, completion_tokens=n, total_tokens=image + n))
            yield "data: [DONE]\n\n"
        finally:
            self.close()


# ------------------------------------------------------------------------------------ embeddings


def embedding_inputs(body: EmbeddingRequest) -> list[tuple[str, str]]:
    """(kind, value) per input: ('image', payload) or ('text', text)."""
    items = [body.input] if isinstance(body.input, str) else body.input
    out = []
    for it in items:
        if isinstance(it, ImageInput):
            out.append(("image", it.image))
        elif isinstance(it, TextInput):
            out.append(("text", it.text))
        else:
            out.append(("image", it) if it.startswith("data:image/") else ("text", it))
    return out


async def embeddings(request: Request, body: EmbeddingRequest):
    """ITC embeddings (L2-normalised, the gallery's) of texts and images: an image's and a text's
    dot product is /retrieval/rank's `itc_scores` for the pair."""
    st = state(request)
    srv = served(st, body.model)
    request.state.model = srv.id
    inputs = embedding_inputs(body)
    if not inputs:
        raise bad(request, "input", "input is empty: send a text or a list of texts and images")
    if len(inputs) > st.settings.max_items:
        message = f"{len(inputs)} inputs in one request; the limit is {st.settings.max_items}"
        raise bad(request, "input", message, 413, "too_many_items")
    if body.dimensions is not None and body.dimensions != srv.embed_dim:
        raise bad(request, "dimensions", f"{srv.id} embeds in {srv.embed_dim} dimensions (no truncation); got {body.dimensions}")
    deadline = deadline_for(request, None)  # X-Deadline-Ms, else the server default

    async def prepare(i: int, kind: str, value: str):
        try:
            if kind == "image":
                with field("image"):
                    return await st.image_pixels(value, srv, "embeddings")
            with field("text"):
                return (await st.run_pre(st.tokenize, [value], srv, "embeddings"))[0]
        except ServiceError as e:
            raise bad(request, "input", f"input[{i}]: {e.message}", e.status, e.code) from e

    prepared = await asyncio.gather(*(prepare(i, k, v) for i, (k, v) in enumerate(inputs)))
    c = call(request, "embeddings", deadline)
    images = [p for (k, _), p in zip(inputs, prepared, strict=True) if k == "image"]
    texts = [p for (k, _), p in zip(inputs, prepared, strict=True) if k == "text"]
    image_enc, text_enc = await asyncio.gather(srv.encode_images(images, c), srv.encode_texts(texts, c))
    image_iter, text_iter = iter(image_enc), iter(text_enc)
    data, tokens = [], 0
    for i, ((kind, _), p) in enumerate(zip(inputs, prepared, strict=True)):
        enc = next(image_iter) if kind == "image" else next(text_iter)
        tokens += srv.image_tokens if kind == "image" else len(p.ids)
        vec = np.asarray(enc.embed, dtype="<f4")
        value = base64.b64encode(vec.tobytes()).decode() if body.encoding_format == "base64" else vec.tolist()
        data.append(Embedding(index=i, embedding=value))
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return json_model(EmbeddingResponse(data=data, model=srv.id, usage=usage))


# ---------------------------------------------------------------------------------------- models


def model_entry(srv: ModelServer) -> OpenAIModel:
    try:
        created = int((srv.tasks.folder / "manifest.json").stat().st_mtime)
    except OSError:
        created = 0
    return OpenAIModel(id=srv.id, created=created)


@models_router.get("/v1/models", response_model=OpenAIModelList, responses=ERRORS, summary="Served models, as OpenAI lists them")
async def list_models(request: Request):
    """For OpenAI clients with base_url `http://host:8000/openai/v1` (`client.models.list()`). TrimVLM's
    own GET /v1/models (a JSON list with levels, answers, input size) is unchanged."""
    st = state(request)
    return json_model(OpenAIModelList(data=[model_entry(srv) for srv in st.servers.values()]))


@models_router.get("/v1/models/{model:path}", response_model=OpenAIModel, responses=ERRORS, summary="One served model")
async def get_model(request: Request, model: str):
    st = state(request)
    if model in st.servers:
        return json_model(model_entry(st.servers[model]))
    versions = sorted((k for k in st.servers if k.split("/")[0] == model), key=lambda k: int(k.split("/")[1]))
    if not versions:
        raise UnknownModel(f"no model {model!r}; serving {sorted(st.servers)}")
    return json_model(model_entry(st.servers[versions[-1]]))


_CHAT = {
    "response_model": ChatCompletion,
    "summary": "OpenAI chat completion: answer a question about an image, or caption it",
    "responses": {
        **ERRORS,
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "JSON, or SSE with stream"},
    },
}
_EMBED = {
    "response_model": EmbeddingResponse,
    "summary": "OpenAI embeddings: ITC embeddings of texts and images",
    "responses": ERRORS,
}
for r in (router, alias):
    r.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], **_CHAT)
    r.add_api_route("/v1/embeddings", embeddings, methods=["POST"], **_EMBED)
