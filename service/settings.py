"""Service settings: every limit explicit, with a sane default, overridable by TRIMVLM_* env vars
(e.g. TRIMVLM_MAX_BATCH_SIZE=16) or a .env file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.repository import VersionPolicy
from service.runtime.base import RuntimeOptions


def default_gallery_dir() -> Path:
    """Per-user data, neither the working directory (`make run` in a checkout left an untracked gallery/ there)
    nor ~/.cache/trimvlm (a gallery is added to by hand, not re-creatable): $XDG_DATA_HOME/trimvlm/gallery,
    by default ~/.local/share/trimvlm/gallery. Images and deployments set TRIMVLM_GALLERY_DIR to a volume."""
    data = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data) if os.path.isabs(data) else Path.home() / ".local" / "share"  # XDG: a relative value is ignored
    return base / "trimvlm" / "gallery"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIMVLM_", env_file=".env", extra="ignore")

    # Where and what to serve
    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path = Path("models")
    default_model: str | None = None  # name or name/version (the highest served); None: the first name
    # Which versions of each model under models_dir are served (Triton's version_policy): latest:N (the N
    # highest version numbers), all, or specific:1,3. Folders not named by a number are never served.
    version_policy: str = "latest:1"
    backend: str = "onnxruntime"  # onnxruntime | tensorrt | torch | auto (falls back, logged)
    device: str = "cpu"  # cpu | cuda | tensorrt (ORT execution provider)
    precision: str | None = None  # fp32 | int8 | fp16; None: the manifest's default for the device
    intra_op_threads: int = 0  # 0: one per core
    tensorrt_cache_dir: Path | None = None  # TensorRT engines (ORT TensorRT provider / native), on a volume
    # ORT worker threads spin-wait after each run by default; in a server that also parses HTTP
    # and decodes images on the same cores, spinning starves the event loop
    ort_spinning: bool = False
    # ORT's CPU memory arena (see docs/RELIABILITY.md, "Memory"): measured with `trimvlm bench soak`
    ort_cpu_mem_arena: bool = True
    verify_checksums: bool = True  # sha256 of every model file against its manifest before loading (ms for MBs)

    # Request limits (413 / 422 beyond them)
    max_body_bytes: int = 16 * 2**20
    # A body refused as too large (413) is read and discarded after the answer, up to this many more
    # bytes and this long (as nginx's lingering close), then the connection closes: closing with the
    # upload still arriving makes the kernel reset it, and clients that read their answer only after
    # sending (urllib, requests) see "connection reset" instead of the 413. 0: close at once.
    max_drain_bytes: int = Field(64 * 2**20, ge=0)
    drain_timeout_s: float = Field(5.0, ge=0)
    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000  # decompression-bomb guard, checked before decoding
    image_formats: list[str] = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
    max_text_chars: int = 512
    max_items: int = 32  # items in one batch-form request
    max_candidates: int = 64  # texts or images ranked in one /retrieval/rank request
    max_top_k: int = 100
    max_caption_length: int = 64
    max_beams: int = 5

    # Image URLs: off unless enabled; only allow-listed hosts; never private/loopback targets
    allow_urls: bool = False
    url_allowlist: list[str] = []
    allow_private_urls: bool = False
    url_timeout_s: float = 5.0

    # Dynamic batching and admission
    batching: bool = True
    max_batch_size: int = 32
    # 0: no added wait. Items that arrive while a batch runs form the next batch (no delay at low
    # load, full batches under load); >0 also holds a batch open this long for more items.
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 512  # queued items per batcher; beyond it 429 + Retry-After
    # Batches of one batcher running at once, each on its own inference thread. With intra_op_threads 0
    # each session then gets cores / (workers x batches) threads. 0: 2 in a single process (two
    # single-threaded batches on 2 cores served 1.2x the req/s of one two-threaded batch, with a lower
    # 1-client p50), 1 in each of several workers (the processes already run side by side; a second
    # batch each measured slower: README, "Server layout"). 1 gives one request all the cores (large
    # models, latency first).
    batch_concurrency: int = Field(0, ge=0)
    # Server processes on this machine, each on its own socket of the port (`serve --workers`).
    workers: int = Field(1, ge=1)
    # Task requests in flight (reading, decoding, queued, running); beyond it 429 `overloaded` + Retry-After
    # at once. 0: no limit. Bounds the wait under overload to about this / capacity (docs/RELIABILITY.md).
    max_inflight_requests: int = 256
    # Connections waiting to be accepted (listen backlog; the kernel caps it at net.core.somaxconn).
    # Under a connection storm, connections beyond it are reset before the app can refuse them (429).
    listen_backlog: int = Field(4096, ge=64)
    default_deadline_ms: float | None = None  # per-request deadline when the client sends none
    preprocess_threads: int = 4
    # Images whose header declares at most this many pixels are decoded on the event loop: at that
    # size (~0.1 ms) the trip through the preprocessing pool and back costs more than the work.
    # Larger images, URLs and anything big on the wire go to the pool. 0: always the pool.
    inline_preprocess_max_pixels: int = Field(65_536, ge=0)
    inference_threads: int = 2
    # nice increment for the preprocessing and inference threads (and ONNX Runtime's pools), so the
    # event loop keeps the CPU it needs to accept and refuse under overload (service/state.py)
    worker_nice: int = Field(5, ge=0, le=19)

    # Adaptive compute: `auto` picks the most accurate level predicted to meet the deadline
    default_compute: str = "auto"
    auto_without_deadline: str = "full"  # what `auto` runs when a request has no deadline
    # `auto`'s margin per level = this quantile of recent actual/predicted times (service/adaptive.py):
    # higher = fewer deadline misses, more early refusals (503)
    auto_margin_quantile: float = Field(0.99, ge=0.5, le=1.0)

    # Retrieval gallery (service/gallery/): `embedded` keeps it in a folder owned by this one process (one
    # replica, one worker); `chroma` keeps it in a Chroma server that every replica and worker shares
    gallery_backend: Literal["embedded", "chroma"] = "embedded"
    gallery_dir: Path = Field(default_factory=default_gallery_dir)  # embedded: one subfolder per model
    gallery_url: str = "http://127.0.0.1:8001"  # chroma: the server (`chroma run --port 8001`)
    gallery_collection: str = "trimvlm"  # chroma: collection name prefix; one collection per model: <prefix>-<name>-<version>
    gallery_connect_timeout_s: float = Field(2.0, gt=0)  # chroma: connecting to the server
    gallery_timeout_s: float = Field(10.0, gt=0)  # chroma: one request to the server
    # chroma: after a failed call, retrieval answers 503 at once for this long before trying the server again
    # (and start-up retries the connection at this interval until the service is ready)
    gallery_retry_s: float = Field(1.0, gt=0)
    rerank_top_k: int = 16  # ITC candidates re-ranked by ITM
    gallery_max_items: int = 100_000
    gallery_page_max: int = Field(1000, ge=1)  # most items one GET /retrieval/index returns (its ?limit=)

    # Security and operations
    api_key: SecretStr | None = None  # Bearer token; None: no auth
    cors_origins: list[str] = []  # CORS off unless origins are listed
    log_level: str = "info"
    log_json: bool = True
    graceful_shutdown_s: float = 30.0
    # `trimvlm serve` exits 1 with a one-line error when the model repository cannot load (as Triton's
    # --exit-on-error). false, for debugging: keep serving, live (/healthz) but never ready (/readyz 503
    # with the error). The in-process app (create_app) never exits by itself.
    exit_on_load_error: bool = True
    demo_page: bool = True
    warmup: bool = True
    # gc.freeze() once the models are loaded and warm (service/app.py freeze_heap): full collections then
    # skip the start-up heap (measured in README, "Server layout")
    gc_freeze: bool = True
    # OpenTelemetry traces (service/tracing.py; the `otel` extra): a span per request with its stages, exported
    # as the standard OTEL_* variables say (OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT by default)
    tracing: bool = False

    @field_validator("version_policy")
    @classmethod
    def _version_policy(cls, value: str) -> str:
        return str(VersionPolicy.parse(value))  # a clear error now, rather than at model load

    def batches_at_once(self) -> int:
        """Batches of one batcher in flight per process: as set, or by the worker count (0)."""
        return self.batch_concurrency or (2 if self.workers == 1 else 1)

    def session_threads(self) -> int:
        """Intra-op threads of each runtime session: as set, or with 0 the cores shared among the
        batches that run at once in every worker (0 again, the library's one per core, for a single
        batch in a single process)."""
        sessions = self.batches_at_once() * self.workers
        if self.intra_op_threads or sessions == 1:
            return self.intra_op_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // sessions)

    def runtime_options(self) -> RuntimeOptions:
        """The backend settings `trimvlm serve` runs its models with (reports and benchmarks that
        compare against the service take the same)."""
        return RuntimeOptions(
            device=self.device,
            intra_op_threads=self.session_threads(),
            memory_arena=self.ort_cpu_mem_arena,
            tensorrt_cache_dir=str(self.tensorrt_cache_dir) if self.tensorrt_cache_dir else None,
            extra={"allow_spinning": self.ort_spinning},
        )
