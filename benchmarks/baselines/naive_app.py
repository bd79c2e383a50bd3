"""The naive baseline `trimvlm bench service` compares against: what a user might write instead of
TrimVLM. A minimal FastAPI app that loads the torch fp32 teacher and runs it once per request: no
export, no batching, no compute levels, sync endpoints (FastAPI's thread pool), the same request
and answer shapes as the service for /vqa, /caption and /retrieval/rank.

Run: NAIVE_MODEL=models/trimvlm-teacher/1 uvicorn benchmarks.baselines.naive_app:app --port 8001
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image

from compression.artifacts import load_model_dir
from compression.torch_runtime import TorchTasks

lm = load_model_dir(os.environ.get("NAIVE_MODEL", "models/trimvlm-teacher/1"))
lm.model.float().eval()
tasks = TorchTasks(lm, "cpu")
size = lm.preprocessing.image.size
app = FastAPI(title="naive torch baseline")


def _image(b64: str) -> np.ndarray:
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[1]
    img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(img)[None]


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.post("/vqa")
def vqa(body: dict):
    pixels = tasks.pixels(_image(body["image"]))
    ids, mask = tasks.tokenize([body["question"]])
    with torch.no_grad():
        logits, _ = lm.model.vqa_forward(torch.from_numpy(pixels), torch.from_numpy(ids), torch.from_numpy(mask).bool())
    probs = torch.softmax(logits[0], -1)
    i = int(probs.argmax())
    return {"answer": lm.model.config.answers[i], "score": float(probs[i])}


@app.post("/caption")
def caption(body: dict):
    states, _ = tasks.encode_images(tasks.pixels(_image(body["image"])))
    return {"caption": tasks.captions(states, max_length=body.get("max_length"))[0]}


@app.post("/retrieval/rank")
def rank(body: dict):
    texts = body["texts"]
    states, _ = tasks.encode_images(tasks.pixels(_image(body["image"])))
    ids, mask = tasks.tokenize(texts)
    text_states, _ = tasks.encode_texts(ids, mask)
    logits = tasks.fuse(text_states, mask, np.repeat(states, len(texts), 0))["itm_logits"]
    scores = torch.softmax(torch.from_numpy(logits), -1)[:, 1].tolist()
    return {"scores": scores, "ranking": [int(j) for j in np.argsort(scores)[::-1]]}
