"""Image and text preprocessing, defined once for training and serving (numpy, PIL, tokenizers).

Both halves import this module so the tensors a model is trained on are exactly the tensors
it is served with.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, model_serializer

# CLIP/BLIP normalisation constants: BLIP checkpoints expect them, and our own models use them
# too so an imported model and a trained one share one preprocessing path.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageSpec(BaseModel):
    """How raw images become model input: square resize then per-channel normalisation. The
    `image` entry of a manifest's preprocessing and of a model folder's preprocess.json."""

    model_config = ConfigDict(frozen=True)

    size: int = 64
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: Literal["bicubic", "bilinear", "nearest"] = "bicubic"


class Preprocessing(BaseModel):
    """Everything a model expects of its inputs: the image spec and the text lengths. A model
    folder's preprocess.json (compression/artifacts.py) and a manifest's `preprocessing`
    (service/repository.py) are this, in the same JSON."""

    image: ImageSpec
    max_text_length: int = 32
    max_answer_length: int = 8
    max_caption_length: int = 32  # the default caption length (a request may ask for more, up to max_positions)
    # Text positions the model embeds (its config's max_position_embeddings), the hard limit of what it
    # can read or write: a caption of n tokens feeds [DEC] and its first n - 1 tokens, positions
    # 0..n-1, so n <= max_positions. None: not recorded (folders and manifests written before it was;
    # such a preprocess.json or manifest is written back without the key, unchanged).
    max_positions: int | None = None

    @model_serializer(mode="wrap")
    def _omit_unrecorded(self, handler):
        data = handler(self)
        if data.get("max_positions") is None:
            data.pop("max_positions", None)
        return data


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image; apply EXIF rotation; return RGB."""
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    else:
        img = Image.open(source)
    img.load()  # decode here, so a truncated file fails now instead of inside the EXIF step below
    try:
        img = ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error):
        pass  # a malformed EXIF block should not cost us the picture: keep it unrotated
    if img.mode in _HIGH_BIT_DEPTH:
        img = _to_8bit_gray(img)
    # Palette/alpha (and tRNS colour-keyed L/RGB) go through RGBA so transparency lands on white.
    if img.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16-bit/int/float grayscale -> L by scaling; PIL's own convert clips everything above 255 to white."""
    a = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
        a = np.rint(np.clip(a, 0, 65535) / 257.0)  # 16-bit range (PNG I;16 may open as "I")
    elif img.mode == "F" and a.max(initial=0) <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def image_to_uint8(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize to spec.size x spec.size and return HWC uint8 (the compact form datasets cache)."""
    if img.size != (spec.size, spec.size):
        img = img.resize((spec.size, spec.size), _RESAMPLE[spec.resample])
    return np.asarray(img, dtype=np.uint8)


def normalize_uint8(images: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]: (x / 255 - mean) / std.

    Written channel-first into one buffer, in place (3x faster per request than four temporaries),
    with the same float32 operations in the same order as training's normalize_on_device: the
    results are bit-identical, so exported and torch task metrics stay exactly equal."""
    chw = np.moveaxis(images, -1, -3)
    out = np.empty(chw.shape, dtype=np.float32)
    np.divide(chw, np.float32(255.0), out=out)
    out -= np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    out /= np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return out


def preprocess_image(source: str | Path | bytes | Image.Image, spec: ImageSpec) -> np.ndarray:
    """One image from any source -> float32 [3, H, W] model input."""
    return normalize_uint8(image_to_uint8(load_image(source), spec), spec)


def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise a batch: [CLS] ... [SEP], truncated to max_length, right-padded.

    Returns (input_ids int64 [B, L], attention_mask int64 [B, L]) with L the longest in the batch.
    """
    texts = list(texts)
    # one text (every single-item request): encode() skips encode_batch's hand-off to its thread pool
    encodings = [tokenizer.encode(texts[0])] if len(texts) == 1 else tokenizer.encode_batch(texts)
    rows = [enc.ids[:max_length] for enc in encodings]
    # Truncation must keep the closing [SEP]: the tokenizer's post-processor added it last.
    sep_id = tokenizer.token_to_id("[SEP]")
    for i, (enc, row) in enumerate(zip(encodings, rows, strict=True)):
        if len(enc.ids) > max_length and sep_id is not None:
            rows[i] = row[:-1] + [sep_id]
    length = max(len(r) for r in rows) if rows else 0
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def text_words(tokenizer, text: str) -> list[str]:
    """The words of a text as the tokenizer sees them (its normaliser, e.g. lowercasing, then its
    pre-tokeniser's split), punctuation-only pieces left out. The exporter lists a model's known
    words with this and the service checks questions with it, so both split alike."""
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(text) if tokenizer.pre_tokenizer is not None else [(text, None)]
    return [w for w, _ in pieces if any(c.isalnum() for c in w)]


def unknown_words(tokenizer, text: str, known: set[str] | frozenset[str] | None = None) -> list[str]:
    """Words of `text` the model does not know, in order, once each: outside `known` (the words of
    its training texts, when the manifest lists them), or else words the tokenizer maps to [UNK]."""
    out: list[str] = []
    unk = tokenizer.token_to_id("[UNK]")
    for w in text_words(tokenizer, text):
        if w in out:
            continue
        if known is not None:
            if w not in known:
                out.append(w)
        elif unk is not None and unk in tokenizer.encode(w, add_special_tokens=False).ids:
            out.append(w)
    return out
