"""service/runtime: ONNX Runtime against numpy, feed checks, options, fallbacks, TensorRT/torch backends.

Graphs are built here with onnx.helper (and one torch export); GPU/TensorRT tests skip with the reason.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import service.runtime as runtime_pkg
from service.runtime import (
    OnnxRuntime,
    RuntimeOptions,
    RuntimeUnavailable,
    TensorRTRuntime,
    TensorSpec,
    create_runtime,
    load_runtime,
)

W = np.arange(8, dtype=np.float32).reshape(4, 2) / 10 - 0.3
B = np.array([0.1, -0.2], dtype=np.float32)


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # readable by every ORT this project allows
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _mlp(path: Path) -> Path:
    """y = relu(x @ W + B); s = sum(ids, axis 1) as float. Batch axis dynamic."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["idsf", "axes"], ["s"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"]),
        ],
        [
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(B, "B"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    return _save(graph, path)


def _half(path: Path) -> Path:
    """A float16 graph: z = 2 * h."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["h", "two"], ["z"])],
        "half",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT16, ["batch", 4])],
        [numpy_helper.from_array(np.array(2, np.float16), "two")],
    )
    return _save(graph, path)


@pytest.fixture
def graphs(tmp_path) -> dict[str, Path]:
    return {"mlp": _mlp(tmp_path / "mlp.onnx"), "half": _half(tmp_path / "half.onnx")}


@pytest.fixture
def rt(graphs):
    runtime = OnnxRuntime(RuntimeOptions(intra_op_threads=1))
    runtime.load(graphs)
    yield runtime
    runtime.close()


def _feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 4)).astype(np.float32), "ids": rng.integers(0, 100, (batch, 3)).astype(np.int64)}


def _reference(feeds):
    return np.maximum(feeds["x"] @ W + B, 0), feeds["ids"].sum(1).astype(np.float32)


# ---------------------------------------------------------------------------------- ONNX Runtime


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_numpy(rt, batch):
    feeds = _feeds(batch)
    out = rt.run("mlp", feeds)
    y, s = _reference(feeds)
    assert set(out) == {"y", "s"}
    np.testing.assert_allclose(out["y"], y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["s"], s)


def test_specs_name_dtypes_and_dynamic_axes(rt):
    assert sorted(rt.graphs) == ["half", "mlp"]
    assert rt.inputs("mlp") == [TensorSpec("x", "float32", ("batch", 4)), TensorSpec("ids", "int64", ("batch", 3))]
    assert rt.outputs("mlp") == [TensorSpec("y", "float32", ("batch", 2)), TensorSpec("s", "float32", ("batch",))]
    assert rt.inputs("half") == [TensorSpec("h", "float16", ("batch", 4))]


def test_feeds_are_cast_to_the_graph_dtypes(rt):
    feeds = _feeds(2)
    ref = rt.run("mlp", feeds)
    cast = rt.run("mlp", {"x": feeds["x"].astype(np.float64), "ids": feeds["ids"].astype(np.int32)})
    np.testing.assert_allclose(cast["y"], ref["y"], rtol=1e-6)
    np.testing.assert_array_equal(cast["s"], ref["s"])
    # a float16 graph fed float32; non-contiguous input too
    h = np.arange(16, dtype=np.float32).reshape(4, 4)[:, ::1].T
    z = rt.run("half", {"h": h})["z"]
    assert z.dtype == np.float16
    np.testing.assert_array_equal(z, (2 * h).astype(np.float16))


def test_float_fed_to_an_integer_input_is_refused(rt):
    feeds = _feeds(2)
    with pytest.raises(TypeError, match="'ids' is float32.*int64"):
        rt.run("mlp", {"x": feeds["x"], "ids": feeds["ids"].astype(np.float32)})


def test_missing_input_is_a_clear_error_and_extra_feeds_are_ignored(rt):
    feeds = _feeds(2)
    with pytest.raises(ValueError, match=r"graph 'mlp': missing input\(s\) \['ids'\]"):
        rt.run("mlp", {"x": feeds["x"]})
    out = rt.run("mlp", feeds | {"attention_mask": np.ones((2, 3), np.int64)})  # shared feed dicts are fine
    np.testing.assert_allclose(out["y"], _reference(feeds)[0], rtol=1e-6, atol=1e-6)


def test_wrong_fixed_axis_or_rank_is_a_clear_error(rt):
    feeds = _feeds(2)
    with pytest.raises(ValueError, match=r"'x' has shape \(2, 5\), expected \('batch', 4\)"):
        rt.run("mlp", feeds | {"x": np.zeros((2, 5), np.float32)})
    with pytest.raises(ValueError, match="'x' has shape"):
        rt.run("mlp", feeds | {"x": np.zeros((2, 4, 1), np.float32)})


def test_unknown_graph_is_a_key_error_naming_the_loaded_ones(rt):
    for call in (lambda: rt.run("vision", {}), lambda: rt.inputs("vision"), lambda: rt.outputs("vision")):
        with pytest.raises(KeyError, match=r"unknown graph 'vision'; loaded graphs: \['half', 'mlp'\]"):
            call()


def test_session_options_are_applied(graphs):
    options = RuntimeOptions(intra_op_threads=1, inter_op_threads=2, memory_arena=False, graph_optimization="basic")
    with OnnxRuntime(options) as rt:
        rt.load({"mlp": graphs["mlp"]})
        so = rt.session("mlp").get_session_options()
        assert so.intra_op_num_threads == 1
        assert so.inter_op_num_threads == 2
        assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL  # inter-op threads need parallel mode
        assert so.enable_cpu_mem_arena is False
        assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        info = rt.describe()
    assert info["runtime"] == "onnxruntime" and info["device"] == "cpu"
    assert info["providers"] == {"mlp": ["CPUExecutionProvider"]}
    assert info["onnxruntime_version"] == ort.__version__
    assert (info["intra_op_threads"], info["inter_op_threads"], info["memory_arena"]) == (1, 2, False)
    assert info["io_binding"] is False  # CPU: plain run()
    assert "fallbacks" not in info


def test_unknown_option_values_are_refused(graphs):
    with pytest.raises(ValueError, match="graph_optimization 'fastest'"):
        OnnxRuntime(RuntimeOptions(graph_optimization="fastest")).load(graphs)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        OnnxRuntime(RuntimeOptions(device="tpu")).load(graphs)
    with pytest.raises(ValueError, match="unknown runtime backend 'triton'"):
        create_runtime("triton", RuntimeOptions())


def test_missing_file_is_not_a_fallback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        load_runtime("onnxruntime", {"mlp": tmp_path / "nope.onnx"}, RuntimeOptions())


def test_io_binding_path_gives_the_same_outputs(rt):
    feeds = _feeds(3)
    ref = rt.run("mlp", feeds)
    rt._io_binding = True  # the GPU path; ORT's binding API works on CPU too
    got = rt.run("mlp", {"x": feeds["x"], "ids": feeds["ids"].astype(np.int32)})
    assert set(got) == {"y", "s"}
    np.testing.assert_array_equal(got["y"], ref["y"])
    np.testing.assert_array_equal(got["s"], ref["s"])


def test_dummy_feeds_and_warmup(rt):
    feeds = rt.dummy_feeds("mlp", batch=2)
    assert feeds["x"].shape == (2, 4) and feeds["x"].dtype == np.float32
    assert feeds["ids"].shape == (2, 3) and feeds["ids"].dtype == np.int64
    assert rt.dummy_feeds("mlp", dims={"batch": 3})["x"].shape == (3, 4)
    seconds = rt.warmup(runs=2)
    assert set(seconds) == {"mlp", "half"} and all(t >= 0 for t in seconds.values())


# ---------------------------------------------------------------------------------- GPU providers and fallbacks


@pytest.mark.parametrize(("device", "provider"), [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_gpu_provider_missing_raises_unavailable(graphs, device, provider):
    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is installed here; this checks the machines without it")
    with pytest.raises(RuntimeUnavailable, match=f"{provider} is not available"):
        OnnxRuntime(RuntimeOptions(device=device)).load(graphs)
    with pytest.raises(RuntimeUnavailable):
        load_runtime("onnxruntime", graphs, RuntimeOptions(device=device), fallback=False)


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_create_runtime_falls_back_to_cpu_with_a_warning(graphs, device, caplog):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider installed here: no fallback to observe")
    with caplog.at_level(logging.WARNING, logger="trimvlm.runtime"):
        rt = load_runtime("onnxruntime", graphs, RuntimeOptions(device=device, intra_op_threads=1))
    assert isinstance(rt, OnnxRuntime) and rt.options.device == "cpu"
    assert rt.describe()["providers"]["mlp"] == ["CPUExecutionProvider"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "trimvlm.runtime" and r.levelno == logging.WARNING]
    assert warnings and all("runtime onnxruntime asked for" in w for w in warnings)
    assert "using onnxruntime[cpu] instead" in warnings[-1]
    assert len(rt.describe()["fallbacks"]) == len(warnings)
    feeds = _feeds(2)
    np.testing.assert_allclose(rt.run("mlp", feeds)["y"], _reference(feeds)[0], rtol=1e-6, atol=1e-6)
    # create_runtime decides without loading
    assert create_runtime("onnxruntime", RuntimeOptions(device=device)).options.device == "cpu"


def _tensorrt_missing_reason() -> str | None:
    try:
        TensorRTRuntime().check_available()
    except RuntimeUnavailable as e:
        return str(e)
    return None


def test_tensorrt_runtime_reports_why_it_cannot_run(graphs):
    reason = _tensorrt_missing_reason()
    if reason is None:
        pytest.skip("TensorRT and a CUDA GPU are present: nothing to report")
    rt = TensorRTRuntime()
    with pytest.raises(RuntimeUnavailable, match="TensorRT is not installed|cuda-python is not installed|no CUDA GPU"):
        rt.load({"mlp": graphs["mlp"].with_suffix(".plan")})
    assert rt.graphs == []
    rt.close()  # safe before anything loaded


def test_tensorrt_request_falls_back_to_onnxruntime(tmp_path, caplog):
    if _tensorrt_missing_reason() is None or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("GPU runtimes present: no fallback to observe")
    _mlp(tmp_path / "mlp.onnx")
    plan = tmp_path / "mlp.plan"
    plan.write_bytes(b"not an engine")  # the manifest may name the engine; ORT takes the .onnx beside it
    with caplog.at_level(logging.INFO, logger="trimvlm.runtime"):
        rt = load_runtime("tensorrt", {"mlp": plan}, RuntimeOptions(intra_op_threads=1))
    assert isinstance(rt, OnnxRuntime) and rt.options.device == "cpu"
    feeds = _feeds(2)  # the garbage .plan would not load: ORT really took the .onnx
    np.testing.assert_allclose(rt.run("mlp", feeds)["y"], _reference(feeds)[0], rtol=1e-6, atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warnings[0].startswith("runtime tensorrt asked for, but tensorrt is unavailable")
        and "using onnxruntime[cuda]" in warnings[0]
    )
    assert "using onnxruntime[cpu] instead" in warnings[1]
    with pytest.raises(RuntimeUnavailable):
        load_runtime("tensorrt", {"mlp": plan}, RuntimeOptions(), fallback=False)


def test_auto_picks_the_best_available_without_warnings(graphs, caplog):
    with caplog.at_level(logging.INFO, logger="trimvlm.runtime"):
        rt = load_runtime("auto", graphs, RuntimeOptions(intra_op_threads=1), fallback=False)  # auto walks its chain anyway
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("runtime auto: using" in r.getMessage() for r in caplog.records)
    if _tensorrt_missing_reason() is not None and "CUDAExecutionProvider" not in ort.get_available_providers():
        assert isinstance(rt, OnnxRuntime) and rt.options.device == "cpu"
        assert len(rt.describe()["fallbacks"]) == 2
    rt.close()


def test_tensorrt_engine_matches_numpy(tmp_path):
    reason = _tensorrt_missing_reason()
    if reason is not None:
        pytest.skip(f"TensorRT not installed / no CUDA GPU: {reason}")
    import tensorrt as trt

    onnx_path = _mlp(tmp_path / "mlp.onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 4), (4, 4), (8, 4))
    profile.set_shape("ids", (1, 3), (4, 3), (8, 3))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    (tmp_path / "mlp.plan").write_bytes(bytes(plan))

    with load_runtime("tensorrt", {"mlp": onnx_path}, RuntimeOptions(), fallback=False) as rt:
        assert isinstance(rt, TensorRTRuntime)
        assert [s.name for s in rt.inputs("mlp")] == ["x", "ids"]
        for batch in (1, 5):
            feeds = _feeds(batch, seed=batch)
            out = rt.run("mlp", {"x": feeds["x"], "ids": feeds["ids"].astype(np.int32)})
            y, s = _reference(feeds)
            np.testing.assert_allclose(out["y"], y, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(out["s"], s, rtol=1e-6)
        rt.warmup()
        with pytest.raises(ValueError, match="outside the engine's profile"):
            rt.run("mlp", _feeds(9))
        assert rt.describe()["tensorrt_version"] == trt.__version__


# ---------------------------------------------------------------------------------- plugin backends (torch)


def test_serving_imports_no_torch():
    code = "import sys, service.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


class _EntryPoint:
    """Stands in for importlib.metadata.EntryPoint."""

    def __init__(self, name: str, load):
        self.name, self.load = name, load


def _plugins(monkeypatch, *eps: _EntryPoint) -> None:
    def entry_points(group: str, name: str | None = None):
        assert group == runtime_pkg.ENTRY_POINTS
        return [ep for ep in eps if name in (None, ep.name)]

    monkeypatch.setattr(runtime_pkg, "entry_points", entry_points)


def test_plugin_backends_are_found_by_name_and_imported_only_when_asked_for(monkeypatch, graphs):
    loaded = []

    class Echo(OnnxRuntime):
        name = "echo"

        def __init__(self, options, model_dir=None):
            super().__init__(options)
            self.model_dir = model_dir

    def load():
        loaded.append("echo")
        return Echo

    _plugins(monkeypatch, _EntryPoint("echo", load))
    assert runtime_pkg.backend_names() == ["onnxruntime", "tensorrt", "echo", "auto"]
    with load_runtime("onnxruntime", graphs, RuntimeOptions()):
        pass
    assert loaded == []  # built-in backends never import a plugin
    with load_runtime("echo", graphs, RuntimeOptions(), model_dir="m") as rt:
        assert isinstance(rt, Echo) and rt.model_dir == "m" and loaded
        feeds = _feeds(2)
        np.testing.assert_allclose(rt.run("mlp", feeds)["y"], _reference(feeds)[0], rtol=1e-6, atol=1e-6)


def test_a_missing_torch_backend_names_the_extra_to_install(monkeypatch, graphs):
    _plugins(monkeypatch)  # trimvlm not installed: no entry point at all
    with pytest.raises(RuntimeUnavailable, match=r"the torch backend needs the train extra: pip install 'trimvlm\[train\]'"):
        load_runtime("torch", graphs, RuntimeOptions())

    def load():
        raise ModuleNotFoundError("No module named 'torch'")

    _plugins(monkeypatch, _EntryPoint("torch", load))  # the serving install: compression's torch is absent
    for fallback in (True, False):  # never falls back to ONNX Runtime
        with pytest.raises(RuntimeUnavailable, match=r"needs the train extra: .*\(No module named 'torch'\)"):
            create_runtime("torch", RuntimeOptions(device="cuda"), fallback=fallback)
    with pytest.raises(ValueError, match=r"backend 'triton' \(one of \['onnxruntime', 'tensorrt', 'torch', 'auto'\]\)"):
        create_runtime("triton", RuntimeOptions())


def test_the_torch_entry_point_is_declared():
    from importlib.metadata import entry_points

    (ep,) = entry_points(group="trimvlm.runtimes", name="torch")
    assert ep.value == "compression.torch_runtime:TorchRuntime"
