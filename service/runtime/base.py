"""The one interface every inference backend implements (ONNX Runtime, TensorRT, torch).

A runtime holds a set of named graphs (vision, text, fusion, vqa, decoder_step, ...) and runs one
of them on numpy inputs. It knows nothing of HTTP, batching or tasks: service code composes
graphs into VQA, captioning and retrieval (clip-as-service's executor split).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class RuntimeUnavailable(RuntimeError):
    """The backend cannot run here (library missing, no GPU); the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, bool
    shape: tuple[int | str, ...]  # ints for fixed axes, names for dynamic ones


@dataclass
class RuntimeOptions:
    """Backend settings (the service fills these from TRIMVLM_* settings)."""

    device: str = "cpu"  # cpu | cuda
    intra_op_threads: int = 0  # 0: the library's default (one per core)
    inter_op_threads: int = 1
    memory_arena: bool = True  # ORT CPU arena: faster steady state, holds peak memory
    graph_optimization: str = "all"  # disable | basic | extended | all
    io_binding: bool = True  # GPU only: keep outputs on the device between graph calls
    tensorrt_cache_dir: str | None = None  # ORT TensorRT EP / native engines
    extra: dict = field(default_factory=dict)


class Runtime(ABC):
    """Load named graphs once, run them many times."""

    name: str = "base"

    def __init__(self, options: RuntimeOptions | None = None):
        self.options = options or RuntimeOptions()

    @abstractmethod
    def load(self, graphs: dict[str, Path]) -> None:
        """Load every graph (file per name). Raises RuntimeUnavailable if the backend can't run."""

    @abstractmethod
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph; returns every output by name as numpy arrays."""

    @abstractmethod
    def inputs(self, graph: str) -> list[TensorSpec]: ...

    @abstractmethod
    def outputs(self, graph: str) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def graphs(self) -> list[str]: ...

    def describe(self) -> dict:
        """What is actually running (providers, device), for logs and /v1/models."""
        return {"runtime": self.name, "device": self.options.device}

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release sessions/engines."""
