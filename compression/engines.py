"""TensorRT engines from exported ONNX graphs (`trimvlm build-engine`).

An engine (.plan) is compiled for one GPU model and one TensorRT version, so engines are cached
by both, and by what went into them:

    out_dir/<gpu-model-slug>/trt-<tensorrt-version>/<graph-stem>-<precision>-<key>.plan
    key = sha256(ONNX bytes (+ external data) + optimisation profiles + precision)[:12]

next to a `.json` with the build's inputs (profiles, precision, GPU, TensorRT version, seconds).
An engine already at its path is reused.

Precision:
- fp32: TF32 where the GPU has it (TensorRT's default).
- fp16: TensorRT 10 builds the float32 graph with the FP16 builder flag; TensorRT 11 removed the
  flag (networks are strongly typed), so there the graph is first converted by
  `quantize.to_fp16` (float16 inside, LayerNorm kept float32, float32 inputs/outputs).
- int8: explicit quantization (TensorRT's calibrators are deprecated since 10.1, removed in 11): the
  graph must carry Q/DQ nodes. Pass a QDQ graph from `quantize.quantize_static_int8(...,
  target="tensorrt")`, or pass `calibration` feeds and that is done here first. Layers left
  unquantised run in fp16 on TensorRT 10.

The GPU is found without torch (`nvidia-smi`, else cuda-python), only when a build is asked for.
Without TensorRT or without a GPU, `build_engine` raises `EngineBuildUnavailable` saying which.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
Shape = tuple[int, ...]
# One optimisation profile: input name -> (min, opt, max) shape.
Profile = dict[str, tuple[Shape, Shape, Shape]]

INSTALL_HINT = (
    "install TensorRT's Python package (`pip install tensorrt`, or `pip install 'trimvlm[gpu]'`) on a machine "
    "with an NVIDIA GPU and its driver; `nvidia-smi` should list the GPU"
)


class EngineBuildUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing on this machine, so no engine can be built here."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine (its messages are in the text)."""


# ------------------------------------------------------------------------------------------------
# What machine is this: TensorRT version, GPU model
# ------------------------------------------------------------------------------------------------


def _import_tensorrt():
    import tensorrt

    return tensorrt


def tensorrt_version() -> str | None:
    """TensorRT's version, or None when the Python package is not importable."""
    try:
        return str(_import_tensorrt().__version__)
    except ImportError:
        return None


def _visible_device(device: int) -> str | None:
    """The nvidia-smi id of CUDA device `device`, honouring CUDA_VISIBLE_DEVICES (None: hidden)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(device)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if device >= len(ids) or ids[device].startswith("-"):
        return None
    return ids[device]


@functools.cache
def gpu_name(device: int = 0) -> str | None:
    """The model name of CUDA device `device` ("NVIDIA H100 80GB HBM3"), or None without one.

    Asks `nvidia-smi` (comes with the driver), else cuda-python; never torch. Cached per process.
    """
    smi_id = _visible_device(device)
    if smi_id is None:
        return None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader", f"--id={smi_id}"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            if out:
                return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError) as err:
            log.debug("nvidia-smi found no GPU %s: %s", smi_id, err)
    try:  # cuda-python, if installed (`pip install cuda-python`)
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            name = props.name
            return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00").strip() or None
    except Exception as err:  # not installed, no driver, no device
        log.debug("cuda-python found no GPU %d: %s", device, err)
    return None


def gpu_slug(name: str) -> str:
    """A folder name for a GPU model: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a folder name from GPU name {name!r}")
    return slug


def require_build_environment(device: int = 0):
    """(tensorrt module, GPU name), or EngineBuildUnavailable naming what is missing and how to get it."""
    missing = []
    try:
        trt = _import_tensorrt()
    except ImportError as err:
        trt = None
        missing.append(f"the `tensorrt` Python package is not importable ({err})")
    name = gpu_name(device)
    if name is None:
        if shutil.which("nvidia-smi") is None:
            missing.append("no NVIDIA GPU driver: `nvidia-smi` is not on PATH")
        else:
            missing.append(f"no CUDA GPU {device}: `nvidia-smi` lists none (check CUDA_VISIBLE_DEVICES)")
    if missing:
        reasons = "; ".join(missing)
        raise EngineBuildUnavailable(f"cannot build a TensorRT engine here: {reasons}. To build one, {INSTALL_HINT}.")
    return trt, name


# ------------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------------


def _graph_inputs(onnx_path: str | Path) -> dict[str, list[int | str | None]]:
    """Graph inputs (initializers excluded) -> dims: int, dim_param name, or None (unnamed dynamic)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = []
        for d in value.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        inputs[value.name] = dims
    return inputs


def _as_range(value: Sequence[int], what: str) -> tuple[int, int, int]:
    if len(value) == 2:
        lo, hi = value
        return int(lo), int(hi), int(hi)
    if len(value) == 3:
        lo, opt, hi = value
        return int(lo), int(opt), int(hi)
    raise ValueError(f"{what} must be (min, max) or (min, opt, max), got {tuple(value)}")


def default_profiles(
    onnx_path: str | Path,
    max_batch: int = 8,
    text_range: Sequence[int] = (1, 16, 32),
    opt_batch: int | None = None,
    others: Mapping[str, Sequence[int]] | None = None,
) -> Profile:
    """One optimisation profile from the graph's dynamic axes, so callers don't write shapes.

    Axes named "batch" get (1, opt_batch or max_batch, max_batch): TensorRT tunes its kernels for
    the opt shape, and full batches are where the batcher needs speed. Axes named "text" get
    `text_range` ((min, max) or (min, opt, max)). Any other named axis needs its range in
    `others` (e.g. {"past_tokens": (0, 16, 40)}); an unnamed dynamic axis is an error. Static
    dims stay as they are; inputs with no dynamic dims (scalars, fixed shapes) need no profile.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    batch = (1, opt_batch or max_batch, max_batch)
    ranges = {"batch": batch, "text": _as_range(text_range, "text_range")}
    for axis, value in (others or {}).items():
        ranges[axis] = _as_range(value, f"range of axis {axis!r}")
    profile: Profile = {}
    for name, dims in _graph_inputs(onnx_path).items():
        if all(isinstance(d, int) for d in dims):
            continue
        lo, opt, hi = [], [], []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                lo.append(d), opt.append(d), hi.append(d)
                continue
            if d is None or d not in ranges:
                label = "an unnamed dynamic axis" if d is None else f"dynamic axis {d!r}"
                raise ValueError(
                    f"input {name!r} dim {i} is {label}: pass its (min, opt, max) in others=, "
                    f'e.g. others={{"{d or "axis"}": (1, 8, 16)}}'
                )
            a, b, c = ranges[d]
            lo.append(a), opt.append(b), hi.append(c)
        profile[name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


def _profile_list(profiles: Profile | Sequence[Profile]) -> list[Profile]:
    if isinstance(profiles, Mapping):
        return [dict(profiles)]
    return [dict(p) for p in profiles]


def check_profiles(onnx_path: str | Path, profiles: Profile | Sequence[Profile]) -> list[Profile]:
    """Validate profiles against the graph (names, ranks, static dims, min <= opt <= max, every
    dynamic input covered); returns them as a list of profiles with tuple shapes."""
    inputs = _graph_inputs(onnx_path)
    dynamic = {n for n, dims in inputs.items() if not all(isinstance(d, int) for d in dims)}
    out = []
    plist = _profile_list(profiles)
    if not plist:
        raise ValueError("at least one optimisation profile is needed")
    for k, profile in enumerate(plist):
        where = f"profile {k}" if len(plist) > 1 else "profile"
        unknown = set(profile) - set(inputs)
        if unknown:
            raise ValueError(f"{where} names inputs the graph does not have: {sorted(unknown)} (inputs: {sorted(inputs)})")
        uncovered = dynamic - set(profile)
        if uncovered:
            raise ValueError(f"{where} misses dynamic inputs {sorted(uncovered)}")
        checked: Profile = {}
        for name, shapes in profile.items():
            if len(shapes) != 3:
                raise ValueError(f"{where}: {name!r} needs (min, opt, max) shapes, got {shapes!r}")
            lo, opt, hi = (tuple(int(x) for x in s) for s in shapes)
            dims = inputs[name]
            for label, shape in (("min", lo), ("opt", opt), ("max", hi)):
                if len(shape) != len(dims):
                    raise ValueError(f"{where}: {name!r} {label} shape {shape} has rank {len(shape)}, the graph's is {len(dims)}")
            for i, d in enumerate(dims):
                if not lo[i] <= opt[i] <= hi[i]:
                    raise ValueError(f"{where}: {name!r} dim {i} needs min <= opt <= max, got {lo[i]}, {opt[i]}, {hi[i]}")
                if lo[i] < 0:
                    raise ValueError(f"{where}: {name!r} dim {i} is negative")
                if isinstance(d, int) and not lo[i] == hi[i] == d:
                    raise ValueError(f"{where}: {name!r} dim {i} is fixed at {d} in the graph, the profile says {lo[i]}..{hi[i]}")
            checked[name] = (lo, opt, hi)
        out.append(checked)
    return out


# ------------------------------------------------------------------------------------------------
# Cache paths
# ------------------------------------------------------------------------------------------------


def _graph_files(onnx_path: Path) -> list[Path]:
    """The .onnx file and any external-data files it names."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if uses_external_data(tensor)
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    return [onnx_path] + [onnx_path.parent / loc for loc in locations]


def _canonical_profiles(profiles: Profile | Sequence[Profile]) -> list[dict[str, list[list[int]]]]:
    return [
        {name: [[int(x) for x in shape] for shape in shapes] for name, shapes in sorted(p.items())}
        for p in _profile_list(profiles)
    ]


def engine_key(onnx_path: str | Path, profiles: Profile | Sequence[Profile], precision: str) -> str:
    """12 hex digits of sha256 over the graph's bytes (external data included), the profiles and
    the precision: what decides the engine, besides the GPU and TensorRT version in its folder."""
    digest = hashlib.sha256()
    for path in _graph_files(Path(onnx_path)):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    spec = {"profiles": _canonical_profiles(profiles), "precision": precision}
    digest.update(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:12]


def engine_dir(out_dir: str | Path, gpu: str, trt_version: str) -> Path:
    """out_dir/<gpu-model-slug>/trt-<version>: engines there are valid for exactly that pair."""
    return Path(out_dir) / gpu_slug(gpu) / f"trt-{trt_version}"


def engine_path(
    onnx_path: str | Path,
    out_dir: str | Path,
    profiles: Profile | Sequence[Profile],
    precision: str,
    gpu: str,
    trt_version: str,
) -> Path:
    """Where the engine for this graph, profiles and precision lives on this GPU / TensorRT."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({' | '.join(PRECISIONS)})")
    key = engine_key(onnx_path, profiles, precision)
    return engine_dir(out_dir, gpu, trt_version) / f"{Path(onnx_path).stem}-{precision}-{key}.plan"


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_LOGGER = None


def _logger(trt):
    """The process's TensorRT logger: forwards to `logging` and keeps the errors of the current
    build for the exception text. One per process, because TensorRT keeps using the first logger
    it was given for every later builder."""
    global _LOGGER
    if _LOGGER is None:

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(str(msg))
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    log.warning("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.INFO:
                    log.debug("TensorRT: %s", msg)

        _LOGGER = Logger()
    _LOGGER.errors = []
    return _LOGGER


def _weakly_typed(trt) -> bool:
    """TensorRT 10 picks layer precisions from builder flags; 11 removed them (strong typing)."""
    return hasattr(trt.BuilderFlag, "FP16")


def _prepare_graph(
    trt, onnx_path: Path, precision: str, calibration: Iterable[dict[str, np.ndarray]] | None, work: Path
) -> tuple[Path, str]:
    """The graph TensorRT parses, and how its precision was arranged."""
    from compression.quantize import has_qdq, quantize_static_int8, to_fp16

    if precision == "int8":
        if has_qdq(onnx_path):
            return onnx_path, "qdq graph"
        if calibration is None:
            raise ValueError(
                f"int8 engines use explicit quantization: {onnx_path.name} has no Q/DQ nodes. Pass calibration feeds, or a "
                "graph from compression.quantize.quantize_static_int8(..., target='tensorrt')"
            )
        qdq = quantize_static_int8(onnx_path, work / f"{onnx_path.stem}-qdq.onnx", calibration, target="tensorrt")
        return qdq, "calibrated here"
    if precision == "fp16" and not _weakly_typed(trt):
        return to_fp16(onnx_path, work / f"{onnx_path.stem}-fp16.onnx"), "to_fp16 graph (strongly typed)"
    return onnx_path, "builder flags" if precision == "fp16" else "fp32"


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    profiles: Profile | Sequence[Profile] | None = None,
    precision: Precision = "fp16",
    timing_cache: str | Path | None = None,
    workspace_gb: float = 4.0,
    calibration: Iterable[dict[str, np.ndarray]] | None = None,
    device: int = 0,
    force: bool = False,
) -> Path:
    """Compile `onnx_path` into a TensorRT engine under `out_dir` (see the module doc for the
    layout) and return the .plan path; an engine already there for the same graph, profiles,
    precision, GPU model and TensorRT version is returned as is (unless `force`).

    profiles: input name -> (min, opt, max) shape, or a list of such dicts for several
    optimisation profiles; None derives one from the graph's "batch"/"text" axes
    (`default_profiles`). timing_cache: a file TensorRT's kernel timings are read from and saved
    to, so rebuilds (other precisions, profiles, graphs) skip most autotuning; None: no file.
    workspace_gb: the builder's scratch memory limit. calibration: feeds for int8 when the graph
    has no Q/DQ nodes (not part of the cache key: pass force=True after changing them).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {onnx_path}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({' | '.join(PRECISIONS)})")
    plist = check_profiles(onnx_path, default_profiles(onnx_path) if profiles is None else profiles)
    trt, gpu = require_build_environment(device)
    path = engine_path(onnx_path, out_dir, plist, precision, gpu, trt.__version__)
    if path.is_file() and not force:
        log.info("TensorRT engine cached: %s", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trimvlm-engine-") as tmp:
        graph, how = _prepare_graph(trt, onnx_path, precision, calibration, Path(tmp))
        logger = _logger(trt)
        builder = trt.Builder(logger)
        flags = 0  # explicit batch is the only mode in TensorRT 10 (the flag is deprecated, ignored)
        if not _weakly_typed(trt) and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(graph)):  # by path: external data resolves next to it
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(
                f"TensorRT could not parse {onnx_path.name} ({len(errors)} error(s)):\n" + "\n".join(f"  - {e}" for e in errors)
            )

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        for profile in plist:
            opt_profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile.items():
                opt_profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(opt_profile)
        if _weakly_typed(trt) and precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if _weakly_typed(trt) and precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)

        cache_file = Path(timing_cache) if timing_cache is not None else None
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not match this GPU / TensorRT; starting a new one", cache_file)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            detail = "\n".join(f"  - {e}" for e in logger.errors) or "  (no error message from TensorRT)"
            raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name}:\n{detail}")
        _write_atomic(path, bytes(serialized))
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    seconds = round(time.perf_counter() - start, 1)
    meta = {
        "onnx": str(onnx_path),
        "key": path.stem.rsplit("-", 1)[-1],
        "precision": precision,
        "precision_from": how,
        "profiles": _canonical_profiles(plist),
        "gpu": gpu,
        "tensorrt": str(trt.__version__),
        "workspace_gb": workspace_gb,
        "build_seconds": seconds,
    }
    _write_atomic(path.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
    log.info("TensorRT engine built in %.1f s: %s", seconds, path)
    return path


# ------------------------------------------------------------------------------------------------
# Every graph of an exported model
# ------------------------------------------------------------------------------------------------


def model_axis_ranges(manifest) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for the named axes of the exported graphs besides "batch" and "text", from
    the manifest's preprocessing: image tokens up to the vision graph's count (trimmed graphs keep
    fewer), decoder token axes up to a prompt plus a full caption."""
    p = manifest.preprocessing
    tokens = p.max_caption_length + p.max_text_length  # a prompt of up to a question's length, then the caption
    ranges = {
        "new_tokens": (1, 8, tokens),
        "past_tokens": (0, tokens // 2, tokens),
        "total_tokens": (1, tokens // 2, tokens),
    }
    for graph in manifest.graphs.values():
        for tensor in graph.outputs:
            if tensor.name == "image_states" and len(tensor.shape) > 1 and isinstance(tensor.shape[1], int):
                n = tensor.shape[1]
                ranges["image_tokens"] = (1, n, n)
    return ranges


def build_model_engines(
    model_dir: str | Path,
    cache_dir: str | Path,
    precision: Precision = "fp16",
    max_batch: int = 32,
    others: Mapping[str, Sequence[int]] | None = None,
    workspace_gb: float = 4.0,
    force: bool = False,
    device: int = 0,
) -> dict[str, Path]:
    """Engines for every graph of an exported model (`trimvlm build-engine`): graph name -> .plan.

    Each engine is built (or reused) in the cache under `cache_dir` (one timing cache per GPU and
    TensorRT version, shared by all graphs), then copied next to the graph file the service loads
    for `precision` (`<file>.plan` beside `<file>.onnx`: service/runtime swaps it in for native
    TensorRT). Profiles: batch 1..max_batch, text 1..max_text_length, the decoder and image-token
    axes from `model_axis_ranges`, overridable by `others`. fp16 engines are built from the fp32
    graph; int8 needs a QDQ graph in the manifest (the exporter's int8 graph is ORT dynamic INT8,
    which TensorRT cannot parse).
    """
    from compression.quantize import has_qdq
    from service.repository import load_manifest

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({' | '.join(PRECISIONS)})")
    text = manifest.preprocessing.max_text_length
    ranges = model_axis_ranges(manifest) | dict(others or {})
    plans: dict[str, tuple[Path, Path, Profile]] = {}
    for name, graph in manifest.graphs.items():  # check everything before the first (slow) build
        if precision not in graph.files:
            raise ValueError(f"graph {name!r} has no {precision} file (has {sorted(graph.files)}): export it with that precision")
        target = (model_dir / graph.files[precision]).with_suffix(".plan")
        source = model_dir / graph.files["fp32" if precision == "fp16" and "fp32" in graph.files else precision]
        if precision == "int8" and not has_qdq(source):
            raise ValueError(
                f"graph {name!r}: {source.name} is not a QDQ graph; TensorRT int8 needs one from "
                "compression.quantize.quantize_static_int8(..., target='tensorrt') (or build_engine(..., calibration=...))"
            )
        axes = ranges
        if name == "decoder_step" and "new_tokens" not in (others or {}):  # one token per step
            axes = ranges | {"new_tokens": (1, 1, ranges["new_tokens"][2])}
        profile = default_profiles(source, max_batch, (1, min(16, text), text), others=axes)
        plans[name] = (source, target, profile)
    trt, gpu = require_build_environment(device)
    timing = engine_dir(cache_dir, gpu, trt.__version__) / "timing.cache"
    built = {}
    for name, (source, target, profile) in plans.items():
        log.info("building the %s engine for %s (%s)", precision, name, source.name)
        engine = build_engine(source, cache_dir, profile, precision, timing, workspace_gb, device=device, force=force)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(engine, tmp)
        os.replace(tmp, target)
        built[name] = target
    return built
