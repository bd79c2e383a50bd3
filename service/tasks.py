"""An exported model as tasks: VQA, ITM, ITC embeddings and captioning composed from its named
graphs on numpy arrays. Used by the service (behind the batcher) and by `trimvlm eval` on an
exported folder, so the served path and the evaluated path are one code path.

Knows nothing of HTTP or batching; the runtime backend is chosen by settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.levels import FULL, Level, resolve
from service.preprocess import ImageSpec, encode_texts, normalize_uint8, unknown_words
from service.repository import Manifest, load_manifest
from service.runtime import RuntimeOptions, load_runtime
from service.runtime.base import Runtime


@dataclass
class VQAResult:
    logits: np.ndarray  # [B, answers]
    level: str
    flops_ratio: float
    image_tokens_kept: np.ndarray | None  # [B] (trimmed levels)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_match(itm_logits: np.ndarray) -> np.ndarray:
    """log p(match) of each pair from its ITM logits [B, 2] (no-match, match)."""
    logits = itm_logits.astype(np.float32)
    return logits[:, 1] - np.logaddexp(logits[:, 0], logits[:, 1])


def rerank_scores(log_p_match: np.ndarray, itc: np.ndarray, itc_weight: float) -> np.ndarray:
    """The re-ranking score of ITC candidates: the ITM head's log p(match) plus `itc_weight` x the
    ITC cosine. BLIP's retrieval evaluation adds the two as well; the weight is calibrated per model
    on validation (`trimvlm calibrate-rerank`), since a small student's ITM head alone can rank worse
    than its own ITC. Weight 0 is the ITM head alone."""
    return np.asarray(log_p_match, np.float32) + np.float32(itc_weight) * np.asarray(itc, np.float32)


class Encoders:
    """The vision and text encoders of a model whose graphs run in `self.runtime`: shared by the
    exported model (ONNX Runtime, TensorRT) and the torch parity path (compression/torch_runtime.py)."""

    runtime: Runtime

    def encode_images(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.runtime.run("vision", {"pixel_values": pixels})
        return out["image_states"], out["image_embeds"]

    def encode_texts(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.runtime.run("text", {"input_ids": ids, "attention_mask": mask})
        return out["text_states"], out["text_embeds"]


class TaskModel(Encoders):
    """Load a `<name>/<version>` folder's graphs in one runtime at one precision."""

    def __init__(
        self,
        folder: str | Path,
        backend: str = "onnxruntime",
        precision: str | None = None,
        options: RuntimeOptions | None = None,
        fallback: bool = True,
    ):
        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder)
        options = options or RuntimeOptions()
        self.precision = precision or self.manifest.default_precision.get(options.device, "fp32")
        if self.precision not in self.manifest.precisions():
            raise ValueError(f"{self.id} has no {self.precision} graphs (it has {self.manifest.precisions()})")
        files = {g: self.folder / self.manifest.graph_file(g, self.precision) for g in self.manifest.graphs}
        self.runtime: Runtime = load_runtime(backend, files, options, fallback=fallback, model_dir=self.folder)
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest.tokenizer))
        self.image_spec: ImageSpec = self.manifest.preprocessing.image
        self.vqa_mode = self.manifest.vqa_mode
        self.rerank_itc_weight = self.manifest.rerank_itc_weight
        # trimmed levels: the gather graph gives classifier logits, so a generative model runs full
        trimmed = self.manifest.levels is not None and self.has("vqa_trimmed") and self.vqa_mode == "classifier"
        self.levels: dict[str, Level] = self.manifest.levels.levels if trimmed else {"full": FULL}  # the named levels
        known = self.manifest.known_words
        self.known_words: frozenset[str] | None = frozenset(known) if known is not None else None
        graphs = self.manifest.graphs
        # decoder graphs of a model that answers generatively take the padded question states' mask
        self.decoder_masked = "decoder_prefill" in graphs and "cross_attention_mask" in graphs["decoder_prefill"].input_names
        if self.vqa_mode == "generative" and not ("fused_states" in graphs["fusion"].output_names and self.decoder_masked):
            raise ValueError(f"{self.id}: manifest says generative VQA but its fusion/decoder graphs cannot (re-export it)")

    @property
    def id(self) -> str:
        return f"{self.manifest.name}/{self.manifest.version}"

    @property
    def answer_vocab(self) -> list[str]:
        return self.manifest.answers

    @property
    def level_names(self) -> list[str]:
        return sorted(self.levels)

    def has(self, graph: str) -> bool:
        return graph in self.manifest.graphs

    # Inputs -------------------------------------------------------------------------------------
    def pixels(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] at the model's size -> normalised float32 [B, 3, H, W]."""
        return normalize_uint8(images_u8, self.image_spec)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return encode_texts(self.tokenizer, texts, self.manifest.preprocessing.max_text_length)

    def unknown_words(self, text: str) -> list[str]:
        """Words of a question or text outside what the model knows (the manifest's known_words,
        or the tokenizer's vocabulary when it lists none)."""
        return unknown_words(self.tokenizer, text, self.known_words)

    # Graphs -------------------------------------------------------------------------------------
    def fuse(self, text_states: np.ndarray, mask: np.ndarray, image_states: np.ndarray) -> dict[str, np.ndarray]:
        return self.runtime.run("fusion", {"text_states": text_states, "attention_mask": mask, "image_states": image_states})

    # Tasks --------------------------------------------------------------------------------------
    def resolve_level(self, level: str | None = None, max_flops_ratio: float | None = None) -> tuple[str, Level]:
        """A level by name or FLOPs budget (service.levels.resolve); an untrimmed model only has `full`."""
        return resolve(self.levels, level, max_flops_ratio)

    def vqa(
        self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray, level: str = "full", point: Level | None = None
    ) -> VQAResult:
        """VQA logits for a batch at one compute level. `full` runs vision, text and fusion
        batched; a trimmed level runs the batch-1 gather graph per item (data-dependent lengths)."""
        if point is None:
            level, point = self.resolve_level(level)
        if not point.trimmed:
            image_states, _ = self.encode_images(pixels)
            text_states, _ = self.encode_texts(ids, mask)
            logits = self.fuse(text_states, mask, image_states)["vqa_logits"]
            return VQAResult(logits, level, 1.0, None)
        thresholds = {
            "token_threshold": np.array(point.token_threshold, np.float32),
            "head_threshold": np.array(point.head_threshold, np.float32),
        }
        logits, kept = [], []
        for i in range(len(pixels)):
            n = int(mask[i].sum())  # the graph runs unpadded: padding would be trimmed anyway
            out = self.runtime.run(
                "vqa_trimmed",
                {
                    "pixel_values": pixels[i : i + 1],
                    "input_ids": ids[i : i + 1, :n],
                    "attention_mask": mask[i : i + 1, :n],
                    **thresholds,
                },
            )
            logits.append(out["vqa_logits"])
            kept.append(np.asarray(out["image_tokens_kept"]).reshape(-1))
        return VQAResult(np.concatenate(logits), level, point.flops_ratio, np.concatenate(kept))

    @property
    def generative_vqa(self) -> bool:
        return self.vqa_mode == "generative"

    def generate_answers(
        self, fused_states: np.ndarray, mask: np.ndarray, max_length: int | None = None, num_beams: int = 1
    ) -> list[str]:
        """Answers written by the decoder from fused question states [B, T, D] (padding masked)."""
        return [a for a, _ in self.generate_scored(fused_states, mask, max_length, num_beams)]

    def generate_scored(
        self, fused_states: np.ndarray, mask: np.ndarray, max_length: int | None = None, num_beams: int = 1
    ) -> list[tuple[str, float]]:
        """(answer, probability of the whole answer under the model: exp of its summed token
        log-probs, [SEP] included) per row, greedy or beam search as for captions."""
        pre = self.manifest.preprocessing
        max_length = max_length or pre.max_answer_length
        if pre.max_positions is not None:  # as for captions: an n-token answer feeds positions 0..n-1
            max_length = min(max_length, pre.max_positions)
        ids, logprobs = self._decode_ids(fused_states, max_length, num_beams, mask)
        return [(self.decode(row), float(np.exp(lp))) for row, lp in zip(np.asarray(ids).tolist(), logprobs, strict=True)]

    def vqa_generate(self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray, num_beams: int = 1) -> list[tuple[str, float]]:
        """Generative VQA for a batch: vision, text and fusion batched, then the decoder from the
        fused question states."""
        image_states, _ = self.encode_images(pixels)
        text_states, _ = self.encode_texts(ids, mask)
        fused = self.fuse(text_states, mask, image_states)["fused_states"]
        return self.generate_scored(fused, mask, num_beams=num_beams)

    def _decode_ids(
        self, states: np.ndarray, max_length: int, num_beams: int, mask: np.ndarray | None = None, on_step=None
    ) -> tuple[np.ndarray, np.ndarray]:
        from service.generation import beam_search, greedy_decode

        t = self.manifest.tokens
        logprobs = np.zeros(len(states), np.float32)
        decode = beam_search if num_beams > 1 else greedy_decode
        extra = {"num_beams": num_beams} if num_beams > 1 else {"on_step": on_step}  # beams: no token is final before the end
        ids = decode(
            self.runtime.run, states, t.bos, t.sep, t.pad, max_length=max_length, memory_mask=mask, logprobs=logprobs, **extra
        )
        return ids, logprobs

    def answers(self, logits: np.ndarray, top_k: int = 1) -> list[list[tuple[str, float]]]:
        probs = softmax(logits.astype(np.float32))
        order = np.argsort(-probs, axis=1)[:, :top_k]
        return [[(self.manifest.answers[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]

    def itm_log_match(self, text_states: np.ndarray, mask: np.ndarray, image_states: np.ndarray) -> np.ndarray:
        """log p(match) of each (text, image) pair."""
        return log_match(self.fuse(text_states, mask, image_states)["itm_logits"])

    def captions(self, image_states: np.ndarray, max_length: int | None = None, num_beams: int = 1, on_step=None) -> list[str]:
        """on_step(rows, tokens): each greedy step's new tokens as they are chosen (generation.greedy_decode)."""
        max_length = max_length or self.manifest.preprocessing.max_caption_length
        ids, _ = self._decode_ids(image_states, max_length, num_beams, None, on_step)
        return [self.decode(row) for row in np.asarray(ids).tolist()]

    def decode(self, ids: list[int]) -> str:
        t = self.manifest.tokens
        out = []
        for i in ids:
            if i == t.sep:
                break
            if i != t.pad:
                out.append(i)
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()

    def close(self) -> None:
        self.runtime.close()
