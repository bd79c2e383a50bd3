"""One served model: its TaskModel (graphs in a runtime), a batcher per graph group and compute
level, the latency model behind `auto`, and warm-up. Async API for the routes, one method per task
(`vqa`, `caption`, `rank`; `encode_images`, `encode_texts` and `itm` for the gallery); no HTTP here.

Each batcher takes one small typed payload per item (VqaInput, TextInput, ItmInput, CaptionInput;
a vision item is its uint8 [H, W, 3] image, normalised a batch at a time in the inference thread)
and gives back one typed result (VqaOutput, Encoding, a score, a caption). A request's part (its
endpoint, deadline and how it waits) travels as a Call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.adaptive import LatencyModel, LevelOption, PredictionErrors, choose_level, level_margins
from service.batching import Batcher, DeadlineExceeded, QueueFull
from service.errors import InvalidRequest
from service.levels import Level, resolve
from service.metrics import Metrics
from service.settings import Settings
from service.tasks import TaskModel, rerank_scores

log = logging.getLogger("trimvlm.server")


@dataclass
class Compute:
    """What a request ran at (reported in every response)."""

    level: str
    flops_ratio: float
    tokens_kept: int | None = None
    tokens_total: int | None = None
    reason: str = "requested"


@dataclass
class TextInput:
    """A tokenised text, unpadded: ids and attention mask [T]."""

    ids: np.ndarray
    mask: np.ndarray


@dataclass
class VqaInput:
    pixels: np.ndarray  # uint8 [H, W, 3] at the model's size (normalised with its batch)
    question: TextInput
    num_beams: int = 1  # generative answers only


@dataclass
class VqaOutput:
    logits: np.ndarray | None  # [answers] (a classifier's)
    tokens_kept: int | None  # image tokens a trimmed level kept (None: untrimmed)
    generated: tuple[str, float] | None = None  # a generative model's (answer, probability)


@dataclass
class Encoding:
    """An image's or a text's encoder output: token states [T, D] and the ITC embedding [E]."""

    states: np.ndarray
    embed: np.ndarray


@dataclass
class ItmInput:
    text_states: np.ndarray  # [T, D], unpadded
    image_states: np.ndarray  # [N, D]


@dataclass
class CaptionInput:
    image_states: np.ndarray  # [N, D]
    max_length: int
    num_beams: int
    # streamed captions: told each new token id as the decoder picks it (in the inference thread; greedy only)
    on_token: Callable[[int], None] | None = None


@dataclass
class VqaAnswer:
    top: list[tuple[str, float]]  # (answer, probability), best first
    compute: Compute


@dataclass
class Ranking:
    scores: list[float]  # ITM match probabilities when re-ranked, else the ITC scores
    itc_scores: list[float]
    rank_scores: list[float]  # what the ranking orders by: service.tasks.rerank_scores, else the ITC scores


@dataclass
class Hit:
    id: str
    score: float  # the ITM match probability when re-ranked, else the ITC score
    itc_score: float
    rank_score: float  # what the results are ordered by (service.tasks.rerank_scores when re-ranked)
    metadata: dict


@dataclass
class Call:
    """One request's part in the server: the endpoint its metrics count under, its deadline, how it
    waits for a queued item (`wait(future, queue_name)`; the HTTP routes' also watches the client,
    routes.common), and who is told the compute level once chosen."""

    endpoint: str
    deadline: float | None
    wait: Callable[[asyncio.Future, str], Awaitable[tuple[Any, float]]]  # -> (result, seconds queued)
    on_level: Callable[[str], None] = field(default=lambda level: None)

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.perf_counter()


def _pad_stack(rows: list[np.ndarray], pad: int = 0) -> np.ndarray:
    """Right-pad 1-D int arrays to the longest and stack."""
    length = max(len(r) for r in rows)
    out = np.full((len(rows), length), pad, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _groups(items: list, key: Callable[[Any], Any]) -> dict[Any, list[int]]:
    """Indices of items by key, in order: items decoded with one setting run as one batch."""
    out: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        out.setdefault(key(it), []).append(i)
    return out


def _token_streams(callbacks: list[Callable[[int], None] | None]) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """A decode step's tokens to the streamed items' callbacks (None: no item streams). A callback's
    failure is logged, never raised into the decoder: the other items of the batch go on."""
    streams = {row: cb for row, cb in enumerate(callbacks) if cb is not None}
    if not streams:
        return None

    def on_step(rows: np.ndarray, tokens: np.ndarray) -> None:
        for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
            cb = streams.get(row)
            if cb is not None:
                try:
                    cb(token)
                except Exception:
                    log.exception("token stream callback failed")

    return on_step


def _pad_states(rows: list[np.ndarray]) -> np.ndarray:
    length = max(r.shape[0] for r in rows)
    out = np.zeros((len(rows), length, rows[0].shape[1]), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class ModelServer:
    def __init__(self, folder: Path, settings: Settings, metrics: Metrics, executor: ThreadPoolExecutor):
        self.settings, self.metrics, self.executor = settings, metrics, executor
        t0 = time.perf_counter()
        self.tasks = TaskModel(folder, settings.backend, settings.precision, settings.runtime_options())
        self.load_s = time.perf_counter() - t0
        self.id = self.tasks.id
        self.backend = self.tasks.runtime.name
        self.latency = LatencyModel()
        self.ready = False
        self.warmup_s = 0.0
        m = self.tasks.manifest
        self.image_tokens = int(m.graphs["vision"].outputs[0].shape[1])
        self.levels: dict[str, Level] = dict(sorted(self.tasks.levels.items()))
        # per level: how far off its latency predictions run (auto's margin), read by /metrics on scrape
        self.prediction_errors = {lv: PredictionErrors(settings.auto_margin_quantile) for lv in self.levels}
        for lv in self.prediction_errors:
            metrics.auto_safety_factor.labels(self.id, lv).set_function(lambda lv=lv: level_margins(self.prediction_errors)[lv])
        self.batchers: dict[str, Batcher] = {}
        batch = settings.max_batch_size if settings.batching else 1
        delay = settings.max_queue_delay_ms / 1000 if settings.batching else 0.0
        runners = {f"vqa/{lv}": self._vqa_runner(lv) for lv in self.levels}
        runners |= {"vision": self._run_vision, "text": self._run_text, "itm": self._run_itm, "caption": self._run_caption}
        for name, fn in runners.items():
            self.batchers[name] = Batcher(
                name,
                fn,
                executor,
                self.latency,
                max_batch=batch,
                max_delay_s=delay,
                max_queue=settings.max_queue_size,
                on_batch=self._on_batch,
                on_dropped=lambda n, k: self.metrics.cancelled.labels(n).inc(k),
                concurrency=settings.batches_at_once(),
            )
            metrics.queue_capacity.labels(self.id, name).set(settings.max_queue_size)  # the queue alert's limit

    # Batch functions (run in the inference thread pool) ------------------------------------------
    def _vqa_runner(self, level: str):
        point = self.levels[level]

        def run(items: list[VqaInput]) -> list[VqaOutput]:
            pixels = self.tasks.pixels(np.stack([it.pixels for it in items]))
            ids, mask = _pad_stack([it.question.ids for it in items]), _pad_stack([it.question.mask for it in items])
            res = self.tasks.vqa(pixels, ids, mask, level=level, point=point)
            kept = res.image_tokens_kept
            return [VqaOutput(res.logits[i], None if kept is None else int(kept[i])) for i in range(len(items))]

        def generate(items: list[VqaInput]) -> list[VqaOutput]:
            out: list = [None] * len(items)
            for beams, idx in _groups(items, lambda it: it.num_beams).items():  # one decode per beam width
                pixels = self.tasks.pixels(np.stack([items[i].pixels for i in idx]))
                ids, mask = _pad_stack([items[i].question.ids for i in idx]), _pad_stack([items[i].question.mask for i in idx])
                for i, answer in zip(idx, self.tasks.vqa_generate(pixels, ids, mask, num_beams=beams), strict=True):
                    out[i] = VqaOutput(None, None, answer)
            return out

        return generate if self.tasks.vqa_mode == "generative" else run

    def _run_vision(self, items: list[np.ndarray]) -> list[Encoding]:
        states, embeds = self.tasks.encode_images(self.tasks.pixels(np.stack(items)))
        return [Encoding(s, e) for s, e in zip(states, embeds, strict=True)]

    def _run_text(self, items: list[TextInput]) -> list[Encoding]:
        ids, mask = _pad_stack([it.ids for it in items]), _pad_stack([it.mask for it in items])
        states, embeds = self.tasks.encode_texts(ids, mask)
        return [Encoding(states[i, : len(items[i].ids)], embeds[i]) for i in range(len(items))]

    def _run_itm(self, items: list[ItmInput]) -> list[float]:
        """log p(match) per pair."""
        text = _pad_states([it.text_states for it in items])
        mask = _pad_stack([np.ones(len(it.text_states), np.int64) for it in items])
        image = np.stack([it.image_states for it in items])
        return list(self.tasks.itm_log_match(text, mask, image))

    def _run_caption(self, items: list[CaptionInput]) -> list[str]:
        # decode each (max_length, num_beams) setting as one batch
        out: list = [None] * len(items)
        for (length, beams), idx in _groups(items, lambda it: (it.max_length, it.num_beams)).items():
            states = np.stack([items[i].image_states for i in idx])
            on_step = _token_streams([items[i].on_token for i in idx])
            texts = self.tasks.captions(states, max_length=length, num_beams=beams, on_step=on_step)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
        return out

    # which endpoint a batcher works for (vision and text batches serve caption and retrieval alike)
    _ENDPOINT = {"vqa": "vqa", "caption": "caption", "itm": "retrieval", "vision": "shared", "text": "shared"}

    def _on_batch(self, name: str, n: int, seconds: float) -> None:
        component = self._ENDPOINT.get(name.split("/")[0], "shared")
        self.metrics.batch_size.labels(self.id, name).observe(n)
        self.metrics.batch_executions.labels(self.id, name).inc()
        self.metrics.inferences.labels(self.id, name).inc(n)
        self.metrics.inference_duration.labels(component, self.id, self.backend, name).observe(seconds)

    # Lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        for b in self.batchers.values():
            b.start()
        if self.settings.warmup:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.warmup)
        self.ready = True
        self.metrics.model_ready.labels(self.id, self.backend).set(1)
        self.metrics.warmup_duration.labels(self.id, self.backend).set(self.load_s + self.warmup_s)

    def warmup(self) -> None:
        """A real inference through every graph group and level, at batch 1 and at the largest
        batch, so readiness means answers come back and `auto` starts with latency estimates."""
        t0 = time.perf_counter()
        size = self.tasks.image_spec.size
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8)
        pixels = images[0]
        ids, mask = self.tasks.tokenize(["what shape is in the image?"])
        sizes = sorted({1, min(8, self.batchers["vision"].max_batch), self.batchers["vision"].max_batch})
        for n in sizes:
            for level in self.levels if self.tasks.vqa_mode else ():
                runner = self.batchers[f"vqa/{level}"]
                if level != "full" and n > 8:  # per-item graph: linear in n, 8 points suffice
                    continue
                for _ in range(2):
                    t = time.perf_counter()
                    runner.run_batch([VqaInput(pixels, TextInput(ids[0], mask[0]))] * n)
                    self.latency.observe(runner.name, n, time.perf_counter() - t)
            for name, payload in (("vision", pixels), ("text", TextInput(ids[0], mask[0]))):
                t = time.perf_counter()
                self.batchers[name].run_batch([payload] * n)
                self.latency.observe(name, n, time.perf_counter() - t)
        states, _ = self.tasks.encode_images(self.tasks.pixels(images))
        t = time.perf_counter()
        caption = self._run_caption([CaptionInput(states[0], 8, 1)])
        self.latency.observe("caption", 1, time.perf_counter() - t)
        text_states, _ = self.tasks.encode_texts(ids, mask)
        score = float(np.exp(self._run_itm([ItmInput(text_states[0], states[0])])[0]))
        if not (isinstance(caption[0], str) and 0.0 <= score <= 1.0):
            raise RuntimeError(f"warm-up produced invalid outputs (caption {caption!r}, itm {score})")
        self.warmup_s = time.perf_counter() - t0
        log.info("warm-up of %s done in %.2fs: %s", self.id, self.warmup_s, self.latency.snapshot())

    async def stop(self) -> None:
        self.ready = False
        self.metrics.model_ready.labels(self.id, self.backend).set(0)
        await asyncio.gather(*(b.stop(self.settings.graceful_shutdown_s) for b in self.batchers.values()))
        self.tasks.close()

    # Compute levels -----------------------------------------------------------------------------
    def level_options(self) -> list[LevelOption]:
        """Each level with its predicted time from now (preprocessing is already done when
        `auto` picks) until its answer is ready: the queue ahead plus its own batch."""
        out, margins = [], level_margins(self.prediction_errors)
        for name, point in self.levels.items():
            acc = point.min_accuracy if point.min_accuracy is not None else 1.0 if name == "full" else 0.0
            out.append(LevelOption(name, point, acc, self.predicted_s(name), margins[name]))
        return out

    def predicted_s(self, level: str) -> float:
        return self.batchers[f"vqa/{level}"].predicted_wait_s()

    def record_outcome(self, level: str, predicted_s: float, actual_s: float) -> None:
        """A VQA request's predicted vs actual time from level choice to answer: calibrates
        `auto`'s safety factor for that level (requests naming the level count too: same predictor)."""
        self.prediction_errors[level].observe(predicted_s, actual_s)

    def pick_level(self, compute, remaining_s: float | None) -> tuple[str, str]:
        """compute: 'auto' | level name | {'max_flops_ratio': x}. Returns (level, reason)."""
        if isinstance(compute, dict):
            return resolve(self.levels, max_flops_ratio=compute["max_flops_ratio"])[0], "max_flops_ratio"
        if compute == "auto":
            if remaining_s is None:
                fallback = self.settings.auto_without_deadline
                return (fallback if fallback in self.levels else "full"), "no_deadline"
            opt, reason = choose_level(self.level_options(), remaining_s)
            return opt.name, reason
        return resolve(self.levels, compute)[0], "requested"

    def compute_info(self, level: str, kept: int | None, reason: str) -> Compute:
        point = self.levels[level]
        return Compute(level, point.flops_ratio, kept if kept is not None else self.image_tokens, self.image_tokens, reason)

    def answers(self, logits: np.ndarray, top_k: int) -> list[tuple[str, float]]:
        return self.tasks.answers(logits[None], top_k)[0]

    # Tasks (one method per route) -----------------------------------------------------------------
    async def _run(self, batcher: str, payload: Any, call: Call) -> Any:
        """Queue one item on a batcher and wait for its result, the way `call` waits."""
        b = self.batchers[batcher]
        try:
            fut = b.submit(payload, call.deadline)
        except QueueFull:
            self.metrics.rejections.labels(call.endpoint, "queue_full").inc()
            raise
        result, queued_s = await call.wait(fut, b.name)
        self.metrics.queue_duration.labels(call.endpoint, self.id).observe(queued_s)
        return result

    async def vqa(
        self, pixels: np.ndarray, question: TextInput, compute, top_k: int, call: Call, num_beams: int = 1
    ) -> VqaAnswer:
        """compute: 'auto' | level name | {'max_flops_ratio': x}; 'auto' means the server's
        default_compute when that is not 'auto' (reported as reason 'default'). A generative model
        answers with one generated answer (greedy, or beam search with num_beams)."""
        if self.tasks.vqa_mode is None:
            raise InvalidRequest(f"model {self.id} cannot answer questions: it has no closed answer list and no answer decoder")
        defaulted = compute == "auto" and isinstance(compute, str) and self.settings.default_compute != "auto"
        if defaulted:
            compute = self.settings.default_compute
        level, reason = self.pick_level(compute, call.remaining_s())
        if defaulted and reason == "requested":  # the server's TRIMVLM_DEFAULT_COMPUTE level, not the client's
            reason = "default"
        self.metrics.level_decisions.labels("vqa", level, reason).inc()
        call.on_level(level)
        picked_at, predicted = time.perf_counter(), self.predicted_s(level)
        try:
            out: VqaOutput = await self._run(f"vqa/{level}", VqaInput(pixels, question, num_beams), call)
        except DeadlineExceeded:  # late ones count too (at least this long), or the margin learns only from successes
            self.record_outcome(level, predicted, time.perf_counter() - picked_at)
            raise
        tp = time.perf_counter()
        top = [out.generated] if out.generated is not None else self.answers(out.logits, top_k)
        self.record_outcome(level, predicted, time.perf_counter() - picked_at)
        if out.tokens_kept is not None:
            self.metrics.kept_token_ratio.labels(self.id, level).observe(out.tokens_kept / self.image_tokens)
        self.metrics.postprocess_duration.labels("vqa").observe(time.perf_counter() - tp)
        return VqaAnswer(top, self.compute_info(level, out.tokens_kept, reason))

    async def caption(
        self, pixels: np.ndarray, max_length: int, num_beams: int, call: Call, on_token: Callable[[int], None] | None = None
    ) -> tuple[str, Compute]:
        """The caption and its compute (captions have no compute choice: always full). `on_token`: see
        CaptionInput (streamed captions)."""
        [image] = await self.encode_images([pixels], call)
        text = await self._run("caption", CaptionInput(image.states, max_length, num_beams, on_token), call)
        self.metrics.generated_tokens.labels("caption").observe(max(1, len(text.split())))
        return text, self.compute_info("full", None, "default")

    async def encode_images(self, pixels: list[np.ndarray], call: Call) -> list[Encoding]:
        return list(await asyncio.gather(*(self._run("vision", px, call) for px in pixels)))

    async def encode_texts(self, texts: list[TextInput], call: Call) -> list[Encoding]:
        return list(await asyncio.gather(*(self._run("text", t, call) for t in texts)))

    async def itm(self, pairs: list[ItmInput], call: Call) -> np.ndarray:
        """log p(match) per (text, image) pair."""
        return np.asarray(await asyncio.gather(*(self._run("itm", p, call) for p in pairs)), np.float32)

    async def rank(self, query: np.ndarray | TextInput, candidates: list, rerank: bool, call: Call) -> Ranking:
        """An image query (pixels) against candidate texts, or a text query against candidate images:
        ITC scores, and when `rerank` ITM match probabilities and the re-ranking score."""
        if isinstance(query, TextInput):
            [text] = await self.encode_texts([query], call)
            images = await self.encode_images(candidates, call)
            itc = [float(im.embed @ text.embed) for im in images]
            pairs = [ItmInput(text.states, im.states) for im in images]
        else:
            [image] = await self.encode_images([query], call)
            texts = await self.encode_texts(candidates, call)
            itc = [float(image.embed @ t.embed) for t in texts]
            pairs = [ItmInput(t.states, image.states) for t in texts]
        if not rerank:
            return Ranking(itc, itc, itc)
        log_p = await self.itm(pairs, call)
        ranked = rerank_scores(log_p, np.asarray(itc), self.tasks.rerank_itc_weight)
        return Ranking([float(p) for p in np.exp(log_p)], itc, [float(r) for r in ranked])

    async def search(self, query: np.ndarray | TextInput, gallery, top_k: int, rerank: int, call: Call, io) -> list[Hit]:
        """A text or image query (pixels) against a gallery: its `top_k` best by ITC; with `rerank` > 0
        (text queries), the `max(top_k, rerank)` best by ITC re-ranked (service.tasks.rerank_scores)
        where the gallery stored the image's states; those it could not re-rank follow, by ITC. Gallery
        reads run on the `io` executor (SQLite, the index)."""
        if isinstance(query, TextInput):
            [q] = await self.encode_texts([query], call)
        else:
            [q] = await self.encode_images([query], call)
            rerank = 0
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(io, gallery.search, q.embed, max(top_k, rerank))
        itc = {h[0]: h[1] for h in hits}
        scores, ranks = dict(itc), dict(itc)
        order = sorted(itc, key=lambda k: -itc[k])
        if rerank and hits:
            stored = await loop.run_in_executor(io, gallery.states_many, [h[0] for h in hits])  # one read
            rerankable = [hid for hid in order if stored.get(hid) is not None]
            if rerankable:
                log_p = await self.itm([ItmInput(q.states, stored[hid].astype(np.float32)) for hid in rerankable], call)
                ranked = rerank_scores(log_p, np.array([itc[h] for h in rerankable]), self.tasks.rerank_itc_weight)
                scores |= {hid: float(p) for hid, p in zip(rerankable, np.exp(log_p), strict=True)}
                ranks |= {hid: float(r) for hid, r in zip(rerankable, ranked, strict=True)}
                done = set(rerankable)
                # stable: equal scores keep their ITC order
                order = sorted(rerankable, key=lambda k: -ranks[k]) + [h for h in order if h not in done]
        meta = {h[0]: h[2] for h in hits}
        return [Hit(k, scores[k], itc[k], ranks[k], meta[k]) for k in order[:top_k]]

    async def index(self, pixels: np.ndarray, gallery, item_id: str | None, metadata: dict, call: Call, io) -> str:
        """Encode an image and store it in a gallery (its ITC embedding, and its states in fp16 for ITM
        re-ranking); returns the id. Gallery writes run on the `io` executor."""
        [image] = await self.encode_images([pixels], call)
        states = image.states.astype(np.float16)
        return await asyncio.get_running_loop().run_in_executor(io, lambda: gallery.add(image.embed, item_id, metadata, states))

    # What the routes show -------------------------------------------------------------------------
    @property
    def max_caption_length(self) -> int:
        return self.tasks.manifest.preprocessing.max_caption_length

    @property
    def decoder_positions(self) -> int | None:
        """Text positions of the model's decoder (None: not recorded by an older export)."""
        return self.tasks.manifest.preprocessing.max_positions

    @property
    def embed_dim(self) -> int:
        return int(self.tasks.manifest.graphs["vision"].outputs[1].shape[-1])

    def unknown_words(self, text: str) -> list[str]:
        return self.tasks.unknown_words(text)

    def queue_depths(self) -> dict[str, int]:
        return {name: b.depth for name, b in self.batchers.items()}

    def describe(self) -> dict:
        """The model as GET /v1/models lists it (less what the app knows: ready, default)."""
        m = self.tasks.manifest
        return {
            "tasks": m.tasks,
            "levels": {name: {"flops_ratio": p.flops_ratio, "accuracy": p.accuracy} for name, p in self.levels.items()},
            "backend": self.tasks.runtime.describe(),
            "precision": self.tasks.precision,
            "description": m.description,
            "vqa": self.tasks.vqa_mode,
            "answer_vocabulary": "closed" if m.answers else ("open" if self.tasks.vqa_mode == "generative" else None),
            "answers": list(m.answers) or None,
            "image_size": m.preprocessing.image.size,
            "max_text_length": m.preprocessing.max_text_length,
            "rerank_itc_weight": m.rerank_itc_weight,
            "known_words": m.known_words,
        }
