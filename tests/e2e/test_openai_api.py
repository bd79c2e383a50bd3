"""The OpenAI-compatible API against a real server (`python -m service serve`, the default model), with the
official `openai` package as the client: chat completions answer as /vqa and caption as /caption (the same
answers, streamed token by token when asked), embeddings are /retrieval/rank's ITC embeddings, the model
list, and every refusal is OpenAI's error object with the right status."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import DEFAULT_MODEL
from tests.e2e.test_service import BLUE, GREEN, RED, encode, shape

openai = pytest.importorskip("openai", reason="the dev extra (openai) is not installed")

SHAPE_Q, COLOR_Q = "what shape is in the image?", "what color is the shape?"
IMAGES = {
    name: "data:image/png;base64," + base64.b64encode(encode(shape(*args))).decode()
    for name, args in {
        "red circle": ("circle", RED),
        "blue rectangle": ("rectangle", BLUE),
        "green triangle": ("triangle", GREEN),
    }.items()
}
CIRCLE = IMAGES["red circle"]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def native(live_server):
    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        yield c


def user(image: str | None, text: str | None = None) -> list[dict]:
    parts = [] if image is None else [{"type": "image_url", "image_url": {"url": image}}]
    parts += [] if text is None else [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def test_chat_answers_as_vqa(client, native):
    for image in IMAGES.values():
        for question in (SHAPE_Q, COLOR_Q):
            want = native.post("/vqa", json={"image": image, "question": question, "top_k": 3}).json()
            got = client.chat.completions.create(
                model="trimvlm-default", messages=user(image, question), extra_body={"trimvlm": {"top_k": 3}}
            )
            assert got.choices[0].message.content == want["answer"], question
            assert got.choices[0].finish_reason == "stop" and got.model == DEFAULT_MODEL
            ext = got.model_extra["trimvlm"]
            assert ext["task"] == "vqa" and ext["score"] == pytest.approx(want["score"], abs=1e-6)
            assert [a["answer"] for a in ext["top_k"]] == [a["answer"] for a in want["top_k"]]
            assert got.usage.prompt_tokens > got.usage.completion_tokens >= 1
    assert {"circle", "red"} <= {
        client.chat.completions.create(model="trimvlm-default", messages=user(CIRCLE, q)).choices[0].message.content
        for q in (SHAPE_Q, COLOR_Q)
    }


def test_chat_extension_sets_compute_and_deadline(client, native):
    want = native.post("/vqa", json={"image": CIRCLE, "question": SHAPE_Q, "compute": "fast"}).json()
    got = client.chat.completions.create(
        model="trimvlm-default/1",
        messages=user(CIRCLE, SHAPE_Q),
        extra_body={"trimvlm": {"compute": "fast", "deadline_ms": 5000}},
    )
    ext = got.model_extra["trimvlm"]
    assert got.choices[0].message.content == want["answer"] and ext["compute"]["level"] == "fast"
    assert ext["compute"]["reason"] == "requested" and ext["compute"]["tokens_kept"] < ext["compute"]["tokens_total"]
    budget = client.chat.completions.create(
        model="default", messages=user(CIRCLE, SHAPE_Q), extra_body={"trimvlm": {"compute": {"max_flops_ratio": 0.5}}}
    )
    assert budget.model_extra["trimvlm"]["compute"]["flops_ratio"] <= 0.5


def test_chat_captions_as_caption(client, native):
    for image in IMAGES.values():
        want = native.post("/caption", json={"image": image}).json()["caption"]
        for text in (None, "Describe this image.", "Write a caption for the picture"):
            got = client.chat.completions.create(model="trimvlm-default", messages=user(image, text))
            assert got.choices[0].message.content == want, text
            assert got.model_extra["trimvlm"]["task"] == "caption" and got.choices[0].finish_reason == "stop"
    # max_tokens is /caption's max_length; a cut caption finishes with "length"
    short = native.post("/caption", json={"image": CIRCLE, "max_length": 2}).json()["caption"]
    got = client.chat.completions.create(model="trimvlm-default", messages=user(CIRCLE), max_tokens=2)
    assert got.choices[0].message.content == short and got.choices[0].finish_reason == "length"
    beams = native.post("/caption", json={"image": CIRCLE, "num_beams": 3}).json()["caption"]
    got = client.chat.completions.create(model="trimvlm-default", messages=user(CIRCLE), extra_body={"trimvlm": {"num_beams": 3}})
    assert got.choices[0].message.content == beams
    with pytest.raises(openai.BadRequestError) as e:  # beyond the decoder's positions / the server's limit
        client.chat.completions.create(model="trimvlm-default", messages=user(CIRCLE), max_tokens=10_000)
    assert e.value.param == "max_tokens" and "exceeds the limit" in e.value.message


def test_streamed_caption_comes_token_by_token(client, native):
    want = native.post("/caption", json={"image": IMAGES["blue rectangle"]}).json()["caption"]
    stream = client.chat.completions.create(
        model="trimvlm-default", messages=user(IMAGES["blue rectangle"]), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == want and len(deltas) >= len(want.split()) >= 2, deltas  # a chunk per token (word pieces)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(deltas)
    # beam search streams the caption once decoded; a VQA answer comes in one chunk
    beams = native.post("/caption", json={"image": CIRCLE, "num_beams": 3}).json()["caption"]
    got = client.chat.completions.create(
        model="trimvlm-default", messages=user(CIRCLE), stream=True, extra_body={"trimvlm": {"num_beams": 3}}
    )
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == beams
    answer = client.chat.completions.create(model="trimvlm-default", messages=user(CIRCLE, SHAPE_Q), stream=True)
    assert [c.choices[0].delta.content for c in answer if c.choices and c.choices[0].delta.content] == ["circle"]
    cut = client.chat.completions.create(model="trimvlm-default", messages=user(CIRCLE), stream=True, max_tokens=1)
    assert [c.choices[0].finish_reason for c in cut if c.choices][-1] == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stop": ["."]}, "stop"),
        ({"temperature": 0.7}, "temperature"),
        ({"top_p": 0.5}, "top_p"),
        ({"n": 2}, "n"),
        ({"extra_body": {"trimvlm": {"compute": "warp"}}}, None),
        ({"extra_body": {"trimvlm": {"colour": "red"}}}, "trimvlm.colour"),
        ({"extra_body": {"trimvlm": {"task": "caption", "compute": "fast"}}}, "trimvlm.compute"),
    ],
)
def test_unsupported_fields_are_refused_not_ignored(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="trimvlm-default", messages=user(CIRCLE, SHAPE_Q), **kwargs)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    assert e.value.param == param and e.value.message, e.value.body


def test_bad_messages_and_models(client, native):
    cases = [
        ([{"role": "system", "content": "be brief"}, *user(CIRCLE, SHAPE_Q)], "messages"),
        ([{"role": "user", "content": "what shape?"}], "messages[0].content"),
        (user(None, SHAPE_Q), "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": CIRCLE}}] * 2}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}], None),
    ]
    for messages, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="trimvlm-default", messages=messages)
        assert param is None or e.value.param == param, (messages, e.value.body)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=user(CIRCLE, SHAPE_Q))
    assert e.value.code == "unknown_model" and e.value.type == "not_found_error"
    # a bad image: the same refusal (status, code) as /vqa's, in OpenAI's shape
    for image in ("data:image/png;base64,AAAA", "https://example.com/cat.png", "not base64 at all!"):
        want = native.post("/vqa", json={"image": image, "question": SHAPE_Q})
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="trimvlm-default", messages=user(image, SHAPE_Q))
        assert (e.value.status_code, e.value.code) == (
            400 if want.status_code == 422 else want.status_code,
            want.json()["error"]["code"],
        )
        assert set(e.value.body) >= {"message", "type", "param", "code"}


def test_embeddings_are_the_itc_embeddings(client, native):
    texts = ["a red circle", "a blue rectangle", "a green triangle"]
    out = client.embeddings.create(model="trimvlm-default", input=texts + [CIRCLE], encoding_format="float")
    vecs = np.array([d.embedding for d in out.data])
    assert [d.index for d in out.data] == [0, 1, 2, 3] and vecs.shape == (4, 128) and out.model == DEFAULT_MODEL
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4) and out.usage.prompt_tokens > 0
    ranked = native.post("/retrieval/rank", json={"image": CIRCLE, "texts": texts, "rerank": False}).json()
    assert vecs[:3] @ vecs[3] == pytest.approx(ranked["itc_scores"], abs=1e-5)
    # base64 (what the openai package asks for by default, decoding it itself) carries the same floats
    # (alone, not batched with others: the INT8 graphs quantise per batch, so a batch's rows differ in the 3rd decimal)
    default = client.embeddings.create(model="trimvlm-default", input=texts[0])
    single = client.embeddings.create(model="trimvlm-default", input=[texts[0]], encoding_format="float").data[0].embedding
    image = client.embeddings.create(model="trimvlm-default", input=[CIRCLE], encoding_format="float").data[0].embedding
    raw = native.post(
        "/v1/embeddings", json={"input": [{"image": CIRCLE}, {"text": "data:image/png;base64,x"}], "encoding_format": "base64"}
    )
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(default.data[0].embedding, single, atol=1e-6) and np.allclose(decoded, image, atol=1e-6)
    for kwargs, param in (
        ({"dimensions": 64}, "dimensions"),
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": ["ok", "  "]}, "input"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(**{"model": "trimvlm-default", "input": "a red circle", **kwargs})
        assert e.value.param == param, e.value.body


def test_model_list_under_openai_prefix(live_server, native):
    client = openai.OpenAI(base_url=live_server.url + "/openai/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
    assert client.models.retrieve(DEFAULT_MODEL).owned_by == "trimvlm"
    assert client.models.retrieve("trimvlm-default").id == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    got = client.chat.completions.create(model="trimvlm-default", messages=user(CIRCLE, SHAPE_Q))
    assert got.choices[0].message.content == "circle"
    # TrimVLM's own GET /v1/models keeps its shape (a JSON list: the demo page and its clients read it)
    assert native.get("/v1/models").json()[0]["id"] == DEFAULT_MODEL


def test_image_urls_follow_the_url_rules(start_server):
    """http(s) image URLs under the server's URL rules (here: on, loopback allowed, one host listed), as /vqa."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = encode(shape("triangle", GREEN))

    class Origin(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.path == "/shape.png"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png) if ok else 0))
            self.end_headers()
            self.wfile.write(png if ok else b"")

        def log_message(self, *args):
            pass

    origin = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    try:
        srv = start_server(TRIMVLM_ALLOW_URLS="true", TRIMVLM_ALLOW_PRIVATE_URLS="true", TRIMVLM_URL_ALLOWLIST='["127.0.0.1"]')
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        url = f"http://127.0.0.1:{origin.server_port}/shape.png"
        want = httpx.post(srv.url + "/vqa", json={"image": url, "question": SHAPE_Q}, timeout=60).json()["answer"]
        got = client.chat.completions.create(model="trimvlm-default", messages=user(url, SHAPE_Q))
        assert got.choices[0].message.content == want == "triangle"
        by_url = client.embeddings.create(input=[{"image": url}], model="trimvlm-default", encoding_format="float")
        inline = client.embeddings.create(input=[IMAGES["green triangle"]], model="trimvlm-default", encoding_format="float")
        assert np.allclose(by_url.data[0].embedding, inline.data[0].embedding, atol=1e-6)
        for bad in (f"http://127.0.0.1:{origin.server_port}/missing.png", "http://localhost/shape.png"):
            refused = httpx.post(srv.url + "/vqa", json={"image": bad, "question": SHAPE_Q}, timeout=60)
            with pytest.raises(openai.APIStatusError) as e:
                client.chat.completions.create(model="trimvlm-default", messages=user(bad, SHAPE_Q))
            status = 400 if refused.status_code == 422 else refused.status_code
            assert (e.value.status_code, e.value.code) == (status, refused.json()["error"]["code"]), bad
    finally:
        origin.shutdown()
