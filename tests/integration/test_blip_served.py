"""Imported BLIPs served end to end: tiny random BLIPs of the three classes (transformers, no
download) -> `import_blip` -> `export_model` (fp32) -> the real app over HTTP, compared with
transformers' own BLIP on the same inputs: generated VQA answers and greedy captions identical,
ITM and ITC scores within 1e-3."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from compression.blip_import import import_blip  # noqa: E402
from compression.export import export_model  # noqa: E402
from tests.e2e.conftest import ready_client, settings_for  # noqa: E402
from tests.unit.test_blip_import import save_tiny_blip  # noqa: E402

TOL = 1e-3
SIZE = 32  # the tiny BLIP's image size: the service does not resize these images
ANSWER_TOKENS = 10  # import_blip's default max_answer_length


def png(seed: int) -> tuple[str, np.ndarray]:
    from PIL import Image

    u8 = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode(), u8


def hf_pixels(u8: np.ndarray, processor_dir) -> torch.Tensor:
    """BLIP's image processor on the same pixels: rescale 1/255, normalise with its mean/std."""
    proc = transformers.BlipImageProcessorPil.from_pretrained(processor_dir)
    return proc(images=u8, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip-served")
    models, hf = root / "models", {}
    for i, kind in enumerate(("vqa", "caption", "itr")):
        model, tok, hf_dir = save_tiny_blip(root / "hf", kind, seed=i)
        import_blip(hf_dir, root / f"ours-{kind}")
        export_model(root / f"ours-{kind}", models / f"blip-{kind}" / "1", precisions=("fp32",), name=f"blip-{kind}")
        hf[kind] = (model, tok, hf_dir)
    settings = settings_for(root, models_dir=models, default_model="blip-vqa", max_batch_size=8, max_queue_delay_ms=20)
    with ready_client(settings) as client:
        yield client, hf


@torch.no_grad()
def test_vqa_answers_are_generated_as_transformers_generates_them(served):
    client, hf = served
    model, tok, hf_dir = hf["vqa"]
    listed = {m["id"]: m for m in client.get("/v1/models").json()}
    assert listed["blip-vqa/1"]["vqa"] == "generative" and listed["blip-vqa/1"]["answer_vocabulary"] == "open"
    assert listed["blip-caption/1"]["vqa"] is None  # neither a classifier nor an answer decoder reading questions
    questions = ["what color is the circle", "how many", "is there a red square or a blue triangle"]
    singles = []
    for seed, q in enumerate(questions):
        image, u8 = png(seed)
        r = client.post("/vqa", json={"image": image, "question": q, "model": "blip-vqa"})
        assert r.status_code == 200, r.text
        body = r.json()
        enc = tok([q], return_tensors="pt")
        ref = model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=hf_pixels(u8, hf_dir),
            do_sample=False, num_beams=1, max_new_tokens=ANSWER_TOKENS,
        )  # fmt: skip
        expected = tok.batch_decode(ref, skip_special_tokens=True)[0].strip()
        assert body["answer"] == expected, (q, body, expected)
        assert 0.0 < body["score"] <= 1.0 and body["top_k"] == [{"answer": body["answer"], "score": body["score"]}]
        singles.append(body["answer"])
    print("answers", singles)
    assert len(set(singles)) > 1, singles  # the answers depend on the input: the comparison means something
    # one batch of questions of different lengths: padding is masked, so each answer is its own
    items = [{"image": png(seed)[0], "question": q, "model": "blip-vqa"} for seed, q in enumerate(questions)]
    r = client.post("/vqa", json={"items": items})
    assert r.status_code == 200, r.text
    assert [x["answer"] for x in r.json()["results"]] == singles
    # beam search answers too; a classifier-only option is refused where it means nothing
    r = client.post("/vqa", json={"image": items[0]["image"], "question": questions[0], "model": "blip-vqa", "num_beams": 3})
    assert r.status_code == 200 and r.json()["answer"], r.text
    r = client.post("/vqa", json={"image": items[0]["image"], "question": "what", "model": "blip-caption"})
    assert r.status_code == 422 and "cannot answer questions" in r.json()["error"]["message"]


@torch.no_grad()
def test_greedy_captions_are_transformers_captions(served):
    client, hf = served
    model, tok, hf_dir = hf["caption"]
    captions = []
    for seed in range(3):
        image, u8 = png(10 + seed)
        r = client.post("/caption", json={"image": image, "model": "blip-caption", "max_length": 8})
        assert r.status_code == 200, r.text
        ref = model.generate(pixel_values=hf_pixels(u8, hf_dir), do_sample=False, num_beams=1, max_new_tokens=8)
        captions.append(r.json()["caption"])
        assert captions[-1] == tok.batch_decode(ref, skip_special_tokens=True)[0].strip()
    print("captions", captions)
    assert len(set(captions)) > 1, captions


@torch.no_grad()
def test_itm_and_itc_scores_match_transformers(served):
    client, hf = served
    model, tok, hf_dir = hf["itr"]
    image, u8 = png(20)
    texts = ["a red circle", "a picture of two blue squares", "green"]
    r = client.post("/retrieval/rank", json={"image": image, "texts": texts, "model": "blip-itr", "rerank": True})
    assert r.status_code == 200, r.text
    body = r.json()
    pix = hf_pixels(u8, hf_dir).expand(len(texts), -1, -1, -1)
    enc = tok(texts, padding=True, return_tensors="pt")
    itm = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pix, use_itm_head=True)
    itc = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pix, use_itm_head=False)
    itm_ref = torch.softmax(itm.itm_score, -1)[:, 1].numpy()
    itc_ref = itc.itm_score[0].numpy()  # cosine similarities of the image with each text
    assert np.abs(np.array(body["scores"]) - itm_ref).max() <= TOL, (body["scores"], itm_ref)
    assert np.abs(np.array(body["itc_scores"]) - itc_ref).max() <= TOL, (body["itc_scores"], itc_ref)
    assert np.ptp(itm_ref) > 0.01 and np.ptp(itc_ref) > 0.01  # the comparison is not between constants
