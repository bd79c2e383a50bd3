"""The one interface every inference backend implements (ONNX Runtime, TensorRT, torch).

A runtime holds a set of named graphs (vision, text, fusion, vqa, decoder_step, ...) and runs one
of them on numpy inputs. It knows nothing of HTTP, batching or tasks: service code composes
graphs into VQA, captioning and retrieval (clip-as-service's executor split).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class RuntimeUnavailable(RuntimeError):
    """The backend cannot run here (library missing, no GPU); the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, bool ("unknown" if the backend can't tell)
    shape: tuple[int | str, ...]  # ints for fixed axes, names for dynamic ones


@dataclass
class RuntimeOptions:
    """Backend settings (the service fills these from TRIMVLM_* settings)."""

    device: str = "cpu"  # cpu | cuda | tensorrt (ONNX Runtime's TensorRT execution provider)
    intra_op_threads: int = 0  # 0: the library's default (one per core)
    inter_op_threads: int = 1
    memory_arena: bool = True  # ORT CPU arena: faster steady state, holds peak memory
    graph_optimization: str = "all"  # disable | basic | extended | all
    io_binding: bool = True  # GPU only: bind feeds/outputs once per call instead of per-tensor copies in run()
    tensorrt_cache_dir: str | None = None  # ORT TensorRT EP / native engines
    # backend-specific knobs: device_id (int), trt_fp16 (bool), allow_spinning (bool), ort_log_level (int)
    extra: dict = field(default_factory=dict)


def _numpy_dtype(name: str) -> np.dtype | None:
    """The numpy dtype for a spec's dtype name, None where numpy has none (bfloat16, unknown)."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    """Casts we do silently: within a kind (int64 <-> int32, float32 -> float16), integers/bools to
    floats or to each other (masks). Never floats to integers/bools: that would hide a bug."""
    if src.kind == "f":
        return dst.kind in "fc"
    return True


def prepare_feeds(graph: str, specs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check and convert feeds for one graph: every input present, rank and fixed axes right,
    dtype cast to what the graph takes, C-contiguous. Feeds the graph does not take are ignored,
    so one feed dict can serve several graphs (text and fusion share attention_mask)."""
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise ValueError(f"graph {graph!r}: missing input(s) {missing}; it takes {[s.name for s in specs]}, got {sorted(feeds)}")
    out = {}
    for spec in specs:
        arr = np.asarray(feeds[spec.name])
        want = _numpy_dtype(spec.dtype)
        if want is not None:  # specs the backend can't tell (torch without a sample) pass as they are
            where = f"graph {graph!r}: input {spec.name!r}"
            fixed_ok = all(not isinstance(s, int) or s < 0 or d == s for d, s in zip(arr.shape, spec.shape, strict=False))
            if len(arr.shape) != len(spec.shape) or not fixed_ok:
                raise ValueError(f"{where} has shape {arr.shape}, expected {spec.shape} (names are dynamic axes)")
            if arr.dtype != want:
                if not _castable(arr.dtype, want):
                    raise TypeError(f"{where} is {arr.dtype}, the graph takes {want} (not cast: it would truncate)")
                arr = arr.astype(want)
        out[spec.name] = np.ascontiguousarray(arr)
    return out


class Runtime(ABC):
    """Load named graphs once, run them many times."""

    name: str = "base"

    def __init__(self, options: RuntimeOptions | None = None):
        self.options = options or RuntimeOptions()
        self.fallbacks: list[str] = []  # why a preferred backend was not used (filled by create_runtime)

    def check_available(self) -> None:  # noqa: B027 (optional hook)
        """Raise RuntimeUnavailable if this backend cannot run here; cheap, loads nothing.
        load() may still raise it (a provider that is listed but fails to start)."""

    @abstractmethod
    def load(self, graphs: dict[str, Path]) -> None:
        """Load every graph (file per name). Raises RuntimeUnavailable if the backend can't run."""

    @abstractmethod
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph; returns every output by name as numpy arrays. Feeds are cast to the
        graph's dtypes (see prepare_feeds); a missing input is a ValueError, extra feeds are ignored."""

    @abstractmethod
    def inputs(self, graph: str) -> list[TensorSpec]: ...

    @abstractmethod
    def outputs(self, graph: str) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def graphs(self) -> list[str]: ...

    def _unknown_graph(self, graph: str) -> KeyError:
        return KeyError(f"{self.name}: unknown graph {graph!r}; loaded graphs: {sorted(self.graphs)}")

    def describe(self) -> dict:
        """What is actually running (providers, device), for logs and /v1/models."""
        info = {"runtime": self.name, "device": self.options.device}
        if self.fallbacks:
            info["fallbacks"] = list(self.fallbacks)
        return info

    def dummy_feeds(self, graph: str, batch: int = 1, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Feeds of the right dtypes and shapes: dynamic axes take `dims[name]`, else `batch` for
        axis 0 and 1 elsewhere. Integers/bools are ones (valid token ids, all-visible masks)."""
        dims = dims or {}
        feeds = {}
        for spec in self.inputs(graph):
            shape = tuple(
                d if isinstance(d, int) and d >= 0 else dims.get(str(d), batch if i == 0 else 1) for i, d in enumerate(spec.shape)
            )
            dtype = _numpy_dtype(spec.dtype) or np.dtype(np.float32)
            feeds[spec.name] = np.zeros(shape, dtype) if dtype.kind == "f" else np.ones(shape, dtype)
        return feeds

    def warmup(self, feeds: dict[str, dict[str, np.ndarray]] | None = None, runs: int = 1) -> dict[str, float]:
        """Run every graph `runs` times (given feeds per graph, else dummy ones) before serving,
        so first requests don't pay for lazy allocation/kernel selection (Triton's warmup).
        Returns the last run's seconds per graph."""
        seconds = {}
        for graph in self.graphs:
            graph_feeds = (feeds or {}).get(graph) or self.dummy_feeds(graph)
            for _ in range(max(runs, 1)):
                start = time.perf_counter()
                self.run(graph, graph_feeds)
                seconds[graph] = time.perf_counter() - start
        return seconds

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release sessions/engines."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
