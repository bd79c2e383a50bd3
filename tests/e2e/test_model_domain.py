"""What the served model knows, said to the user: GET /v1/models (description, closed answer
list, input size, known words), `warnings` on VQA questions with words the model never saw in
training, the notice on the demo page, and the compute levels named in the OpenAPI description."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.repository import load_manifest
from tests.e2e.conftest import DEFAULT_MODEL, LIMITS, MODELS, ready_client, settings_for


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """The real default model in process, with the demo page on."""
    with ready_client(settings_for(tmp_path_factory.mktemp("domain"), demo_page=True, **LIMITS)) as c:
        yield c


def _png() -> str:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=(220, 30, 30))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _default(client) -> dict:
    return next(m for m in client.get("/v1/models").json() if m["id"] == DEFAULT_MODEL)


def test_models_say_what_the_default_knows(client):
    m = _default(client)
    manifest = load_manifest(MODELS / DEFAULT_MODEL)
    assert "synthetic shapes" in m["description"] and "64x64" in m["description"]
    assert m["answer_vocabulary"] == "closed"
    assert m["answers"] == manifest.answers and len(m["answers"]) == 18 and "rectangle" in m["answers"]
    assert m["image_size"] == 64 and m["max_text_length"] == 32
    assert {"what", "shape", "color", "circle"} <= set(m["known_words"])
    assert "animal" not in m["known_words"]


def test_vqa_warns_about_words_outside_the_training_texts(client):
    r = client.post("/vqa", json={"image": _png(), "question": "What ANIMAL is this, a giraffe?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] in _default(client)["answers"]  # it still answers, from its closed list
    assert body["warnings"] == ["words not in the model's vocabulary: animal, this, giraffe"]


def test_vqa_in_domain_question_has_no_warnings(client):
    r = client.post("/vqa", json={"image": _png(), "question": "what color is the shape?"})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == []


def test_vqa_batch_and_multipart_carry_warnings_per_item(client):
    items = [{"image": _png(), "question": "what shape is in the image?"}, {"image": _png(), "question": "is it a dog?"}]
    r = client.post("/vqa", json={"items": items})
    assert r.status_code == 200, r.text
    assert [res["warnings"] for res in r.json()["results"]] == [[], ["words not in the model's vocabulary: dog"]]
    png = base64.b64decode(_png().split(",", 1)[1])
    r = client.post("/vqa", files={"image": ("x.png", png, "image/png")}, data={"question": "what colour is it?"})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == ["words not in the model's vocabulary: colour"]


def test_demo_page_says_what_the_model_knows(client):
    r = client.get("/")
    assert r.status_code == 200
    page = r.text
    assert 'id="domain-notice"' in page
    assert "knows only synthetic shapes scenes" in page and "64×64" in page and "closed" in page
    assert '<option value="accurate">' in page


def test_openapi_compute_description_names_every_served_level(client):
    spec = client.get("/openapi.json").json()
    levels = set(_default(client)["levels"])
    assert {"full", "accurate", "balanced", "fast"} <= levels
    compute = spec["components"]["schemas"]["VQAItem"]["properties"]["compute"]
    for level in levels:
        assert f"`{level}`" in compute["description"], level
    # the response documents the warnings and the model list its new fields
    assert "warnings" in spec["components"]["schemas"]["VQAResponse"]["properties"]
    info = spec["components"]["schemas"]["ModelInfo"]["properties"]
    for field in ("description", "answer_vocabulary", "answers", "image_size", "max_text_length", "known_words"):
        assert info[field].get("description"), field
