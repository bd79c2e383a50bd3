"""Graph-level variants of exported ONNX graphs: offline optimisation, INT8 and FP16.

All four functions read one ONNX file and write another, using ONNX Runtime's own tools:

- `optimize_graph`: ONNX Runtime's offline graph optimisation (the session writes the graph it
  optimised), so a serving session starts faster.
- `quantize_dynamic_int8`: weights INT8 ahead of time, activations quantised per call (no
  calibration data; the usual choice for transformers on CPU).
- `quantize_static_int8`: weights and activations INT8 in QDQ format, activation ranges from a
  calibration set (CPU, or symmetric for TensorRT's explicit quantization).
  INT8 graphs for the CPU keep weights in 7 bits (`INT8_REDUCE_RANGE`), so they are as accurate on
  x86 CPUs without VNNI as on those with it.
- `to_fp16`: float16 weights and compute for GPUs, float32 graph inputs/outputs.

Each writes `dst`, checks it with `onnx.checker.check_model` (path form, so graphs with external
data work too) and returns `dst`; `size_report(src, dst)` gives the sizes before and after.
Graphs over 2 GB are not handled (nothing here is that large).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

# Ops quantised by default. Only weight matmuls (MatMul/Gemm with a constant B): they hold nearly all
# the weights and FLOPs of a transformer. Left out on purpose:
# - Gather (token/position embeddings): a lookup costs nothing to compute, and INT8 embedding rows
#   feed every later layer with their rounding error; the size saved is the only gain.
# - Conv (the ViT patch embedding): one small layer reading raw pixels, the most sensitive place
#   to quantise, for little gain.
# - activation x activation MatMuls (Q·Kᵀ, P·V): see `weights_only`.
INT8_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm")

# 7-bit INT8 weights (ORT's reduce_range, values in [-64, 64]) in every graph made for ONNX Runtime's
# CPU provider, so one file is accurate on every CPU. On x86-64 without VNNI (AVX2, AVX-512 before
# VNNI), ORT's U8S8 kernels multiply with VPMADDUBSW, which adds two uint8 x int8 products into a
# saturating int16: 255 * 127 * 2 overflows it, 255 * 64 * 2 does not. With full 8-bit weights the
# unit-test block came out 18-28 % off (relative logit error) on an AVX2-only EPYC, 0.4-1 % there
# with ORT's saturation-free int16 path (session option session.x64quantprecision, slow), which is
# what VNNI's int32 accumulation gives; ORT's quantization docs prescribe reduce_range for U8S8 on
# non-VNNI x86. The cost is one bit of weight resolution (7-bit: 1-1.3 % on the same block). U8U8
# (uint8 weights) avoids saturation too, but ORT's docs give U8S8 up to 2x the speed on AVX-512.
# Graphs for TensorRT (quantize_static_int8(target="tensorrt")) keep the full range: GPUs have no such kernel.
INT8_REDUCE_RANGE = True

# Ops kept in float32 by `to_fp16`, on top of the converter's own DEFAULT_OP_BLOCK_LIST.
# LayerNormalization: the variance (a sum of squares) overflows float16 once activations pass ~256,
# which happens after residual adds in deep stacks; TensorRT warns about exactly this and advises
# FP32 layer norms. Pow: the decomposed form of the same (x², and GELU-tanh's x³).
# Softmax stays float16: ORT and TensorRT subtract the max and accumulate in float32.
FP16_KEEP_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Pow")

OptLevel = Literal["disable", "basic", "extended", "layout", "all"]
CalibMethod = Literal["minmax", "entropy", "percentile"]


def _ort():
    import onnxruntime

    return onnxruntime


def _check(path: Path) -> Path:
    import onnx

    onnx.checker.check_model(str(path))
    return path


@contextlib.contextmanager
def _scratch():
    """A temporary directory that is also the working directory meanwhile: ORT's symbolic shape
    inference, when it cannot finish, dumps sym_shape_infer_temp.onnx and a <uuid>.data file into
    the working directory (then our pre-processing retries without it); they must not land in the
    repository. Paths handed to ORT inside are absolute (see _prepare_dst)."""
    with tempfile.TemporaryDirectory(prefix="trimvlm-quant-") as tmp, contextlib.chdir(tmp):
        yield Path(tmp)


def _prepare_dst(src: str | Path, dst: str | Path) -> tuple[Path, Path]:
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if not src.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"dst must differ from src ({src}): the source graph is read while dst is written")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return src, dst


def file_bytes(path: str | Path) -> int:
    """Size of a graph on disk, its external-data files included."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def size_report(src: str | Path, dst: str | Path) -> dict[str, float]:
    """{"src_bytes", "dst_bytes", "ratio"} (ratio = dst / src)."""
    a, b = file_bytes(src), file_bytes(dst)
    return {"src_bytes": a, "dst_bytes": b, "ratio": round(b / a, 4)}


# ------------------------------------------------------------------------------------------------
# Offline graph optimisation
# ------------------------------------------------------------------------------------------------


def optimize_graph(
    src: str | Path,
    dst: str | Path,
    level: OptLevel = "extended",
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Path:
    """Run ONNX Runtime's graph optimisations once, offline, and save the optimised graph.

    The level defaults to "extended", not "all". ORT's docs: a graph optimised offline is only valid
    for the execution providers and hardware it was optimised with. "basic" (constant folding,
    redundant-node removal) stays plain ONNX and runs anywhere. "extended" adds fusions into
    com.microsoft contrib ops (Gelu, SkipLayerNormalization, FusedMatMul, ...): ORT-only and
    provider-specific (these come from the CPU provider), but the same on every x86/ARM CPU.
    "layout"/"all" add layout transforms (NCHWc blocked convolutions) whose block size follows this
    machine's SIMD width (AVX2 vs AVX-512), so the file is only safe on the CPU type it was made on;
    use them only when optimising on the serving host itself. ORT still applies its online
    optimisations on load, so nothing is lost by saving at "extended".

    For GPUs (CUDA/TensorRT providers, native TensorRT) ship the exported graph, not this one.
    """
    ort = _ort()
    src, dst = _prepare_dst(src, dst)
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):  # ORT >= 1.20
        levels["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
    if level not in levels:
        raise ValueError(f"unknown optimisation level {level!r} ({' | '.join(levels)})")
    if level in ("layout", "all"):
        log.warning("optimisation level %r writes a graph that is only valid on this CPU type (layout transforms)", level)
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=list(providers))
    return _check(dst)


# ------------------------------------------------------------------------------------------------
# INT8
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """ORT's calibrators and fp16 tools print progress to stdout; keep it for the debug log."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        yield
    if out.getvalue().strip():
        log.debug("onnxruntime: %s", out.getvalue().strip())


def _preprocess(src: Path, work: Path) -> Path:
    """ORT's recommended quantisation pre-processing: symbolic shape inference, ORT "basic"
    optimisation (plain ONNX, portable), ONNX shape inference. Returns the pre-processed path."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "preprocessed.onnx"
    try:
        quant_pre_process(str(src), str(out))
    except Exception as err:  # symbolic shape inference does not know every op (e.g. NonZero chains)
        log.info("symbolic shape inference failed (%s); pre-processing without it", err)
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    return out


def _weightless_nodes(path: Path, op_types: Iterable[str]) -> list[str]:
    """Names of MatMul/Gemm nodes whose B input is not a weight (an initializer): the attention
    products Q·Kᵀ and P·V. Quantising those puts softmax probabilities on an 8-bit grid, which costs
    accuracy for little speed."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    kinds = set(op_types) & {"MatMul", "Gemm"}
    return [n.name for n in model.graph.node if n.op_type in kinds and n.input[1] not in weights | constants and n.name]


def quantize_dynamic_int8(
    src: str | Path,
    dst: str | Path,
    op_types: Sequence[str] = INT8_OP_TYPES,
    per_channel: bool = False,
    reduce_range: bool | None = None,
    weights_only: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    preprocess: bool = True,
) -> Path:
    """Dynamic INT8 (QInt8 weights, uint8 activations quantised per call) with ORT's quantize_dynamic.

    op_types: which ops to quantise (default MatMul, Gemm; add "Gather" to also shrink embeddings,
    at some accuracy cost). per_channel: one scale per output column of each weight. On the
    student VQA graph it halved the logit error (9 % -> 4 % relative) but doubled batch-1 latency
    on ORT CPU (2.7 -> 5.5 ms; equal at batch 16), so it is off by default. reduce_range: 7-bit
    weights; None (default) takes INT8_REDUCE_RANGE (on: without it ORT's U8S8 kernels saturate on
    x86 CPUs without VNNI). False gives full 8-bit weights, accurate only on VNNI / ARM machines.
    weights_only: quantise only MatMuls against constant weights (ORT's own default
    for dynamic mode).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = _prepare_dst(src, dst)
    if reduce_range is None:
        reduce_range = INT8_REDUCE_RANGE
    with _scratch() as tmp:
        model = _preprocess(src, tmp) if preprocess else src
        exclude = list(nodes_to_exclude) + (_weightless_nodes(model, op_types) if weights_only else [])
        quantize_dynamic(
            model,
            dst,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            extra_options={"MatMulConstBOnly": weights_only},
        )
    log.info("dynamic INT8 %s -> %s (reduce_range=%s): %s", src.name, dst.name, reduce_range, size_report(src, dst))
    return _check(dst)


def _calibration_reader(feeds: Iterable[dict[str, np.ndarray]], input_names: set[str]):
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        """Hands ORT's calibrator one feed dict at a time (checked against the graph's inputs)."""

        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._it, None)
            if feed is None:
                return None
            unknown = set(feed) - input_names
            missing = input_names - set(feed)
            if unknown or missing:
                raise ValueError(
                    f"calibration feed {self.count} does not match the graph inputs "
                    f"(unknown: {sorted(unknown)}, missing: {sorted(missing)})"
                )
            self.count += 1
            return {k: np.asarray(v) for k, v in feed.items()}

    return FeedReader()


def _entropy_ranges(model: Path, work: Path, op_types: Sequence[str], reader) -> dict[str, object]:
    """Entropy calibration with TensorRT's histogram (2048 bins searched down to 128 levels).

    quantize_static builds its entropy calibrator with 128 bins for 128 quantized levels, which leaves
    one candidate threshold, the full range: "entropy" would come out identical to minmax. So run
    ORT's calibrator here with enough bins and hand quantize_static the ranges through its
    calibration cache (recent ORT releases); on older ones, fall back to quantize_static's own calibrator.
    """
    import inspect

    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        log.warning("this onnxruntime has no calibration cache; its entropy calibration is close to minmax")
        return {}
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrator = create_calibrator(
        model,
        list(op_types),
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": 2048, "num_quantized_bins": 128},
    )
    with _quiet():
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    path = work / "calibration.json"
    save_tensors_data(ranges, path)
    return {"calibration_cache_path": path}


def quantize_static_int8(
    src: str | Path,
    dst: str | Path,
    calibration: Iterable[dict[str, np.ndarray]],
    method: CalibMethod = "minmax",
    per_channel: bool = True,
    target: Literal["cpu", "tensorrt"] = "cpu",
    op_types: Sequence[str] = INT8_OP_TYPES,
    weights_only: bool = True,
    reduce_range: bool | None = None,
    quantize_outputs: bool = False,
    nodes_to_exclude: Sequence[str] = (),
    preprocess: bool = True,
) -> Path:
    """Static INT8 in QDQ format with ORT's quantize_static; activation ranges from `calibration`
    (an iterable of feed dicts, input name -> array, as for `InferenceSession.run`).

    method: minmax (the full observed range), percentile (clips the outer 0.001 %), entropy (the
    clipping threshold that minimises KL divergence, as TensorRT's legacy calibrator). Transformers
    carry activation outliers that matter, and entropy clips them: on the student VQA graph (random
    calibration feeds) minmax and percentile stayed within ~5-8 % relative logit error, entropy ~45 %.
    target:
    - "cpu": uint8 activations, int8 weights (U8S8), ORT's advice for x86 CPUs.
    - "tensorrt": int8 activations and weights, both symmetric (TensorRT only supports zero point
      0), biases left in float (TensorRT rejects int32 DequantizeLinear). This is the graph
      TensorRT's explicit quantization (`engines.build_engine(precision="int8")`) builds from.
    per_channel: one scale per output channel of each weight (better accuracy, slightly slower on
    CPU). weights_only: leave the attention products (activation x activation MatMuls) in float.
    reduce_range: 7-bit weights; None (default) takes INT8_REDUCE_RANGE for target "cpu" (U8S8
    saturation on x86 without VNNI) and False for "tensorrt".
    quantize_outputs: also quantise the outputs of the quantised ops (off: ORT runs DQ->MatMul as
    MatMulIntegerToFloat with the bias add in float, just as fast here and more accurate, and
    TensorRT wants Q/DQ on the inputs of weighted layers only).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r} ({' | '.join(methods)})")
    if target not in ("cpu", "tensorrt"):
        raise ValueError(f"unknown target {target!r} (cpu | tensorrt)")
    src, dst = _prepare_dst(src, dst)
    feeds = iter(calibration)
    first = next(feeds, None)
    if first is None:
        raise ValueError("the calibration set is empty: static quantization needs at least one feed")
    calibration = itertools.chain([first], feeds)
    extra: dict[str, object] = {"OpTypesToExcludeOutputQuantization": list(op_types)} if not quantize_outputs else {}
    if reduce_range is None:
        reduce_range = INT8_REDUCE_RANGE if target == "cpu" else False
    if target == "tensorrt":
        activation_type = QuantType.QInt8
        extra |= {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    else:
        activation_type = QuantType.QUInt8
    with _scratch() as tmp:
        model = _preprocess(src, tmp) if preprocess else src
        graph = onnx.load(str(model), load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        input_names = {i.name for i in graph.input if i.name not in initializers}
        reader = _calibration_reader(calibration, input_names)
        exclude = list(nodes_to_exclude) + (_weightless_nodes(model, op_types) if weights_only else [])
        cache: dict[str, object] = {}
        if method == "entropy":
            cache = _entropy_ranges(model, tmp, op_types, reader)
        with _quiet():
            quantize_static(
                model,
                dst,
                None if cache else reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=activation_type,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=methods[method],
                extra_options=extra,
                **cache,
            )
    log.info(
        "static INT8 (%s, %s, reduce_range=%s) %s -> %s: %s",
        method,
        target,
        reduce_range,
        src.name,
        dst.name,
        size_report(src, dst),
    )
    return _check(dst)


def has_qdq(path: str | Path) -> bool:
    """Whether a graph is already quantised in QDQ form (explicit quantization for TensorRT)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


# ------------------------------------------------------------------------------------------------
# FP16
# ------------------------------------------------------------------------------------------------


def to_fp16(
    src: str | Path,
    dst: str | Path,
    keep_io_types: bool = True,
    keep_fp32_ops: Sequence[str] = FP16_KEEP_FP32_OPS,
) -> Path:
    """Float16 weights and compute, for GPUs, with onnxruntime.transformers' converter.

    keep_io_types: graph inputs/outputs stay float32 (Cast nodes at the edges), so callers feed
    and read float32 whatever the precision. keep_fp32_ops: op types left in float32, added to the
    converter's DEFAULT_OP_BLOCK_LIST (ops with no float16 kernels). Float16 on CPU is slow in ORT
    (many kernels cast back to float32); this graph is for CUDA / TensorRT.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    src, dst = _prepare_dst(src, dst)
    # OnnxModel.convert_float_to_float16 wraps float16.convert_float_to_float16, then removes the
    # back-to-back Casts the conversion leaves. The converter appends its graph-input Casts at the
    # end of the node list, so sort before saving (the checker demands it).
    model = OnnxModel(onnx.load(str(src)))
    # The converter needs every tensor's type. ONNX shape inference gives them for standard ops;
    # ORT's symbolic shape inference also knows its contrib ops (graphs from optimize_graph) but
    # gives up on some exported graphs (then the converter would run with no types at all).
    contrib_ops = any(n.domain not in ("", "ai.onnx") for n in model.model.graph.node)
    if not contrib_ops:
        model.disable_shape_inference()  # also for its Cast clean-up: use the converter's types
    with _scratch(), _quiet():
        model.convert_float_to_float16(
            use_symbolic_shape_infer=contrib_ops,
            keep_io_types=keep_io_types,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops)),
        )
    model.topological_sort()
    model.save_model_to_file(str(dst))
    log.info("FP16 %s -> %s: %s", src.name, dst.name, size_report(src, dst))
    return _check(dst)
