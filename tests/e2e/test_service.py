"""The service against the real app and the real default model (models/trimvlm-default/1):
every endpoint and its documented shape, a real easy-VQA answer, every limit and bad-input
class (4xx JSON error, and the server keeps serving), request ids, Prometheus metrics; and, on
real uvicorn subprocesses: batches forming under concurrency, 429 when the queue is full,
queued work dropped on client disconnect, graceful shutdown, and the gallery across restarts.

The images are easy-VQA style: one simple shape on white, which the default model answers,
captions and ranks reliably (the expectations below are what it really does)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tests.conftest import REPO
from tests.e2e.conftest import DEFAULT_MODEL, LIMITS, ServerProcess, ready_client, settings_for

RED, GREEN, BLUE, GRAY = (255, 0, 0), (0, 128, 0), (0, 0, 255), (128, 128, 128)
SHAPE_Q = "what shape is in the image?"
COLOR_Q = "what color is the shape?"
ERROR_KEYS = {"code", "message"}


# ------------------------------------------------------------------------------ images and helpers


def shape(kind: str = "circle", color: tuple = RED, size: int = 64, background=(255, 255, 255)) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    lo, hi = size * 0.2, size * 0.8
    if kind == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=color)
    elif kind == "rectangle":
        draw.rectangle((lo, lo, hi, hi), fill=color)
    else:
        draw.polygon([(size * 0.5, size * 0.15), (size * 0.85, size * 0.8), (size * 0.15, size * 0.8)], fill=color)
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noisy(side: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


RED_CIRCLE_PNG = encode(shape("circle", RED))
RED_CIRCLE = b64(RED_CIRCLE_PNG)
BLUE_RECTANGLE = b64(encode(shape("rectangle", BLUE)))
GREEN_TRIANGLE = b64(encode(shape("triangle", GREEN)))
SHAPES = [("circle", RED_CIRCLE), ("rectangle", BLUE_RECTANGLE), ("triangle", GREEN_TRIANGLE)]


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    """The documented error: status, JSON {"error": {"code", "message"}}, a request id."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and ERROR_KEYS <= set(body["error"]), body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert r.headers.get("x-request-id")
    return body["error"]


def assert_serves(client) -> None:
    """A good request right after: the server kept serving."""
    r = client.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == "circle"


def metric_samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(s.value for s in metric_samples(text) if s.name == name and labels.items() <= s.labels.items())


def mean_batch(before: str, after: str, component: str) -> float:
    total = metric(after, "vlm_batch_size_sum", component=component) - metric(before, "vlm_batch_size_sum", component=component)
    count = metric(after, "vlm_batch_size_count", component=component) - metric(
        before, "vlm_batch_size_count", component=component
    )
    assert count > 0, f"no batches ran on {component}"
    return total / count


# ================================================================================ 1. every endpoint


def test_vqa_single_answer_and_shape(client):
    r = client.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q, "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"answer", "score", "top_k", "compute", "model", "latency_ms"} <= set(body)  # the API may grow
    assert body["answer"] == "circle" and body["model"] == DEFAULT_MODEL
    assert 0.5 < body["score"] <= 1.0
    top = body["top_k"]
    assert len(top) == 3 and top[0] == {"answer": body["answer"], "score": body["score"]}
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert len({t["answer"] for t in top}) == 3 and sum(t["score"] for t in top) <= 1.0 + 1e-6
    c = body["compute"]
    assert {"level", "flops_ratio", "tokens_kept", "tokens_total", "reason"} <= set(c)
    assert (c["level"], c["flops_ratio"], c["reason"]) == ("full", 1.0, "no_deadline")  # auto, no deadline: full
    assert c["tokens_kept"] == c["tokens_total"] > 0
    assert body["latency_ms"] > 0


@pytest.mark.parametrize(
    ("compute", "deadline_ms", "level", "reason"),
    [
        ("auto", None, "full", "no_deadline"),
        ("auto", 30_000, "full", "fits"),  # a generous deadline: the most accurate level fits
        ("full", None, "full", "requested"),
        ("balanced", None, "balanced", "requested"),
        ("fast", None, "fast", "requested"),
        ({"max_flops_ratio": 0.6}, None, None, "max_flops_ratio"),
    ],
)
def test_vqa_compute_levels(client, compute, deadline_ms, level, reason):
    levels = client.get("/v1/models").json()[0]["levels"]
    body = {"image": RED_CIRCLE, "question": COLOR_Q, "compute": compute}
    if deadline_ms is not None:
        body["deadline_ms"] = deadline_ms
    r = client.post("/vqa", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    c = out["compute"]
    assert out["answer"] == "red"
    assert c["reason"] == reason
    assert c["level"] in levels and c["flops_ratio"] == levels[c["level"]]["flops_ratio"]
    if level is not None:
        assert c["level"] == level
    else:  # a FLOPs budget: a level within it
        assert c["flops_ratio"] <= compute["max_flops_ratio"]
    assert 0 < c["tokens_kept"] <= c["tokens_total"]
    if c["flops_ratio"] < 1.0:  # trimmed: a shape on white keeps only part of the image tokens
        assert c["tokens_kept"] < c["tokens_total"]
    else:
        assert c["tokens_kept"] == c["tokens_total"]


def test_vqa_batch_form(client):
    items = [
        {"image": RED_CIRCLE, "question": SHAPE_Q},
        {"image": BLUE_RECTANGLE, "question": COLOR_Q, "top_k": 2},
        {"image": GREEN_TRIANGLE, "question": "what is the shape?", "compute": "balanced"},
    ]
    r = client.post("/vqa", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 3
    assert [x["answer"] for x in body["results"]] == ["circle", "blue", "triangle"]  # in request order
    assert [len(x["top_k"]) for x in body["results"]] == [1, 2, 1]
    assert [x["compute"]["level"] for x in body["results"]] == ["full", "full", "balanced"]


def test_vqa_multipart_upload(client):
    r = client.post(
        "/vqa",
        files={"image": ("circle.png", RED_CIRCLE_PNG, "image/png")},
        data={"question": SHAPE_Q, "top_k": "2", "compute": "balanced"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == "circle" and len(body["top_k"]) == 2
    assert body["compute"]["level"] == "balanced"
    jpeg = encode(shape("rectangle", BLUE), "JPEG", quality=95)
    r = client.post("/vqa", files={"image": ("r.jpg", jpeg, "image/jpeg")}, data={"question": COLOR_Q})
    assert r.status_code == 200 and r.json()["answer"] == "blue", r.text


def caption_tokens(client, caption: str) -> int:
    tokenizer = client.app.state.trimvlm.servers[DEFAULT_MODEL].tasks.tokenizer
    return len(tokenizer.encode(caption, add_special_tokens=False).ids)


def test_caption_greedy_beam_and_max_length(client):
    # a scenes test image (the captioning data): the served caption is the runtime's own, and it
    # names what the references name
    from compression import data as D
    from service.preprocess import ImageSpec
    from service.tasks import TaskModel

    caps = D.load_scenes_captions(D.ensure_scenes(None), "test", ImageSpec()).limit(1)
    buf = io.BytesIO()
    Image.fromarray(caps.images[0]).save(buf, "PNG")
    scene = base64.b64encode(buf.getvalue()).decode()
    tasks = TaskModel(REPO / "models" / "trimvlm-default" / "1")
    expected = tasks.captions(tasks.encode_images(tasks.pixels(caps.images[:1]))[0])[0]
    served = client.post("/caption", json={"image": scene})
    assert served.status_code == 200 and served.json()["caption"] == expected, (served.text, expected)
    words = {"red", "green", "blue", "yellow", "brown", "gray", "black", "teal", "circle", "rectangle", "triangle"}
    named = {w for w in words if w in " ".join(caps.captions[0])}
    assert len(named & set(expected.split())) >= 2, (expected, caps.captions[0])
    beam = client.post("/caption", json={"image": scene, "num_beams": 3})
    assert beam.status_code == 200 and len(named & set(beam.json()["caption"].split())) >= 2, beam.text

    greedy = client.post("/caption", json={"image": RED_CIRCLE})
    assert greedy.status_code == 200, greedy.text
    g = greedy.json()
    assert {"caption", "compute", "model"} <= set(g) and g["model"] == DEFAULT_MODEL and g["caption"]
    assert g["compute"]["level"] == "full"
    for max_length, beams in ((1, 1), (3, 1), (4, 3)):
        r = client.post("/caption", json={"image": scene, "max_length": max_length, "num_beams": beams})
        assert r.status_code == 200, r.text
        text = r.json()["caption"]
        assert text and caption_tokens(client, text) <= max_length, (max_length, text)
    assert caption_tokens(client, expected) > 4  # so max_length really cut it short
    multipart = client.post("/caption", files={"image": ("c.png", RED_CIRCLE_PNG, "image/png")}, data={"max_length": "3"})
    assert multipart.status_code == 200 and caption_tokens(client, multipart.json()["caption"]) <= 3, multipart.text
    batch = client.post("/caption", json={"items": [{"image": RED_CIRCLE}, {"image": GREEN_TRIANGLE, "max_length": 2}]})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert len(results) == 2 and results[0]["caption"] == g["caption"] and caption_tokens(client, results[1]["caption"]) <= 2


def test_rank_image_against_texts(client):
    texts = ["a blue square", "a red circle", "a green triangle"]
    r = client.post("/retrieval/rank", json={"image": RED_CIRCLE, "texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"scores", "itc_scores", "ranking", "model"} <= set(body)
    assert len(body["scores"]) == len(body["itc_scores"]) == 3 and sorted(body["ranking"]) == [0, 1, 2]
    assert body["ranking"][0] == 1, body  # the matching caption first
    assert all(0.0 <= s <= 1.0 for s in body["scores"])  # ITM match probabilities
    # the ranking follows the re-ranking score: log p(match) + the model's weight x ITC cosine
    assert [body["rank_scores"][i] for i in body["ranking"]] == sorted(body["rank_scores"], reverse=True)
    [info] = [m for m in client.get("/v1/models").json() if m["id"] == body["model"]]
    w = info["rerank_itc_weight"]
    expected = np.log(np.maximum(body["scores"], 1e-30)) + w * np.array(body["itc_scores"])
    np.testing.assert_allclose(body["rank_scores"], expected, atol=1e-4)
    itc = client.post("/retrieval/rank", json={"image": RED_CIRCLE, "texts": texts, "rerank": False}).json()
    assert itc["scores"] == itc["itc_scores"] == itc["rank_scores"] and itc["ranking"][0] == 1, itc


def test_rank_text_against_images(client):
    images = [BLUE_RECTANGLE, RED_CIRCLE, GREEN_TRIANGLE]
    for text, best in (("a red circle", 1), ("a blue rectangle", 0), ("a green triangle", 2)):
        r = client.post("/retrieval/rank", json={"text": text, "images": images})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["scores"]) == 3 and sorted(body["ranking"]) == [0, 1, 2]
        assert body["ranking"][0] == best, (text, body)


def test_gallery_index_search_delete(client):
    ids = []
    for item_id, image in (("red-circle", RED_CIRCLE), ("blue-rectangle", BLUE_RECTANGLE)):
        r = client.post("/retrieval/index", json={"image": image, "id": item_id, "metadata": {"shape": item_id}})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == item_id
        ids.append(item_id)
    batch = client.post(
        "/retrieval/index", json={"items": [{"image": GREEN_TRIANGLE, "id": "green-triangle"}, {"image": RED_CIRCLE}]}
    )
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert results[0]["id"] == "green-triangle" and results[1]["id"] and results[1]["id"] not in ids
    generated = results[1]["id"]
    upload = client.post(
        "/retrieval/index",
        files={"image": ("t.png", encode(shape("triangle", BLUE)), "image/png")},
        data={"id": "blue-triangle", "metadata": '{"source": "upload"}'},
    )
    assert upload.status_code == 200 and upload.json() == {"id": "blue-triangle", "gallery_size": 5}, upload.text

    r = client.post("/retrieval/search", json={"text": "a red circle", "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"results", "gallery_size", "model"} <= set(body) and body["gallery_size"] == 5
    assert {h["id"] for h in body["results"]} == {"red-circle", generated}, body  # the two red circles
    assert {"id", "score", "itc_score", "rank_score", "metadata"} <= set(body["results"][0])
    ranks = [h["rank_score"] for h in body["results"]]
    assert ranks == sorted(ranks, reverse=True) and all(0.0 <= h["score"] <= 1.0 for h in body["results"])
    image_query = client.post("/retrieval/search", json={"image": BLUE_RECTANGLE, "top_k": 1}).json()
    [hit] = image_query["results"]
    assert hit["id"] == "blue-rectangle" and hit["score"] > 0.99 and hit["metadata"] == {"shape": "blue-rectangle"}
    upload_hit = client.post("/retrieval/search", json={"text": "a blue triangle", "top_k": 1}).json()["results"][0]
    assert upload_hit["id"] == "blue-triangle" and upload_hit["metadata"] == {"source": "upload"}

    r = client.delete("/retrieval/index/red-circle")
    assert r.status_code == 200 and r.json() == {"id": "red-circle", "removed": True, "gallery_size": 4}, r.text
    hits = client.post("/retrieval/search", json={"text": "a red circle", "top_k": 10}).json()["results"]
    assert "red-circle" not in {h["id"] for h in hits} and len(hits) == 4
    assert_error(client.delete("/retrieval/index/red-circle"), 404, "unknown_id")
    assert_error(client.post("/retrieval/search", json={"text": "x", "image": RED_CIRCLE}), 422, "invalid_request")
    assert_error(client.post("/retrieval/search", json={"text": "a red circle", "top_k": 101}), 422, "invalid_request")


def test_search_ranks_items_it_cannot_rerank_after_those_it_can(client):
    """An item stored without encoder states (its embedding only) cannot be re-ranked by ITM: it
    keeps its ITC cosine as score and rank_score and follows the re-ranked hits, whatever its cosine."""
    st = client.app.state.trimvlm
    srv = st.server(None)
    gallery = st.gallery(srv)
    for item_id, image in (("rr-red", RED_CIRCLE), ("rr-blue", BLUE_RECTANGLE)):
        assert client.post("/retrieval/index", json={"image": image, "id": item_id}).status_code == 200
    query = client.post("/retrieval/search", json={"text": "a red circle", "top_k": 1, "rerank": False}).json()
    [top] = query["results"]
    embed = np.asarray(gallery.get(top["id"]).embedding, np.float32)
    gallery.add(embed, "rr-no-states", None, None)  # the best possible ITC match, no states
    hits = client.post("/retrieval/search", json={"text": "a red circle", "top_k": 50}).json()["results"]
    ids = [h["id"] for h in hits]
    assert ids[-1] == "rr-no-states", ids
    last = hits[-1]
    assert last["score"] == last["itc_score"] == last["rank_score"]
    plain = client.post("/retrieval/search", json={"text": "a red circle", "top_k": 50, "rerank": False}).json()["results"]
    assert plain[0]["itc_score"] == pytest.approx(last["itc_score"], abs=1e-5)  # by ITC alone it would lead
    for item_id in ("rr-red", "rr-blue", "rr-no-states"):
        client.delete(f"/retrieval/index/{item_id}")


@pytest.fixture(scope="module")
def listing_client(tmp_path_factory):
    """Its own empty gallery, and pages of at most 4 items."""
    settings = settings_for(tmp_path_factory.mktemp("listing"), gallery_page_max=4, warmup=False)
    with ready_client(settings) as c:
        yield c


def list_gallery(client, limit: int) -> tuple[list[str], int, int]:
    """Every id by following next_cursor: (ids, the last page's total, pages fetched)."""
    ids, cursor, pages = [], None, 0
    while True:
        r = client.get("/retrieval/index", params={"limit": limit} | ({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"items", "total", "next_cursor", "model"} and len(body["items"]) <= limit, body
        ids += [item["id"] for item in body["items"]]
        cursor, pages = body["next_cursor"], pages + 1
        if cursor is None:
            return ids, body["total"], pages


def test_gallery_listing_pages_items_and_404(listing_client):
    c = listing_client
    assert c.get("/retrieval/index").json() == {"items": [], "total": 0, "next_cursor": None, "model": DEFAULT_MODEL}
    items = [
        {"image": RED_CIRCLE, "id": "red-circle", "metadata": {"shape": "circle"}},
        {"image": BLUE_RECTANGLE, "id": "photos/blue rect.png"},  # `trimvlm index build` ids are relative paths
        {"image": GREEN_TRIANGLE, "id": "green-triangle", "metadata": {"n": 3}},
        {"image": RED_CIRCLE},
        {"image": BLUE_RECTANGLE, "id": "b"},
    ]
    r = c.post("/retrieval/index", json={"items": items})
    assert r.status_code == 200, r.text
    ids = [x["id"] for x in r.json()["results"]]
    assert list_gallery(c, 2) == (ids, 5, 3) and list_gallery(c, 4) == (ids, 5, 2)
    first = c.get("/retrieval/index", params={"limit": 1}).json()
    assert first["items"] == [{"id": "red-circle", "metadata": {"shape": "circle"}, "has_states": True}], first
    assert first["total"] == 5 and first["next_cursor"]
    default = c.get("/retrieval/index").json()  # no limit: min(100, gallery_page_max)
    assert [i["id"] for i in default["items"]] == ids[:4] and default["next_cursor"]

    # one item: by an id with a slash, plain or percent-encoded
    for path in ("/retrieval/index/photos/blue rect.png", "/retrieval/index/photos%2Fblue%20rect.png"):
        r = c.get(path)
        assert r.status_code == 200 and r.json() == {"id": "photos/blue rect.png", "metadata": None, "has_states": True}
    assert c.get("/retrieval/index/green-triangle").json()["metadata"] == {"n": 3}
    assert_error(c.get("/retrieval/index/no-such-item"), 404, "unknown_id")

    # after a delete and a replacement (a replaced id is listed last, like a new one)
    r = c.delete("/retrieval/index/photos/blue rect.png")
    assert r.status_code == 200 and r.json()["gallery_size"] == 4, r.text
    assert_error(c.get("/retrieval/index/photos/blue rect.png"), 404, "unknown_id")
    r = c.post("/retrieval/index", json={"image": GREEN_TRIANGLE, "id": "red-circle", "metadata": {"shape": "triangle"}})
    assert r.status_code == 200, r.text
    assert list_gallery(c, 3)[:2] == (["green-triangle", ids[3], "b", "red-circle"], 4)
    assert c.get("/retrieval/index/red-circle").json()["metadata"] == {"shape": "triangle"}

    # a cursor stays good across mutations: nothing twice, the removed item gone, the new one at the end
    page = c.get("/retrieval/index", params={"limit": 2}).json()
    c.delete("/retrieval/index/b")
    c.post("/retrieval/index", json={"image": RED_CIRCLE, "id": "late"})
    rest = c.get("/retrieval/index", params={"limit": 4, "cursor": page["next_cursor"]}).json()
    assert [i["id"] for i in page["items"] + rest["items"]] == ["green-triangle", ids[3], "red-circle", "late"], rest
    assert rest["total"] == 4 and rest["next_cursor"] is None

    assert_error(c.get("/retrieval/index", params={"limit": 5}), 422, "invalid_request")  # beyond gallery_page_max
    assert_error(c.get("/retrieval/index", params={"limit": 0}), 422, "invalid_request")
    assert_error(c.get("/retrieval/index", params={"cursor": "not-a-cursor"}), 422, "invalid_cursor")
    assert_error(c.get("/retrieval/index", params={"model": "no-such-model"}), 404, "unknown_model")
    paths = c.get("/openapi.json").json()["paths"]
    assert "get" in paths["/retrieval/index"] and {"get", "delete"} <= set(paths["/retrieval/index/{item_id}"])


def test_models_and_health(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    [m] = r.json()
    assert m["id"] == DEFAULT_MODEL and m["ready"] is True and m["default"] is True
    assert {"vqa", "caption", "retrieval"} <= set(m["tasks"])
    assert {"full", "balanced", "fast"} <= set(m["levels"])
    assert m["levels"]["full"]["flops_ratio"] == 1.0 and m["levels"]["balanced"]["flops_ratio"] < 1.0
    assert m["precision"] == "int8" and isinstance(m["backend"], dict)
    for path in ("/healthz", "/v2/health/live"):
        r = client.get(path)
        assert r.status_code == 200 and r.json() == {"status": "ok"}, path
    for path in ("/readyz", "/v2/health/ready"):
        r = client.get(path)
        assert r.status_code == 200 and r.json() == {"status": "ok", "models": {DEFAULT_MODEL: True}}, path


def test_openapi_lists_endpoints_with_examples(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/vqa": "post",
        "/caption": "post",
        "/retrieval/rank": "post",
        "/retrieval/search": "post",
        "/retrieval/index": "post",
        "/retrieval/index/{item_id}": "delete",
        "/v1/models": "get",
        "/healthz": "get",
        "/readyz": "get",
        "/metrics": "get",
    }
    for path, method in expected.items():
        assert method in paths.get(path, {}), path
    schemas = spec["components"]["schemas"]
    for path in ("/vqa", "/caption", "/retrieval/index"):
        op = paths[path]["post"]
        content = op["requestBody"]["content"]
        example = content["application/json"]["examples"]["one"]["value"]
        assert "image" in example, path
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary", path
        assert "x-trimvlm-body" not in op
        assert op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "question" in paths["/vqa"]["post"]["requestBody"]["content"]["application/json"]["examples"]["one"]["value"]
    assert "question" in paths["/vqa"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    for name in ("RankRequest", "SearchRequest"):
        assert schemas[name]["examples"], name
    assert {"error"} == set(schemas["ErrorResponse"]["properties"])


# ================================================================================ 2. a real easy-VQA answer


@pytest.fixture(scope="module")
def easy_vqa_test():
    pytest.importorskip("easy_vqa", reason="the train extra (easy-vqa) is not installed")
    from compression.data import load_easy_vqa
    from service.preprocess import ImageSpec

    return load_easy_vqa("test", ImageSpec())


def test_easy_vqa_test_image_answered_correctly(client, easy_vqa_test):
    import easy_vqa

    split = easy_vqa_test
    samples = split.samples[:16]
    items = [{"image": b64(encode(Image.fromarray(split.images[s.image]))), "question": s.question} for s in samples]
    r = client.post("/vqa", json={"items": items})
    assert r.status_code == 200, r.text
    answers = [x["answer"] for x in r.json()["results"]]
    correct = [s for s, a in zip(samples, answers, strict=True) if a == s.answer]
    assert len(correct) >= 14, list(zip([s.question for s in samples], [s.answer for s in samples], answers, strict=True))
    # One of them again as a single request with the dataset's own PNG file, JSON and multipart.
    sample = correct[0]
    png = Path(easy_vqa.get_test_image_paths()[split.image_ids[sample.image]]).read_bytes()
    r = client.post("/vqa", json={"image": b64(png), "question": sample.question, "compute": "full"})
    assert r.status_code == 200 and r.json()["answer"] == sample.answer, (sample, r.text)
    r = client.post("/vqa", files={"image": ("q.png", png, "image/png")}, data={"question": sample.question})
    assert r.status_code == 200 and r.json()["answer"] == sample.answer, (sample, r.text)


# ================================================================================ 3. limits and bad input


def _vqa_image(payload: str) -> dict:
    return {"json": {"image": payload, "question": SHAPE_Q}}


def _upload(data: bytes, **fields) -> dict:
    return {"files": {"image": ("upload.bin", data, "application/octet-stream")}, "data": {"question": SHAPE_Q, **fields}}


_NOISY_PNG = encode(noisy(64))
_NOISY_JPEG = encode(noisy(64), "JPEG")
# over TRIMVLM_INLINE_PREPROCESS_MAX_PIXELS (65536): decoded in the preprocessing pool, not inline
_LARGE_JPEG = encode(noisy(320), "JPEG")
_BIG_PNG = encode(noisy(300))  # ~270 KB: over max_image_bytes (192 KiB), under max_body_bytes (512 KiB) as base64
_ONE_BIT_BOMB = encode(Image.new("1", (3000, 3000)), "PNG")  # 9 MP in about a kilobyte; the limit is 4 MP
_TEXT = b"this is a plain text file, not an image at all\n" * 4

_JSON = {"content-type": "application/json"}
_MULTIPART = "multipart/form-data; boundary=xyz"

BAD_INPUTS = {
    # name: (path, request kwargs, status, code)
    "truncated_png": ("/vqa", _vqa_image(b64(_NOISY_PNG[: len(_NOISY_PNG) // 2])), 422, "truncated_image"),
    "truncated_jpeg": ("/vqa", _vqa_image(b64(_NOISY_JPEG[: len(_NOISY_JPEG) // 2])), 422, "truncated_image"),
    "truncated_upload": ("/vqa", _upload(_NOISY_PNG[:200]), 422, "truncated_image"),
    "truncated_large_jpeg_in_the_pool": ("/vqa", _vqa_image(b64(_LARGE_JPEG[: len(_LARGE_JPEG) // 2])), 422, "truncated_image"),
    "truncated_large_upload_in_the_pool": ("/vqa", _upload(_LARGE_JPEG[: len(_LARGE_JPEG) // 2]), 422, "truncated_image"),
    "empty_image": ("/vqa", _vqa_image(""), 400, "empty_image"),
    "empty_upload": ("/vqa", _upload(b""), 400, "empty_image"),
    "non_image_bytes": ("/vqa", _vqa_image(b64(_TEXT)), 415, "not_an_image"),
    "non_image_upload": ("/vqa", _upload(_TEXT), 415, "not_an_image"),
    "unsupported_format": ("/vqa", _vqa_image(b64(encode(shape(), "PPM"))), 415, "unsupported_format"),
    "bomb_header": ("/vqa", _vqa_image(b64(png_header(100_000, 100_000))), 413, "too_many_pixels"),
    "bomb_compressible": ("/vqa", _vqa_image(b64(_ONE_BIT_BOMB)), 413, "too_many_pixels"),
    "image_too_large": ("/vqa", _vqa_image(b64(_BIG_PNG)), 413, "image_too_large"),
    "bad_base64": ("/vqa", _vqa_image("!!!not*base64!!!"), 400, "invalid_base64"),
    "data_uri_bad_payload": ("/vqa", _vqa_image("data:image/png;base64,@@@@####"), 400, "invalid_base64"),
    "data_uri_not_base64": ("/vqa", _vqa_image("data:image/png,abcd"), 400, "invalid_base64"),
    "data_uri_non_image": ("/vqa", _vqa_image("data:image/png;base64," + b64(_TEXT)), 415, "not_an_image"),
    "url_disabled": ("/vqa", _vqa_image("https://example.com/circle.png"), 400, "url_not_allowed"),
    "oversize_body": (
        "/vqa",
        {"json": {"image": "A" * (LIMITS["max_body_bytes"] + 1), "question": "q"}},
        413,
        "payload_too_large",
    ),
    "oversize_chunked_body": (  # no Content-Length: counted while the body streams in
        "/vqa",
        lambda: {
            "content": iter([b'{"image": "', b"A" * LIMITS["max_body_bytes"], b'", "question": "q"}']),
            "headers": {"content-type": "application/json"},
        },
        413,
        "payload_too_large",
    ),
    "oversize_multipart": ("/vqa", _upload(b"\0" * (LIMITS["max_body_bytes"] + 1)), 413, "payload_too_large"),
    "overlong_question": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": "x" * (LIMITS["max_text_chars"] + 1)}},
        422,
        "text_too_long",
    ),
    "overlong_rank_text": (
        "/retrieval/rank",
        {"json": {"image": RED_CIRCLE, "texts": ["a red circle", "y" * (LIMITS["max_text_chars"] + 1)]}},
        422,
        "text_too_long",
    ),
    "empty_question": ("/vqa", {"json": {"image": RED_CIRCLE, "question": ""}}, 422, "invalid_request"),
    "blank_question": ("/vqa", {"json": {"image": RED_CIRCLE, "question": "   "}}, 422, "empty_text"),
    "too_many_items": (
        "/vqa",
        {"json": {"items": [{"image": RED_CIRCLE, "question": SHAPE_Q}] * (LIMITS["max_items"] + 1)}},
        413,
        "too_many_items",
    ),
    "too_many_candidates": (
        "/retrieval/rank",
        {"json": {"image": RED_CIRCLE, "texts": ["a red circle"] * 65}},
        413,
        "too_many_items",
    ),
    "unknown_level": ("/vqa", {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "compute": "turbo"}}, 422, "invalid_compute"),
    "flops_budget_below_every_level": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "compute": {"max_flops_ratio": 0.01}}},
        422,
        "invalid_compute",
    ),
    "flops_ratio_out_of_range": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "compute": {"max_flops_ratio": 2}}},
        422,
        "invalid_request",
    ),
    "unknown_field": ("/vqa", {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "temperature": 0.1}}, 422, "invalid_request"),
    "top_k_zero": ("/vqa", {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "top_k": 0}}, 422, "invalid_request"),
    "multipart_top_k_not_int": ("/vqa", _upload(RED_CIRCLE_PNG, top_k="three"), 422, "invalid_request"),
    "multipart_without_image": (
        "/vqa",
        {"data": {"question": SHAPE_Q}, "files": {"other": ("a.png", RED_CIRCLE_PNG)}},
        422,
        "invalid_request",
    ),
    "bad_json": (
        "/vqa",
        {"content": b'{"image": "abc", "question": ', "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    "empty_body": ("/vqa", {"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty_body"),
    "wrong_content_type": (
        "/vqa",
        {"content": b"image=abc", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    "deeply_nested_json": ("/vqa", {"content": b"[" * 100_000, "headers": _JSON}, 400, "invalid_json"),
    "not_utf8_json": ("/vqa", {"content": b'\xff\xfe{"image": 1}', "headers": _JSON}, 400, "invalid_json"),
    "json_not_an_object": ("/vqa", {"json": ["an", "array"]}, 422, "invalid_request"),
    "batch_without_items": ("/vqa", {"json": {"items": []}}, 422, "invalid_request"),
    "batch_with_one_bad_item": (
        "/vqa",
        {"json": {"items": [{"image": RED_CIRCLE, "question": SHAPE_Q}, {"image": "@@", "question": SHAPE_Q}]}},
        400,
        "invalid_base64",
    ),
    "multipart_garbage": ("/vqa", {"content": b"garbage\r\n\r\n", "headers": {"content-type": _MULTIPART}}, 400, "bad_request"),
    "multipart_two_images": (
        "/vqa",
        {"files": [("image", ("a.png", RED_CIRCLE_PNG)), ("image", ("b.png", RED_CIRCLE_PNG))], "data": {"question": SHAPE_Q}},
        400,
        "bad_request",
    ),
    "multipart_nested_metadata": (
        "/retrieval/index",
        {"files": {"image": ("a.png", RED_CIRCLE_PNG)}, "data": {"metadata": "[" * 100_000}},
        422,
        "invalid_request",
    ),
    # The retrieval routes whose JSON body FastAPI parses answer like the others.
    "rank_bad_json": ("/retrieval/rank", {"content": b'{"text": ', "headers": _JSON}, 400, "invalid_json"),
    "search_bad_json": ("/retrieval/search", {"content": b'{"text": ', "headers": _JSON}, 400, "invalid_json"),
    "search_deeply_nested_json": ("/retrieval/search", {"content": b"[" * 100_000, "headers": _JSON}, 400, "bad_request"),
    "rank_wrong_content_type": (
        "/retrieval/rank",
        {"content": b'{"text": "a", "images": ["x"]}', "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    "unknown_model": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "model": "no-such-model"}},
        404,
        "unknown_model",
    ),
    "caption_too_long": ("/caption", {"json": {"image": RED_CIRCLE, "max_length": 65}}, 422, "invalid_request"),
    "caption_too_many_beams": ("/caption", {"json": {"image": RED_CIRCLE, "num_beams": 6}}, 422, "invalid_request"),
    "rank_both_directions": (
        "/retrieval/rank",
        {"json": {"image": RED_CIRCLE, "text": "x", "texts": ["a"], "images": [RED_CIRCLE]}},
        422,
        "invalid_request",
    ),
    "rank_no_candidates": ("/retrieval/rank", {"json": {"image": RED_CIRCLE, "texts": []}}, 422, "invalid_request"),
    "index_bad_image": ("/retrieval/index", {"json": {"image": "@@@", "id": "x"}}, 400, "invalid_base64"),
    "deadline_header_not_a_number": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q}, "headers": {"x-deadline-ms": "soon"}},
        422,
        "invalid_deadline",
    ),
    "deadline_header_nan": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q}, "headers": {"x-deadline-ms": "nan"}},
        422,
        "invalid_deadline",
    ),
    "deadline_negative": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "deadline_ms": -5}},
        422,
        "invalid_request",
    ),
    # A deadline no level can meet: `auto` refuses it at once rather than queueing it ...
    "deadline_unreachable": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "deadline_ms": 0.001}},
        503,
        "deadline_unreachable",
    ),
    "deadline_unreachable_header": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q}, "headers": {"x-deadline-ms": "0.001"}},
        503,
        "deadline_unreachable",
    ),
    # ... and a fixed level that misses it answers 504.
    "deadline_missed": (
        "/vqa",
        {"json": {"image": RED_CIRCLE, "question": SHAPE_Q, "compute": "full", "deadline_ms": 0.001}},
        504,
        "deadline_exceeded",
    ),
    "caption_deadline_missed": ("/caption", {"json": {"image": RED_CIRCLE, "deadline_ms": 0.001}}, 504, "deadline_exceeded"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_json_error_and_server_keeps_serving(client, case):
    path, kwargs, status, code = BAD_INPUTS[case]
    r = client.post(path, **(kwargs() if callable(kwargs) else kwargs))
    error = assert_error(r, status, code)
    if code in ("deadline_unreachable",):
        assert int(r.headers["retry-after"]) >= 1
    if case == "oversize_chunked_body":
        assert "content-length" not in {k.lower() for k in r.request.headers}  # really streamed
    assert "Traceback" not in error["message"]
    assert_serves(client)


def test_limits_are_inclusive(client):
    """At the limit is fine; one past it is refused (the other side is in the table above)."""
    r = client.post("/vqa", json={"image": RED_CIRCLE, "question": "what shape " + "x" * (LIMITS["max_text_chars"] - 11)})
    assert r.status_code == 200, r.text
    r = client.post("/vqa", json={"items": [{"image": RED_CIRCLE, "question": SHAPE_Q}] * LIMITS["max_items"]})
    assert r.status_code == 200 and len(r.json()["results"]) == LIMITS["max_items"], r.text


def test_wrong_method_and_unknown_path_are_json(client):
    assert_error(client.get("/vqa"), 405, "method_not_allowed")
    assert_error(client.get("/no/such/path"), 404, "not_found")


def test_batch_error_names_the_item_and_field(client):
    """One bad item fails a batch request; the message says which item and field."""
    good = {"image": RED_CIRCLE, "question": SHAPE_Q}
    cases = [  # (path, items, status, code, message prefix)
        ("/vqa", [good, {"image": "@@", "question": SHAPE_Q}], 400, "invalid_base64", "items[1].image: "),
        ("/vqa", [good, good, {"image": b64(_TEXT), "question": SHAPE_Q}], 415, "not_an_image", "items[2].image: "),
        ("/vqa", [good, good, {"image": RED_CIRCLE, "question": "   "}], 422, "empty_text", "items[2].question: "),
        ("/vqa", [{**good, "compute": "turbo"}, good], 422, "invalid_compute", "items[0].compute: "),
        ("/vqa", [good, {"image": RED_CIRCLE}], 422, "invalid_request", "items[1].question: "),  # schema errors too
        ("/caption", [{"image": RED_CIRCLE}, {"image": "@@"}], 400, "invalid_base64", "items[1].image: "),
        ("/retrieval/index", [{"image": "@@", "id": "never-added"}], 400, "invalid_base64", "items[0].image: "),
        ("/caption", [{"image": RED_CIRCLE, "num_beams": 6}, {"image": RED_CIRCLE}], 422, "invalid_request", "items[0]: "),
    ]
    for path, items, status, code, prefix in cases:
        error = assert_error(client.post(path, json={"items": items}), status, code)
        assert error["message"].startswith(prefix) and len(error["message"]) > len(prefix) + 5, (prefix, error)
    # one item, not the batch form: no index
    error = assert_error(client.post("/vqa", json={"image": "@@", "question": SHAPE_Q}), 400, "invalid_base64")
    assert not error["message"].startswith("items["), error
    assert_serves(client)


def test_multipart_compute_json_budget(client):
    """A multipart form field `compute` that is a JSON object is the same {"max_flops_ratio": x} as in a JSON body."""
    levels = client.get("/v1/models").json()[0]["levels"]
    files = {"image": ("circle.png", RED_CIRCLE_PNG, "image/png")}
    r = client.post("/vqa", files=files, data={"question": SHAPE_Q, "compute": '{"max_flops_ratio": 0.5}'})
    assert r.status_code == 200, r.text
    c = r.json()["compute"]
    assert c["reason"] == "max_flops_ratio" and c["flops_ratio"] <= 0.5, c
    within = [lv for lv, p in levels.items() if p["flops_ratio"] <= 0.5]
    assert c["level"] == max(within, key=lambda lv: levels[lv]["flops_ratio"]), (c, levels)
    assert r.json()["answer"] == "circle"
    error = assert_error(
        client.post("/vqa", files=files, data={"question": SHAPE_Q, "compute": '{"max_flops_ratio": '}), 422, "invalid_request"
    )
    assert error["message"].startswith("compute: not valid JSON"), error
    assert_error(
        client.post("/vqa", files=files, data={"question": SHAPE_Q, "compute": '{"max_flops_ratio": 2}'}), 422, "invalid_request"
    )
    assert_error(
        client.post("/vqa", files=files, data={"question": SHAPE_Q, "compute": '{"flops": 0.5}'}), 422, "invalid_request"
    )
    r = client.post("/vqa", files=files, data={"question": SHAPE_Q, "compute": "fast"})  # names still work
    assert r.status_code == 200 and r.json()["compute"]["level"] == "fast", r.text


_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?) ms")


def test_deadline_messages_are_true(client):
    """503 when the deadline is gone before a level is chosen: says so, with the request's own
    deadline and time spent, and names the level predicted fastest (checked against the server's
    own predictions); 504 for a fixed level: the deadline, the time spent in all and in the queue."""
    srv = client.app.state.trimvlm.servers[DEFAULT_MODEL]
    r = client.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q, "deadline_ms": 0.001})
    message = assert_error(r, 503, "deadline_unreachable")["message"]
    options = srv.level_options()  # nothing ran since: the same predictions the refusal saw
    assert message.startswith("deadline of 0.001 ms already passed before scheduling (the request spent "), message
    named = re.search(r"the fastest level, (\w+), is predicted to take ([\d.]+) ms", message)
    assert named, message
    fastest = min(options, key=lambda o: o.predicted_s)
    assert named.group(1) == fastest.name, (message, [(o.name, o.predicted_s) for o in options])
    assert float(named.group(2)) == pytest.approx(1000 * fastest.predicted_s, abs=0.051)
    assert all(float(n) > 0 for n in _NUMBER.findall(message)), message  # no -0.0 ms

    for path, body, queue in [
        ("/vqa", {"image": RED_CIRCLE, "question": SHAPE_Q, "compute": "full", "deadline_ms": 0.001}, "vqa/full"),
        ("/caption", {"image": RED_CIRCLE, "deadline_ms": 0.001}, "vision"),
    ]:
        message = assert_error(client.post(path, json=body), 504, "deadline_exceeded")["message"]
        found = re.fullmatch(
            rf"deadline of 0\.001 ms passed before the request's turn on {re.escape(queue)}: it had spent "
            r"([\d.]+) ms in all, ([\d.]+) ms of it in that queue",
            message,
        )
        assert found, message
        total, queued = (float(x) for x in found.groups())
        assert 0 < total and 0 <= queued <= total, message
    assert_serves(client)


def test_compute_reason_says_what_happened(client):
    """/caption has no compute choice: `default`, not `requested`; /vqa with nothing requested and
    a server default level (TRIMVLM_DEFAULT_COMPUTE) says `default` too; a named level `requested`."""
    r = client.post("/caption", json={"image": RED_CIRCLE})
    assert r.status_code == 200, r.text
    assert (r.json()["compute"]["level"], r.json()["compute"]["reason"]) == ("full", "default")
    settings = client.app.state.trimvlm.settings
    saved = settings.default_compute
    settings.default_compute = "balanced"
    try:
        r = client.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q})
        assert (r.json()["compute"]["level"], r.json()["compute"]["reason"]) == ("balanced", "default"), r.text
        r = client.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q, "compute": "fast"})
        assert (r.json()["compute"]["level"], r.json()["compute"]["reason"]) == ("fast", "requested"), r.text
    finally:
        settings.default_compute = saved
    described = client.get("/openapi.json").json()["components"]["schemas"]["ComputeOut"]["properties"]["reason"]
    for value in ("requested", "default", "no_deadline", "fits", "deadline", "max_flops_ratio"):
        assert f"`{value}`" in described["description"]


def _rgba_circle() -> bytes:
    """A red circle on a fully transparent *black* background: alpha composited onto white reads
    as a circle; alpha dropped reads as a black square with a red blob."""
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((13, 13, 51, 51), fill=(255, 0, 0, 255))
    return encode(img)


def _gray16_triangle() -> bytes:
    """16-bit grayscale: a mid-gray triangle survives scaling to 8 bits; clipped instead, the image
    would be blank white (which the model calls a yellow circle)."""
    gray = np.asarray(shape("triangle", GRAY).convert("L"), dtype=np.uint16) * 257
    img = Image.fromarray(gray)
    assert img.mode == "I;16"
    return encode(img)


def _animated_gif() -> bytes:
    frames = [shape("circle", RED), shape("rectangle", BLUE), shape("triangle", GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    return data


GOOD_VARIANTS = {
    # name: (bytes, question, expected answer)
    "cmyk_jpeg": (encode(shape("circle", RED).convert("CMYK"), "JPEG", quality=95), COLOR_Q, "red"),  # inverted: "teal"
    "png_16bit_shape": (_gray16_triangle(), SHAPE_Q, "triangle"),
    "png_16bit_color": (_gray16_triangle(), COLOR_Q, "gray"),
    "rgba_alpha": (_rgba_circle(), SHAPE_Q, "circle"),  # alpha dropped: "rectangle"
    "animated_gif_first_frame_shape": (_animated_gif(), SHAPE_Q, "circle"),
    "animated_gif_first_frame_color": (_animated_gif(), COLOR_Q, "red"),
    "grayscale": (encode(shape("rectangle", (0, 0, 0)).convert("L")), SHAPE_Q, "rectangle"),
    "webp": (encode(shape("triangle", BLUE), "WEBP", lossless=True), SHAPE_Q, "triangle"),
    "bmp": (encode(shape("rectangle", GREEN), "BMP"), COLOR_Q, "green"),
    "tiff": (encode(shape("circle", BLUE), "TIFF"), COLOR_Q, "blue"),
    "large_photo_size": (encode(shape("circle", RED, size=640)), SHAPE_Q, "circle"),
}


@pytest.mark.parametrize("case", list(GOOD_VARIANTS))
def test_image_variants_decode_and_answer(client, case):
    data, question, answer = GOOD_VARIANTS[case]
    for kwargs in (
        {"json": {"image": b64(data), "question": question}},
        {"json": {"image": "data:image/x;base64," + base64.urlsafe_b64encode(data).decode().rstrip("="), "question": question}},
        {"files": {"image": ("img", data, "application/octet-stream")}, "data": {"question": question}},
    ):
        r = client.post("/vqa", **kwargs)
        assert r.status_code == 200, (case, r.text)
        assert r.json()["answer"] == answer, (case, r.json())


@pytest.mark.parametrize("size", [(1, 1), (1, 3000), (3000, 2)])
def test_degenerate_image_sizes_are_answered(client, size):
    """A 1x1 pixel or a 1-pixel-wide strip is an image: answered, not a crash (infinity#609)."""
    r = client.post("/vqa", json={"image": b64(encode(Image.new("RGB", size, RED))), "question": SHAPE_Q, "top_k": 3})
    assert r.status_code == 200, r.text
    answers = set(client.app.state.trimvlm.servers[DEFAULT_MODEL].tasks.manifest.answers)
    assert r.json()["answer"] in answers and len(r.json()["top_k"]) == 3
    assert_serves(client)


@pytest.fixture(scope="module")
def auth_client(tmp_path_factory):
    settings = settings_for(tmp_path_factory.mktemp("auth"), api_key="e2e-secret-key", warmup=False)
    with ready_client(settings) as c:
        yield c


def test_api_key(auth_client):
    good = {"image": RED_CIRCLE, "question": SHAPE_Q}
    for headers in (
        {},
        {"authorization": "Bearer wrong-key"},
        {"authorization": "Basic e2e-secret-key"},
        {"authorization": "Bearer "},
    ):
        r = auth_client.post("/vqa", json=good, headers=headers)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    for path, body in (("/caption", {"image": RED_CIRCLE}), ("/retrieval/rank", {"image": RED_CIRCLE, "texts": ["a"]})):
        assert_error(auth_client.post(path, json=body), 401, "unauthorized")
    assert_error(auth_client.delete("/retrieval/index/x"), 401, "unauthorized")
    assert_error(auth_client.get("/retrieval/index"), 401, "unauthorized")
    assert_error(auth_client.get("/retrieval/index/x"), 401, "unauthorized")
    r = auth_client.post("/vqa", json=good, headers={"authorization": "Bearer e2e-secret-key"})
    assert r.status_code == 200 and r.json()["answer"] == "circle", r.text
    for path in ("/healthz", "/readyz", "/metrics"):  # operations stay open for probes and scrapers
        assert auth_client.get(path).status_code == 200, path


@contextlib.contextmanager
def loading_client(settings):
    """A TestClient with the lifespan running, once loading has finished or failed (no readiness wait)."""
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 30
        while c.app.state.trimvlm.loading and time.monotonic() < deadline:
            time.sleep(0.02)
        yield c


def test_no_models_not_ready_and_refuses_with_503(tmp_path):
    """An empty model repository: live, not ready (with the reason), and task requests get 503."""
    empty = tmp_path / "models"
    empty.mkdir()
    with loading_client(settings_for(tmp_path, models_dir=empty)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "unavailable" and "no exported models" in r.json()["error"]
        r = c.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q})
        assert_error(r, 503, "model_not_ready")
        assert int(r.headers["retry-after"]) >= 1


# ================================================================================ 7. metrics and 9. request ids

REFERENCE_REQUEST_BUCKETS = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25]
REFERENCE_REQUEST_BUCKETS += [0.35, 0.5, 0.75, 1, 2.5, 5, 10, 30]


def test_metrics_expose_histograms_counters_and_gauges(client):
    before = client.get("/metrics").text
    assert client.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q, "compute": "full"}).status_code == 200
    assert client.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q, "compute": "balanced"}).status_code == 200
    assert client.post("/caption", json={"image": RED_CIRCLE, "max_length": 4}).status_code == 200
    assert client.post("/retrieval/rank", json={"image": RED_CIRCLE, "texts": ["a red circle", "a"]}).status_code == 200
    assert client.post("/vqa", json={"image": RED_CIRCLE, "question": "q" * 1000}).status_code == 422
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    m = DEFAULT_MODEL

    def delta(name, **labels):
        return metric(text, name, **labels) - metric(before, name, **labels)

    # Histograms (seconds), with the reference buckets and the documented labels.
    for name in (
        "vlm_request_duration_seconds",
        "vlm_request_queue_duration_seconds",
        "vlm_inference_duration_seconds",
        "vlm_preprocess_duration_seconds",
        "vlm_postprocess_duration_seconds",
        "vlm_batch_size",
        "vlm_kept_token_ratio",
    ):
        assert families[name].type == "histogram", name
    buckets = [
        s
        for s in families["vlm_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels.get("endpoint") == "vqa" and s.labels.get("level") == "full"
    ]
    assert buckets and {"endpoint", "model", "level", "code", "le"} == set(buckets[0].labels)
    les = sorted({float(s.labels["le"]) for s in buckets if s.labels["code"] == "200"})
    assert les == REFERENCE_REQUEST_BUCKETS + [float("inf")]
    assert delta("vlm_request_duration_seconds_count", endpoint="vqa", model=m, level="full", code="200") == 1
    assert delta("vlm_request_duration_seconds_count", endpoint="vqa", model=m, level="balanced", code="200") == 1
    assert delta("vlm_request_duration_seconds_count", endpoint="caption", model=m, code="200") == 1
    assert delta("vlm_request_duration_seconds_count", endpoint="retrieval", model=m, code="200") == 1
    assert delta("vlm_request_duration_seconds_count", endpoint="vqa", code="422") == 1
    assert delta("vlm_request_queue_duration_seconds_count", endpoint="vqa", model=m) == 2
    assert delta("vlm_inference_duration_seconds_count", model=m, component="vqa/full") == 1
    assert delta("vlm_inference_duration_seconds_count", model=m, component="vqa/balanced") == 1
    assert delta("vlm_inference_duration_seconds_count", model=m, component="caption") == 1
    assert delta("vlm_inference_duration_seconds_count", model=m, component="itm") >= 1
    # 2 or 3: the 422 request may decode its image too (decoding and tokenising run side by side)
    assert delta("vlm_preprocess_duration_seconds_count", endpoint="vqa", stage="image") in (2, 3)
    assert delta("vlm_preprocess_duration_seconds_count", endpoint="vqa", stage="tokenize") == 2
    assert delta("vlm_batch_size_count", model=m, component="vqa/full") == 1
    assert delta("vlm_batch_size_sum", model=m, component="vqa/full") == 1
    assert delta("vlm_kept_token_ratio_count", model=m, level="balanced") == 1
    assert 0 < delta("vlm_kept_token_ratio_sum", model=m, level="balanced") < 1  # a trimmed request kept fewer tokens
    # Counters and gauges.
    assert delta("vlm_requests_total", endpoint="vqa", model=m, level="full", code="200") == 1
    assert delta("vlm_requests_total", endpoint="caption", code="200") == 1
    assert delta("vlm_request_failures_total", endpoint="vqa", reason="text_too_long") == 1
    assert delta("vlm_level_decisions_total", endpoint="vqa", level="full", reason="requested") == 1
    assert delta("vlm_level_decisions_total", endpoint="vqa", level="balanced", reason="requested") == 1
    assert delta("vlm_inferences_total", model=m, component="vqa/full") == 1
    assert delta("vlm_batch_executions_total", model=m, component="vqa/full") == 1
    assert metric(text, "vlm_model_ready", model=m) == 1
    assert metric(text, "vlm_inflight_requests", endpoint="vqa") == 0
    assert metric(text, "vlm_queue_size", model=m, component="vqa/full") == 0
    # the queue alert's limit (docker/prometheus/rules.yml): the configured TRIMVLM_MAX_QUEUE_SIZE per batcher
    assert metric(text, "vlm_queue_capacity", model=m, component="vqa/full") == client.app.state.trimvlm.settings.max_queue_size
    [info] = [s for s in metric_samples(text) if s.name == "vlm_build_info"]
    assert info.value == 1 and info.labels["models"] == m and info.labels["onnxruntime"] and info.labels["version"]
    for name in ("vlm_rejections", "vlm_deadline_misses", "vlm_cancelled_items", "vlm_warmup_duration_seconds"):
        assert name in families, name


def test_request_id_echoed_or_generated(client):
    r = client.post("/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q}, headers={"x-request-id": "e2e-req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-req-42"
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # Errors carry it too: from a route, from validation, and from the early body-size refusal.
    assert (
        client.post("/vqa", json={"image": "@", "question": "q"}, headers={"x-request-id": "bad-1"}).headers["x-request-id"]
        == "bad-1"
    )
    assert client.post("/vqa", json={"nope": 1}, headers={"x-request-id": "bad-2"}).headers["x-request-id"] == "bad-2"
    big = {"image": "A" * (LIMITS["max_body_bytes"] + 1), "question": "q"}
    r = client.post("/vqa", json=big, headers={"x-request-id": "bad-3"})
    assert r.status_code == 413 and r.headers["x-request-id"] == "bad-3"


# ================================================================================ real servers


def assert_clean_exit(srv: ServerProcess) -> None:
    """SIGTERM -> uvicorn's graceful shutdown, the app's lifespan shutdown (drain, gallery saved),
    then uvicorn re-raises the signal: exit status 0 or -SIGTERM, never a kill after the timeout."""
    rc = srv.terminate(60)
    log = srv.log_tail(20_000)
    assert rc in (0, -signal.SIGTERM), (rc, log[-3000:])
    assert "Application shutdown complete." in log and "Traceback" not in log, log[-3000:]


async def _post_many(url: str, bodies: list[dict], path: str = "/vqa", timeout: float = 120.0) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=len(bodies))) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


def test_real_server_request_id_and_oversize_body(live_server):
    r = httpx.post(live_server.url + "/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q}, headers={"x-request-id": "live-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "live-1" and r.json()["answer"] == "circle"
    # Over the default 16 MiB body limit: refused from Content-Length with a readable JSON answer.
    big = b'{"image": "' + b"A" * (16 * 2**20) + b'", "question": "q"}'
    r = httpx.post(live_server.url + "/vqa", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert_error(r, 413, "payload_too_large")
    assert httpx.post(live_server.url + "/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q}).status_code == 200


def _chunks(data: bytes, size: int = 64 * 1024):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _urllib_post(url: str, body, headers: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")  # sends Connection: close
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_oversize_upload_gets_413_in_every_client(start_server):
    """An upload 4x over TRIMVLM_MAX_BODY_BYTES reaches urllib, requests and httpx as the 413 JSON
    error, not as "connection reset by peer": the server reads and discards the rest of the body
    after answering (bounded by TRIMVLM_MAX_DRAIN_BYTES and TRIMVLM_DRAIN_TIMEOUT_S) before it
    closes. Closing with the upload still arriving made the kernel reset the connection, and
    clients that read the answer only after sending everything lost it (urllib always, requests and
    httpx with Connection: close). 4 MiB: beyond what loopback's socket buffers absorb unread."""
    limit = 2**20
    srv = start_server(TRIMVLM_MAX_BODY_BYTES=limit, TRIMVLM_DRAIN_TIMEOUT_S=2, TRIMVLM_WARMUP="false")
    url = srv.url + "/vqa"
    body = b'{"image": "' + b"A" * (4 * limit) + b'", "question": "q"}'
    js, close = {"content-type": "application/json"}, {"content-type": "application/json", "connection": "close"}

    def via_requests(data, headers):
        r = requests.post(url, data=data, headers=headers, timeout=60)
        return r.status_code, r.content

    def via_httpx(data, headers):
        r = httpx.post(url, content=data, headers=headers, timeout=60)
        return r.status_code, r.content

    clients = {  # the chunked ones have no Content-Length: refused while the body streams in
        "urllib": lambda: _urllib_post(url, body, js),
        "urllib_chunked": lambda: _urllib_post(url, _chunks(body), {**js, "transfer-encoding": "chunked"}),
        "requests": lambda: via_requests(body, js),
        "requests_connection_close": lambda: via_requests(body, close),
        "requests_chunked_connection_close": lambda: via_requests(_chunks(body), close),
        "httpx": lambda: via_httpx(body, js),
        "httpx_connection_close": lambda: via_httpx(body, close),
        "httpx_chunked_connection_close": lambda: via_httpx(_chunks(body), close),
    }
    failed = {}
    for name, post in clients.items():
        for attempt in range(2):  # a reset is a race; twice each
            try:
                status, payload = post()
            except (OSError, requests.RequestException, httpx.HTTPError) as e:
                failed[f"{name}#{attempt}"] = f"{type(e).__name__}: {e}"
                continue
            if status != 413 or json.loads(payload)["error"]["code"] != "payload_too_large":
                failed[f"{name}#{attempt}"] = f"{status} {payload[:200]!r}"
    assert not failed, failed

    # A client that stalls half-way through its upload holds the connection for the drain timeout
    # at most, and gets its 413 at once.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        head = f"POST /vqa HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body[: 2 * limit])
        t0, raw = time.monotonic(), b""
        while chunk := sock.recv(65536):
            raw += chunk
        waited = time.monotonic() - t0
    assert raw.startswith(b"HTTP/1.1 413 ") and b"payload_too_large" in raw, raw[:300]
    assert b"connection: close" in raw.lower()
    assert waited < 2 + 5, f"the server held a stalled upload for {waited:.1f} s (drain timeout 2 s)"

    r = httpx.post(url, json={"image": RED_CIRCLE, "question": SHAPE_Q}, timeout=60)  # and serves on
    assert r.status_code == 200 and r.json()["answer"] == "circle", r.text


def test_batches_form_under_concurrency(live_server):
    """32 concurrent clients: the vqa/full batcher runs batches of more than one item on average
    (a sequential client, before, gets batches of exactly one), and every client still gets the
    answer for its own image and question (padding and scatter are right)."""
    questions = [SHAPE_Q, "what is the shape?", "what is the shape in the image?"]  # three lengths: padding
    before = live_server.metrics()
    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        for expected, image in SHAPES:
            r = c.post("/vqa", json={"image": image, "question": SHAPE_Q, "compute": "full"})
            assert r.status_code == 200 and r.json()["answer"] == expected, r.text
    sequential = live_server.metrics()
    assert mean_batch(before, sequential, "vqa/full") == 1.0

    async def run():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:

            async def worker(i: int):
                out = []
                for j in range(4):
                    expected, image = SHAPES[(i + j) % 3]
                    r = await c.post("/vqa", json={"image": image, "question": questions[i % 3], "compute": "full"})
                    out.append((r.status_code, r.json().get("answer"), expected))
                return out

            return await asyncio.gather(*(worker(i) for i in range(32)))

    results = [x for worker in asyncio.run(run()) for x in worker]
    assert len(results) == 128
    assert all(status == 200 for status, _, _ in results), results
    assert all(answer == expected for _, answer, expected in results), [x for x in results if x[1] != x[2]]
    after = live_server.metrics()
    mean = mean_batch(sequential, after, "vqa/full")
    assert mean > 1.5, f"mean batch size {mean:.2f}: batches did not form"
    ran = metric(after, "vlm_inferences_total", component="vqa/full") - metric(
        sequential, "vlm_inferences_total", component="vqa/full"
    )
    assert ran == 128


def test_queue_full_gets_429_with_retry_after(start_server):
    srv = start_server(TRIMVLM_MAX_QUEUE_SIZE=2, TRIMVLM_MAX_BATCH_SIZE=1)
    bodies = [{"image": SHAPES[i % 3][1], "question": SHAPE_Q, "compute": "full"} for i in range(64)]
    responses = asyncio.run(_post_many(srv.url, bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    # the queue of 2 got through, plus the running one when the batcher had started it before the
    # burst filled the queue (small images are preprocessed on the event loop, so a burst can win)
    assert rejected and codes.count(200) >= 2, codes
    for r in rejected:
        assert_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) >= 1
    for r, body in zip(responses, bodies, strict=True):
        if r.status_code == 200:
            assert r.json()["answer"] == next(a for a, img in SHAPES if img == body["image"])
    text = srv.metrics()
    assert metric(text, "vlm_rejections_total", endpoint="vqa", reason="queue_full") == len(rejected)
    assert metric(text, "vlm_requests_total", endpoint="vqa", code="429") == len(rejected)
    r = httpx.post(srv.url + "/vqa", json={"image": RED_CIRCLE, "question": SHAPE_Q}, timeout=60)
    assert r.status_code == 200 and r.json()["answer"] == "circle"


async def _raw_post(port: int, path: str, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


def test_disconnect_drops_queued_work(start_server):
    """Batch size 1 and many queued beam-search /caption requests; most clients hang up while
    queued. The batchers skip their items (vlm_cancelled_items_total), run only the rest, the
    clients that stayed get their captions, and the server serves on."""
    srv = start_server(TRIMVLM_MAX_BATCH_SIZE=1, TRIMVLM_BATCH_CONCURRENCY=1)  # one at a time: the rest queue
    n, keep = 40, 6
    before = srv.metrics()

    def count(text: str, name: str, component: str) -> float:
        return metric(text, name, component=component) - metric(before, name, component=component)

    async def run():
        conns = []
        for i in range(n):
            body = json.dumps({"image": SHAPES[i % 3][1], "num_beams": 5, "max_length": 32}).encode()
            conns.append(await _raw_post(srv.port, "/caption", body))
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait until the work is really queued
                text = (await c.get("/metrics")).text
                if metric(text, "vlm_queue_size", component="caption") >= n // 2:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the requests never queued up")
        for _, writer in conns[keep:]:  # these clients go away before their answer
            writer.close()
        answers = []
        for reader, writer in conns[:keep]:
            answers.append(await asyncio.wait_for(reader.read(), 60))  # Connection: close -> read to EOF
            writer.close()
        return answers

    for i, raw in enumerate(asyncio.run(run())):
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), raw[:500]
        assert SHAPES[i % 3][0] in json.loads(body)["caption"], body
    deadline = time.monotonic() + 60
    while True:  # until every item has left the queues (dropped items are counted when dequeued)
        text = srv.metrics()
        vision_ran = count(text, "vlm_inferences_total", "vision")
        vision_dropped = count(text, "vlm_cancelled_items_total", "vision")
        if vision_ran + vision_dropped >= n and metric(text, "vlm_queue_size") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    caption_ran = count(text, "vlm_inferences_total", "caption")
    caption_dropped = count(text, "vlm_cancelled_items_total", "caption")
    # Each request's image is encoded or dropped exactly once; only encoded ones reach the decoder
    # (a client that left during its encoding never does), and each of those is decoded or dropped.
    assert vision_ran + vision_dropped == n, (vision_ran, vision_dropped)
    assert keep <= caption_ran and caption_ran + caption_dropped <= vision_ran, (caption_ran, caption_dropped, vision_ran)
    dropped = vision_dropped + caption_dropped
    assert dropped >= (n - keep) // 2, (
        f"only {dropped:.0f} of {n - keep} abandoned items were dropped ({caption_ran:.0f} decoded)"
    )
    r = httpx.post(srv.url + "/caption", json={"image": RED_CIRCLE, "max_length": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["caption"], r.text


def test_sigterm_finishes_in_flight_requests(start_server):
    """SIGTERM while requests are in flight (queued behind batch size 1): each still gets its 200
    and the process exits cleanly."""
    srv = start_server(TRIMVLM_MAX_BATCH_SIZE=1)
    n = 12

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=n + 1)) as c:
            bodies = [{"image": SHAPES[i % 3][1], "num_beams": 5, "max_length": 32} for i in range(n)]
            tasks = [asyncio.ensure_future(post(c, b)) for b in bodies]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = (await c.get("/metrics")).text
                if metric(text, "vlm_inflight_requests", endpoint="caption") == n:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the requests never got in flight")
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*tasks, return_exceptions=True)
            return responses, [finished - signalled for finished in done_at]

    done_at: list[float] = []

    async def post(c: httpx.AsyncClient, body: dict) -> httpx.Response:
        r = await c.post("/caption", json=body)
        done_at.append(time.monotonic())
        return r

    responses, after_signal = asyncio.run(run())
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses), responses
    assert sum(t > 0 for t in after_signal) >= n // 2, after_signal  # most were answered during the drain
    for (expected, _), r in zip([SHAPES[i % 3] for i in range(n)], responses, strict=True):
        assert expected in r.json()["caption"], r.json()
    assert_clean_exit(srv)
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/healthz", timeout=5)


def test_gallery_survives_restart(start_server, tmp_path):
    """Index through one server, stop it (SIGTERM), search through a new one on the same
    TRIMVLM_GALLERY_DIR; a DELETE survives too, even a hard kill right after it."""
    env = {"TRIMVLM_GALLERY_DIR": str(tmp_path / "gallery"), "TRIMVLM_MAX_BATCH_SIZE": "4"}
    items = {"red-circle": RED_CIRCLE, "blue-rectangle": BLUE_RECTANGLE, "green-triangle": GREEN_TRIANGLE}

    first = start_server(**env)
    for item_id, image in items.items():
        r = httpx.post(
            first.url + "/retrieval/index", json={"image": image, "id": item_id, "metadata": {"name": item_id}}, timeout=60
        )
        assert r.status_code == 200 and r.json()["id"] == item_id, r.text
    assert_clean_exit(first)

    second = start_server(**env)
    r = httpx.post(second.url + "/retrieval/search", json={"text": "a red circle", "top_k": 10}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["gallery_size"] == 3 and {h["id"] for h in body["results"]} == set(items)
    assert body["results"][0]["id"] == "red-circle" and body["results"][0]["metadata"] == {"name": "red-circle"}
    for item_id, image in items.items():  # the stored embeddings are the ones indexed
        [hit] = httpx.post(second.url + "/retrieval/search", json={"image": image, "top_k": 1}, timeout=60).json()["results"]
        assert hit["id"] == item_id and hit["score"] > 0.99, hit
    r = httpx.delete(second.url + "/retrieval/index/green-triangle", timeout=60)
    assert r.status_code == 200 and r.json()["gallery_size"] == 2, r.text
    second.kill()  # no graceful save: the delete was committed when it returned

    third = start_server(**env)
    body = httpx.post(third.url + "/retrieval/search", json={"text": "a green triangle", "top_k": 10}, timeout=60).json()
    assert body["gallery_size"] == 2 and {h["id"] for h in body["results"]} == {"red-circle", "blue-rectangle"}, body
    assert_error(httpx.delete(third.url + "/retrieval/index/green-triangle", timeout=60), 404, "unknown_id")
    assert_clean_exit(third)
