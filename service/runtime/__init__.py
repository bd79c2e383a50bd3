"""Inference backends behind one interface, and the factory that picks one with fallbacks.

    runtime = load_runtime("auto", {"vision": Path("vision.onnx"), ...}, RuntimeOptions())
    out = runtime.run("vision", {"pixel_values": pixels})

Fallback chains (each step logged on "trimvlm.runtime"):
    tensorrt / auto        -> onnxruntime[cuda] -> onnxruntime[cpu]
    onnxruntime[tensorrt]  -> onnxruntime[cuda] -> onnxruntime[cpu]
    onnxruntime[cuda]      -> onnxruntime[cpu]
    torch[cuda]            -> torch[cpu]          (parity checks only; never falls back to ONNX)
A graph path may name either file: native TensorRT takes `<stem>.plan` next to `<stem>.onnx`,
ONNX Runtime takes `<stem>.onnx` next to `<stem>.plan`, so one graphs dict serves every step.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from service.runtime.base import Runtime, RuntimeOptions, RuntimeUnavailable, TensorSpec, prepare_feeds
from service.runtime.onnxruntime_backend import OnnxRuntime
from service.runtime.tensorrt_backend import TensorRTRuntime
from service.runtime.torch_backend import TorchRuntime

__all__ = [
    "BACKENDS",
    "OnnxRuntime",
    "Runtime",
    "RuntimeOptions",
    "RuntimeUnavailable",
    "TensorRTRuntime",
    "TensorSpec",
    "TorchRuntime",
    "create_runtime",
    "load_runtime",
    "prepare_feeds",
]

log = logging.getLogger("trimvlm.runtime")

BACKENDS = ("onnxruntime", "tensorrt", "torch", "auto")
_ENGINE_SUFFIXES = (".plan", ".engine")


def _chain(backend: str, options: RuntimeOptions) -> list[tuple[str, RuntimeOptions]]:
    """The backends to try, best first."""
    cpu, cuda = replace(options, device="cpu"), replace(options, device="cuda")
    if backend in ("tensorrt", "auto"):
        return [("tensorrt", cuda), ("onnxruntime", cuda), ("onnxruntime", cpu)]
    if backend == "onnxruntime":
        steps = {"tensorrt": [options, cuda, cpu], "cuda": [cuda, cpu]}.get(options.device, [options])
        return [("onnxruntime", o) for o in steps]
    if backend == "torch":
        return [("torch", options)] + ([("torch", cpu)] if options.device != "cpu" else [])
    raise ValueError(f"unknown runtime backend {backend!r} (one of {list(BACKENDS)})")


def _label(backend: str, options: RuntimeOptions) -> str:
    return "tensorrt" if backend == "tensorrt" else f"{backend}[{options.device}]"


def _make(backend: str, options: RuntimeOptions, model_dir: str | Path | None) -> Runtime:
    if backend == "tensorrt":
        return TensorRTRuntime(options)
    if backend == "torch":
        return TorchRuntime(model_dir, options)
    return OnnxRuntime(options)


def _files_for(backend: str, graphs: dict[str, Path]) -> dict[str, Path]:
    """Swap in the sibling file the backend reads (.plan for TensorRT, .onnx for the others)."""
    out = {}
    for name, path in graphs.items():
        path = Path(path)
        if backend == "tensorrt" and path.suffix == ".onnx" and path.with_suffix(".plan").is_file():
            path = path.with_suffix(".plan")
        elif backend == "onnxruntime" and path.suffix in _ENGINE_SUFFIXES and path.with_suffix(".onnx").is_file():
            path = path.with_suffix(".onnx")
        out[name] = path
    return out


def _open(
    backend: str, options: RuntimeOptions | None, fallback: bool, model_dir: str | Path | None, graphs: dict[str, Path] | None
) -> Runtime:
    options = options or RuntimeOptions()
    chain = _chain(backend, options)
    if backend == "auto":
        fallback = True  # trying its way down is what "auto" means
    elif not fallback:
        chain = chain[:1]
    reasons: list[str] = []
    for i, (name, opts) in enumerate(chain):
        runtime = _make(name, opts, model_dir)
        try:
            runtime.check_available()
            if graphs is not None:
                runtime.load(_files_for(name, graphs))
        except RuntimeUnavailable as e:
            runtime.close()
            if not fallback:
                raise
            reasons.append(f"{_label(name, opts)}: {e}")
            if i + 1 == len(chain):
                raise RuntimeUnavailable(f"no runtime can run here (asked for {backend}): " + "; ".join(reasons)) from e
            # "auto" trying its way down is expected, not a degradation: info, not warning.
            level = logging.INFO if backend == "auto" else logging.WARNING
            nxt = _label(*chain[i + 1])
            log.log(
                level, "runtime %s asked for, but %s is unavailable: %s; using %s instead", backend, _label(name, opts), e, nxt
            )
            continue
        runtime.fallbacks = reasons
        if backend == "auto":
            log.info("runtime auto: using %s", _label(name, opts))
        return runtime
    raise AssertionError("unreachable: the chain is never empty")


def create_runtime(
    backend: str, options: RuntimeOptions | None = None, fallback: bool = True, model_dir: str | Path | None = None
) -> Runtime:
    """A runtime of `backend` (onnxruntime | tensorrt | torch | auto) that can run here, not yet
    loaded; with fallback, the next one in its chain where it can't (logged); without, its
    RuntimeUnavailable propagates ("auto" always walks its chain). A provider that is listed but
    fails to start is only found by loading: prefer load_runtime."""
    return _open(backend, options, fallback, model_dir, None)


def load_runtime(
    backend: str,
    graphs: dict[str, Path],
    options: RuntimeOptions | None = None,
    fallback: bool = True,
    model_dir: str | Path | None = None,
) -> Runtime:
    """create_runtime + load(graphs), falling back also when loading shows the backend can't run."""
    return _open(backend, options, fallback, model_dir, graphs)
