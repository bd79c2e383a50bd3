"""The Open Inference Protocol (KServe v2 REST) against a real server (`python -m service serve`, the
default model), with NVIDIA's `tritonclient.http` as the client: server and model metadata, readiness,
VQA and captions with the image sent as binary data (and as JSON), batches through /vqa's batcher, the
`compute` parameter, and every refusal as `{"error": "..."}` with the right status."""

from __future__ import annotations

import base64
import re

import httpx
import numpy as np
import pytest

from tests.e2e.test_service import BLUE, GREEN, RED, encode, shape

httpclient = pytest.importorskip("tritonclient.http", reason="the dev extra (tritonclient[http]) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "trimvlm-default"
SHAPE_Q, COLOR_Q = "what shape is in the image?", "what color is the shape?"
PNGS = [encode(shape(*args)) for args in (("circle", RED), ("rectangle", BLUE), ("triangle", GREEN))]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def triton(live_server):
    client = httpclient.InferenceServerClient(live_server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def native(live_server):
    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        yield c


def tensor(name: str, values: list, binary: bool = True):
    t = httpclient.InferInput(name, [len(values)], "BYTES")
    t.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return t


def outputs(*names: str, binary: bool = True):
    return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]


def test_metadata_and_readiness(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "trimvlm" and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in model["inputs"]} == {
        ("image", "BYTES", (-1,)),
        ("question", "BYTES", (-1,)),
    }
    assert {(t["name"], t["datatype"]) for t in model["outputs"]} == {
        ("answer", "BYTES"),
        ("score", "FP32"),
        ("caption", "BYTES"),
    }
    assert triton.get_model_metadata(MODEL, model_version="1")["name"] == MODEL
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, model_version="1")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready(MODEL, model_version="7")
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("nope")
    assert e.value.status() == "404" and "no model 'nope'" in e.value.message()


def test_vqa_with_binary_image_equals_vqa(triton, native):
    for png in PNGS:
        for question in (SHAPE_Q, COLOR_Q):
            want = native.post("/vqa", json={"image": b64(png), "question": question}).json()
            res = triton.infer(
                MODEL, [tensor("image", [png]), tensor("question", [question.encode()])], outputs=outputs("answer", "score")
            )
            assert res.as_numpy("answer").tolist() == [want["answer"].encode()], question
            assert res.as_numpy("score").dtype == np.float32
            assert res.as_numpy("score")[0] == pytest.approx(want["score"], abs=1e-6)
    # JSON all the way (the image as base64 text), versioned path, request id echoed
    res = triton.infer(
        MODEL,
        [tensor("image", [b64(PNGS[0])], binary=False), tensor("question", [SHAPE_Q], binary=False)],
        model_version="1",
        request_id="r-1",
        outputs=outputs("answer", binary=False),
    )
    assert res.as_numpy("answer").tolist() == ["circle"] and res.get_response()["id"] == "r-1"  # JSON BYTES: str
    assert res.get_output("score") is None  # only what was asked for


def counter(text: str, name: str, component: str) -> float:
    m = re.search(rf'^{name}_total{{component="{re.escape(component)}",model="trimvlm-default/1"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_batch_goes_through_the_vqa_batcher(triton, native, live_server):
    questions = [SHAPE_Q, COLOR_Q, SHAPE_Q]
    want = [
        native.post("/vqa", json={"image": b64(p), "question": q}).json()["answer"] for p, q in zip(PNGS, questions, strict=True)
    ]
    before = live_server.metrics()
    res = triton.infer(
        MODEL, [tensor("image", PNGS), tensor("question", [q.encode() for q in questions])]
    )  # no outputs: all, binary
    after = live_server.metrics()
    assert [a.decode() for a in res.as_numpy("answer")] == want and res.as_numpy("score").shape == (3,)
    assert counter(after, "vlm_inferences", "vqa/full") - counter(before, "vlm_inferences", "vqa/full") == 3
    batches = counter(after, "vlm_batch_executions", "vqa/full") - counter(before, "vlm_batch_executions", "vqa/full")
    assert 1 <= batches < 3  # queued together: the batcher runs them as one batch (two at worst), not one by one


def test_caption_without_question_equals_caption(triton, native):
    # One image per request on both sides: dynamic INT8 scales each activation tensor over the
    # whole batch, so a greedy caption near a tie can change with its batch-mates (README, Export).
    for png in PNGS[:2]:
        want = native.post("/caption", json={"image": b64(png)}).json()["caption"]
        res = triton.infer(MODEL, [tensor("image", [png])], outputs=outputs("caption"))
        assert res.as_numpy("caption").tolist() == [want.encode()]
    res = triton.infer(MODEL, [tensor("image", PNGS[:2])], outputs=outputs("caption"))
    captions = [c.decode() for c in res.as_numpy("caption")]
    assert len(captions) == 2 and all(c.split() for c in captions)
    short = native.post("/caption", json={"image": b64(PNGS[0]), "max_length": 2, "num_beams": 2}).json()["caption"]
    res = triton.infer(MODEL, [tensor("image", PNGS[:1])], parameters={"max_length": 2, "num_beams": 2})
    assert res.as_numpy("caption").tolist() == [short.encode()]


def test_compute_parameter_as_in_vqa(triton, native):
    for compute, sent in (("fast", "fast"), ("balanced", "balanced"), ({"max_flops_ratio": 0.5}, 0.5)):
        want = native.post("/vqa", json={"image": b64(PNGS[1]), "question": SHAPE_Q, "compute": compute}).json()
        res = triton.infer(
            MODEL, [tensor("image", PNGS[1:2]), tensor("question", [SHAPE_Q.encode()])], parameters={"compute": sent}
        )
        assert res.as_numpy("answer").tolist() == [want["answer"].encode()]
        assert res.as_numpy("score")[0] == pytest.approx(want["score"], abs=1e-6)


@pytest.mark.parametrize(
    ("inputs", "kwargs", "status", "words"),
    [
        (lambda: [tensor("question", [b"what?"])], {}, "400", "input `image`"),
        (lambda: [tensor("image", PNGS[:1]), tensor("mask", [b"x"])], {}, "400", "unknown input 'mask'"),
        (lambda: [tensor("image", PNGS[:2]), tensor("question", [b"q"])], {}, "400", "1 questions for 2 images"),
        (lambda: [tensor("image", [b"not an image"]), tensor("question", [b"what?"])], {}, "415", "not a recognisable image"),
        (lambda: [tensor("image", PNGS[:1]), tensor("question", [b""])], {}, "400", "question"),
        (lambda: [tensor("image", PNGS[:1]), tensor("question", [b"what?"])], {"parameters": {"compute": "warp"}}, "400", "warp"),
        (lambda: [tensor("image", PNGS[:1])], {"parameters": {"compute": "fast"}}, "400", "compute applies to questions"),
        (lambda: [tensor("image", PNGS[:1])], {"parameters": {"colour": "red"}}, "400", "unsupported parameters"),
        (lambda: [tensor("image", PNGS[:1])], {"outputs": outputs("answer")}, "400", "unknown output 'answer'"),
        (lambda: [tensor("image", PNGS[:1])], {"model_name": "nope"}, "404", "no model 'nope'"),
        (lambda: [tensor("image", PNGS[:1])], {"model_version": "9"}, "404", "version '9'"),
        (lambda: [tensor("image", PNGS * 11)], {}, "413", "the limit is 32"),
    ],
)
def test_bad_requests_get_v2_errors(triton, inputs, kwargs, status, words):
    kwargs = {"model_name": MODEL, **kwargs}
    with pytest.raises(InferenceServerException) as e:
        triton.infer(inputs=inputs(), **kwargs)
    assert e.value.status() == status and words in e.value.message(), e.value.message()


def test_raw_errors_are_v2_shaped(native):
    url = f"/v2/models/{MODEL}/infer"
    cases = [
        (native.post(url, content=b"{not json"), 400),
        (native.post(url, json={"inputs": []}), 400),
        (native.post(url, json={"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}), 400),
        (native.post(url, content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": "99"}), 400),
        (native.post(url, content=b"{}", headers={"Content-Encoding": "gzip"}), 415),
        (native.get(url), 405),
        (native.get("/v2/models/nope"), 404),
        (native.get("/v2/repository/index"), 404),
    ]
    for r, status in cases:
        assert r.status_code == status and isinstance(r.json()["error"], str) and set(r.json()) == {"error"}, r.text
    # binary data that no input claims, or that runs past an input's size
    header = b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4}}]}'
    r = native.post(url, content=header + b"\x09\x00\x00\x00", headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "runs past" in r.json()["error"]
    # TrimVLM's own v2 health aliases keep their shape
    assert native.get("/v2/health/ready").json()["status"] == "ok"
