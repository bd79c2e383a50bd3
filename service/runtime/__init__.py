"""Inference backends behind one interface, and the factory that picks one with fallbacks.

    runtime = load_runtime("auto", {"vision": Path("vision.onnx"), ...}, RuntimeOptions())
    out = runtime.run("vision", {"pixel_values": pixels})

Fallback chains (each step logged on "trimvlm.runtime"):
    tensorrt / auto        -> onnxruntime[cuda] -> onnxruntime[cpu]
    onnxruntime[tensorrt]  -> onnxruntime[cuda] -> onnxruntime[cpu]
    onnxruntime[cuda]      -> onnxruntime[cpu]
    torch[cuda]            -> torch[cpu]          (any plugin backend: its GPU, then its CPU; never ONNX)
A graph path may name either file: native TensorRT takes `<stem>.plan` next to `<stem>.onnx`,
ONNX Runtime takes `<stem>.onnx` next to `<stem>.plan`, so one graphs dict serves every step.

Backends are a registry: onnxruntime and tensorrt are built in; any other is found by name in the
`trimvlm.runtimes` entry-point group and imported only when asked for. The torch backend (parity
checks) is one, declared in pyproject.toml and living in compression/ with torch:

    [project.entry-points."trimvlm.runtimes"]
    torch = "compression.torch_runtime:TorchRuntime"

An entry point names a Runtime subclass, constructed as `cls(options, model_dir=model_dir)`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

from service.runtime.base import Runtime, RuntimeOptions, RuntimeUnavailable, TensorSpec, prepare_feeds
from service.runtime.onnxruntime_backend import OnnxRuntime
from service.runtime.tensorrt_backend import TensorRTRuntime

__all__ = [
    "BUILTIN",
    "OnnxRuntime",
    "Runtime",
    "RuntimeOptions",
    "RuntimeUnavailable",
    "TensorRTRuntime",
    "TensorSpec",
    "backend_class",
    "backend_names",
    "create_runtime",
    "load_runtime",
    "prepare_feeds",
]

log = logging.getLogger("trimvlm.runtime")

BUILTIN: dict[str, type[Runtime]] = {"onnxruntime": OnnxRuntime, "tensorrt": TensorRTRuntime}
ENTRY_POINTS = "trimvlm.runtimes"
EXTRAS = {"torch": "train"}  # the extra that brings a plugin backend's libraries, for the error message
_ENGINE_SUFFIXES = (".plan", ".engine")


def backend_names() -> list[str]:
    """Every backend name create_runtime accepts here: built in, installed plugins, auto."""
    plugins = sorted({ep.name for ep in entry_points(group=ENTRY_POINTS)} - set(BUILTIN))
    return [*BUILTIN, *plugins, "auto"]


def backend_class(name: str) -> type[Runtime]:
    """The Runtime class of a backend, importing a plugin only now. RuntimeUnavailable (saying which
    extra to install) when a known plugin is missing or can't import; ValueError for unknown names."""
    if name in BUILTIN:
        return BUILTIN[name]
    found = list(entry_points(group=ENTRY_POINTS, name=name))
    hint = f"the {name} backend needs the {EXTRAS[name]} extra: pip install 'trimvlm[{EXTRAS[name]}]'" if name in EXTRAS else ""
    if not found:
        if hint:
            raise RuntimeUnavailable(f"{hint} (no {name!r} entry point in {ENTRY_POINTS!r}: is trimvlm installed?)")
        raise ValueError(f"unknown runtime backend {name!r} (one of {backend_names()})")
    try:
        return found[0].load()
    except ImportError as e:
        raise RuntimeUnavailable(f"{hint or f'the {name} backend cannot be imported'} ({e})") from e


def _chain(backend: str, options: RuntimeOptions) -> list[tuple[str, RuntimeOptions]]:
    """The backends to try, best first."""
    cpu, cuda = replace(options, device="cpu"), replace(options, device="cuda")
    if backend in ("tensorrt", "auto"):
        return [("tensorrt", cuda), ("onnxruntime", cuda), ("onnxruntime", cpu)]
    if backend == "onnxruntime":
        steps = {"tensorrt": [options, cuda, cpu], "cuda": [cuda, cpu]}.get(options.device, [options])
        return [("onnxruntime", o) for o in steps]
    backend_class(backend)  # a plugin: known and importable, or say why not
    return [(backend, options)] + ([(backend, cpu)] if options.device != "cpu" else [])


def _label(backend: str, options: RuntimeOptions) -> str:
    return "tensorrt" if backend == "tensorrt" else f"{backend}[{options.device}]"


def _make(backend: str, options: RuntimeOptions, model_dir: str | Path | None) -> Runtime:
    if backend in BUILTIN:
        return BUILTIN[backend](options)
    return backend_class(backend)(options, model_dir=model_dir)


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
    """A runtime of `backend` (onnxruntime | tensorrt | auto | a plugin: torch) that can run here, not yet
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
