"""Prometheus metrics (prometheus-client), named and bucketed as in the serving reference
(vlm_ prefix, seconds, bounded labels). One registry per app so tests can run several apps."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.35,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    30,
)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.request_duration = Histogram(
            "vlm_request_duration_seconds",
            "End-to-end request time in the server.",
            ["endpoint", "model", "level", "code"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "vlm_request_queue_duration_seconds",
            "Enqueue to batch dispatch.",
            ["endpoint", "model"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "vlm_preprocess_duration_seconds",
            "Decode, resize, tokenise.",
            ["endpoint", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "vlm_inference_duration_seconds",
            "Runtime time per batch and graph group.",
            ["endpoint", "model", "backend", "component"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.postprocess_duration = Histogram(
            "vlm_postprocess_duration_seconds", "Answers, captions, rankings.", ["endpoint"], buckets=STAGE_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "vlm_batch_size", "Items per executed batch.", ["model", "component"], buckets=BATCH_BUCKETS, registry=r
        )
        self.kept_token_ratio = Histogram(
            "vlm_kept_token_ratio",
            "Image tokens kept / total, per trimmed request.",
            ["model", "level"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Histogram(
            "vlm_generated_tokens", "Caption tokens generated.", ["endpoint"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.requests = Counter(
            "vlm_requests", "Requests by endpoint, model, level and status.", ["endpoint", "model", "level", "code"], registry=r
        )
        self.failures = Counter("vlm_request_failures", "Failed requests by reason.", ["endpoint", "reason"], registry=r)
        self.rejections = Counter(
            "vlm_rejections", "Requests refused before queueing (queue full, deadline).", ["endpoint", "reason"], registry=r
        )
        self.deadline_misses = Counter(
            "vlm_deadline_misses", "Requests that missed their deadline.", ["endpoint", "level"], registry=r
        )
        self.level_decisions = Counter(
            "vlm_level_decisions", "Compute level chosen per request.", ["endpoint", "level", "reason"], registry=r
        )
        self.batch_executions = Counter("vlm_batch_executions", "Executed batches.", ["model", "component"], registry=r)
        self.inferences = Counter(
            "vlm_inferences", "Items inferred (ratio to batches = mean batch).", ["model", "component"], registry=r
        )
        self.cancelled = Counter(
            "vlm_cancelled_items", "Queued items dropped because the client went away.", ["component"], registry=r
        )
        self.inflight = Gauge("vlm_inflight_requests", "Requests being served.", ["endpoint"], registry=r)
        self.queue_size = Gauge("vlm_queue_size", "Items waiting in the batchers.", ["model", "component"], registry=r)
        self.queue_capacity = Gauge(
            "vlm_queue_capacity",
            "Items a batcher queues before it refuses with 429 (TRIMVLM_MAX_QUEUE_SIZE).",
            ["model", "component"],
            registry=r,
        )
        self.auto_safety_factor = Gauge(
            "vlm_auto_safety_factor",
            "Margin `auto` puts on a level's predicted latency: recent p99 of actual/predicted.",
            ["model", "level"],
            registry=r,
        )
        self.model_ready = Gauge("vlm_model_ready", "1 once loaded and warmed up.", ["model", "backend"], registry=r)
        self.warmup_duration = Gauge("vlm_warmup_duration_seconds", "Load + warm-up time.", ["model", "backend"], registry=r)
        self.build_info = Info("vlm_build", "Build and runtime versions.", registry=r)

    def set_build_info(self, **extra: str) -> None:
        import onnxruntime

        from service import __version__

        self.build_info.info(
            {"version": __version__, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, **extra}
        )
