"""What the app holds while it runs: settings, metrics, the served models, their galleries and
the thread pools (decode/tokenise off the event loop; inference)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service import tracing
from service.errors import InvalidRequest, ModelUnavailable, UnknownModel
from service.images import ImageError, ImageLimits, OpenedImage, load_request_image, open_request_image
from service.metrics import Metrics
from service.repository import ManifestError, check_files, find_models, latest, load_manifest
from service.server import ModelServer, TextInput
from service.settings import Settings

log = logging.getLogger("trimvlm.state")


def lower_priority(increment: int) -> None:
    """Run the calling thread, and the threads it creates later (ONNX Runtime's pools are made when
    a session is), `increment` nice levels lower. Under overload the event loop must keep the CPU
    to accept connections and refuse them with 429: at equal priority the model threads took most
    of it and connections overflowed the accept queue (reset) instead. Linux: nice is per thread."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError as e:  # not fatal: a platform without per-thread priorities
        log.warning("could not lower worker thread priority: %s", e)


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    preprocess_pool: ThreadPoolExecutor
    inference_pool: ThreadPoolExecutor
    servers: dict[str, ModelServer] = field(default_factory=dict)
    default: str | None = None
    galleries: dict = field(default_factory=dict)
    gallery_error: str | None = None  # a shared gallery unreachable at start-up: not ready until it answers
    loading: bool = True
    load_error: str | None = None
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def create(cls, settings: Settings) -> AppState:
        s = settings
        limits = ImageLimits(
            max_image_bytes=s.max_image_bytes,
            max_pixels=s.max_pixels,
            formats=set(s.image_formats),
            allow_urls=s.allow_urls,
            url_allowlist=list(s.url_allowlist),
            allow_private_urls=s.allow_private_urls,
            url_timeout_s=s.url_timeout_s,
        )
        nice = (settings.worker_nice,)
        return cls(
            settings,
            Metrics(),
            ThreadPoolExecutor(settings.preprocess_threads, "preprocess", initializer=lower_priority, initargs=nice),
            ThreadPoolExecutor(settings.inference_threads, "inference", initializer=lower_priority, initargs=nice),
            image_limits=limits,
        )

    def load_models(self) -> None:
        """Load the exported models under models_dir that the version policy serves."""
        root, policy = self.settings.models_dir, self.settings.version_policy
        every, folders = find_models(root), find_models(root, policy)
        if not every:
            raise RuntimeError(f"no exported models (manifest.json) under {root}; run `trimvlm export`")
        if not folders:
            there = ", ".join(f"{f.parent.name}/{f.name}" for f in every)
            raise RuntimeError(f"no version under {root} is served by the version policy {policy} (there: {there})")
        for folder in every:
            if folder not in folders:
                log.info("not serving %s: outside the version policy %s", folder, policy)
        for folder in folders:
            m = load_manifest(folder)
            mid = f"{m.name}/{m.version}"
            if mid in self.servers:  # two folders whose manifests name the same version: one would hide the other
                raise ManifestError(f"{folder}: its manifest names {mid}, as {self.servers[mid].tasks.folder} does")
            # A damaged or missing file must stop loading with a clear error (readiness shows it), not
            # surface later as an ORT parse error, or not at all for a file ORT reads without complaint.
            problems = check_files(folder, m) if self.settings.verify_checksums else []
            if problems:
                raise ManifestError(f"{folder}: {'; '.join(problems)} (re-export, or restore the files)")
            self.servers[mid] = ModelServer(folder, self.settings, self.metrics, self.inference_pool)
            log.info("loaded %s from %s (%s)", mid, folder, self.servers[mid].tasks.runtime.describe())
        wanted = self.settings.default_model or next(iter(self.servers)).split("/")[0]  # else the first name
        matches = [k for k in self.servers if k == wanted or k.split("/")[0] == wanted]
        if not matches:
            raise RuntimeError(f"default model {wanted!r} is not among {sorted(self.servers)}")
        self.default = latest(matches)

    def server(self, model: str | None) -> ModelServer:
        if model is None:
            model = self.default
            if model is None:  # still loading, or loading failed: not the client's fault, so 503 rather than 404
                raise ModelUnavailable("no model is ready yet (see /readyz)")
        if model in self.servers:
            srv = self.servers[model]
        else:
            versions = [k for k in self.servers if k.split("/")[0] == model]
            if not versions:
                raise UnknownModel(f"no model {model!r}; serving {sorted(self.servers)}")
            srv = self.servers[latest(versions)]
        if not srv.ready:
            raise ModelUnavailable(f"{srv.id} is still loading")
        return srv

    def gallery(self, srv: ModelServer):
        """The model's gallery (service/gallery/): the embedded one opens its folder on first use; a shared one
        was made at start-up (connect_galleries) and never blocks here."""
        if srv.id not in self.galleries:
            from service.gallery import open_gallery

            self.galleries[srv.id] = open_gallery(self.settings, srv.id, srv.embed_dim)
        return self.galleries[srv.id]

    def connect_galleries(self) -> None:
        """With a shared gallery backend, reach the database for every served model (blocking; the start-up
        readiness check). Sets `gallery_error` while it does not answer, clears it when it does."""
        if self.settings.gallery_backend == "embedded":
            return
        try:
            for srv in self.servers.values():
                self.gallery(srv).connect()
        except Exception as e:
            self.gallery_error = f"gallery ({self.settings.gallery_backend} at {self.settings.gallery_url}): {e}"
            raise
        self.gallery_error = None

    def prepare_image(self, payload: str | bytes) -> tuple[str | bytes | OpenedImage, bool]:
        """(What decode_image takes, whether it runs on the event loop): a payload small on the wire has its
        base64 decoded and its header read here, once, and is decoded inline when the header declares at
        most `inline_preprocess_max_pixels`. Larger images, URLs and anything big on the wire go to the
        pool as they came."""
        limit = self.settings.inline_preprocess_max_pixels
        if limit <= 0 or len(payload) > 4 * limit + 4096:  # base64 of <= 3 bytes a pixel, plus headers
            return payload, False
        try:
            opened = open_request_image(payload, self.image_limits)
        except ImageError:
            return payload, True  # refused from its header: decoding raises the same error at once
        if opened is None:
            return payload, False
        if opened.pixels > limit:
            opened.image.close()
            return payload, False
        return opened, True

    async def image_pixels(self, payload: str | bytes, srv: ModelServer, endpoint: str) -> np.ndarray:
        """A request image decoded for srv, on the event loop or in the pool (prepare_image)."""
        prepared, inline = self.prepare_image(payload)
        return await self.run_pre(self.decode_image, prepared, srv, endpoint, inline=inline)

    @tracing.traced("preprocess")
    async def run_pre(self, fn, *args, inline: bool = False):
        """Decode/tokenise in the preprocessing pool (or, when `inline`, right here on the event
        loop), timed into the latency model's preprocess."""
        t0 = time.perf_counter()
        if inline:
            out = fn(*args)
        else:
            out = await asyncio.get_running_loop().run_in_executor(self.preprocess_pool, fn, *args)
        seconds = time.perf_counter() - t0
        for srv in self.servers.values():
            srv.latency.observe("preprocess", 1, seconds)
        return out

    def decode_image(self, payload: str | bytes | OpenedImage, srv: ModelServer, endpoint: str) -> np.ndarray:
        """Payload -> uint8 [H, W, 3] at srv's model size (raises ImageError); the batchers normalise a
        whole batch at once in the inference thread, cheaper than per image on the event loop. Runs in
        the preprocess pool, or inline (prepare_image)."""
        t0 = time.perf_counter()
        loaded = load_request_image(payload, self.image_limits, srv.tasks.image_spec)
        self.metrics.preprocess_duration.labels(endpoint, "image").observe(time.perf_counter() - t0)
        return loaded.array

    def tokenize(self, texts: list[str], srv: ModelServer, endpoint: str) -> list[TextInput]:
        t0 = time.perf_counter()
        limit = self.settings.max_text_chars
        for t in texts:
            if len(t) > limit:
                raise InvalidRequest(f"text of {len(t)} characters exceeds the limit of {limit}", "text_too_long")
            if not t.strip():
                raise InvalidRequest("text must not be empty", "empty_text")
            if not t.isascii():
                try:  # JSON may carry lone surrogates ("\ud800"): valid JSON, not text; the tokenizer raised (500)
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest("text is not valid Unicode (a lone surrogate escape)", "invalid_text") from None
        ids, mask = srv.tasks.tokenize(texts)
        self.metrics.preprocess_duration.labels(endpoint, "tokenize").observe(time.perf_counter() - t0)
        lengths = mask.sum(1)
        return [TextInput(ids[i, : lengths[i]], mask[i, : lengths[i]]) for i in range(len(texts))]
