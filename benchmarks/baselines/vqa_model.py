"""What every peer server in `trimvlm bench peers` wraps: the service's own TaskModel, loaded with the
settings `trimvlm serve` uses (service/server.py: Settings() defaults -> backend, precision, runtime
options), and the service's own request decoding (service.images, the tokenizer), so that only the
HTTP/batching layer differs between TrimVLM and its peers.

A /vqa body is the service's: {"image": base64 or data URI, "question": str, ...}; other fields
(compute, ...) are ignored: peers always answer at the `full` level. The answer is
{"answer": str, "score": float}, the top-1 answer and its probability.

The model folder comes from TRIMVLM_PEER_MODEL (each peer's process reads it on start-up).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.images import ImageLimits, load_request_image
from service.preprocess import encode_texts, normalize_uint8
from service.repository import load_manifest
from service.settings import Settings
from service.tasks import TaskModel

MODEL_ENV = "TRIMVLM_PEER_MODEL"


def inference_workers() -> int:
    return int(os.environ.get("PEER_INFERENCE_WORKERS", "1"))


def model_folder() -> Path:
    folder = os.environ.get(MODEL_ENV)
    if not folder:
        raise RuntimeError(f"{MODEL_ENV} must name the exported model folder (models/<name>/<version>)")
    return Path(folder)


@dataclass
class VqaItem:
    pixels: np.ndarray  # normalised float32 [3, H, W]
    ids: np.ndarray  # int64 [T], unpadded
    mask: np.ndarray  # int64 [T]


class VqaDecoder:
    """Request body -> VqaItem, as the service decodes it (no ONNX Runtime sessions: mosec runs this in
    a process of its own)."""

    def __init__(self, folder: Path):
        self.manifest = load_manifest(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / self.manifest.tokenizer))
        self.spec = self.manifest.preprocessing.image
        self.limits = ImageLimits()

    def decode(self, body: dict) -> VqaItem:
        image = load_request_image(body["image"], self.limits, self.spec).array
        ids, mask = encode_texts(self.tokenizer, [body["question"]], self.manifest.preprocessing.max_text_length)
        return VqaItem(normalize_uint8(image[None], self.spec)[0], ids[0], mask[0])


def _pad_stack(rows: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(rows), max(len(r) for r in rows)), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class VqaModel(VqaDecoder):
    """The decoder plus the TaskModel: a batch of VqaItems -> answers at the `full` level."""

    def __init__(self, folder: Path | None = None):
        folder = folder or model_folder()
        super().__init__(folder)
        # the service's defaults (TRIMVLM_* variables apply, as for `trimvlm serve`), except that each
        # session's threads follow the peer's own inference workers (PEER_INFERENCE_WORKERS, default 1:
        # one worker with every core), not TrimVLM's batch concurrency
        s = Settings(batch_concurrency=inference_workers())
        self.tasks = TaskModel(folder, s.backend, s.precision, s.runtime_options())

    def logits(self, items: list[VqaItem]) -> np.ndarray:
        pixels = np.stack([it.pixels for it in items])
        ids, mask = _pad_stack([it.ids for it in items]), _pad_stack([it.mask for it in items])
        return self.tasks.vqa(pixels, ids, mask, level="full").logits

    def infer(self, items: list[VqaItem]) -> list[dict]:
        return [{"answer": a, "score": s} for [(a, s)] in self.tasks.answers(self.logits(items), 1)]
