"""TensorRT engines (compression/engines.py).

What runs anywhere: cache paths and keys, profiles from a graph's dynamic axes, the error without
TensorRT or a GPU, and the build flow against a small stand-in for the `tensorrt` module (it records
what the builder was asked for). The real build test skips, saying why, without TensorRT and a GPU.
"""

import json
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression import engines
from compression.engines import EngineBuildError, EngineBuildUnavailable

GPU = "NVIDIA H100 80GB HBM3"


def make_graph(path, hidden=8, seed=0):
    """input_ids [batch, text] int64, features [batch, text, hidden] float, past [batch, 2, past_tokens, 4],
    threshold [] -> logits = features @ W, plus pass-throughs."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((hidden, 4)).astype(np.float32), "W")
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "text"]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "text", hidden]),
        helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, "past_tokens", 4]),
        helper.make_tensor_value_info("threshold", TensorProto.FLOAT, []),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "text", 4]),
        helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", "text"]),
        helper.make_tensor_value_info("past_out", TensorProto.FLOAT, ["batch", 2, "past_tokens", 4]),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["mm"], name="mm"),
        helper.make_node("Mul", ["mm", "threshold"], ["logits"], name="scale"),
        helper.make_node("Identity", ["input_ids"], ["ids_out"], name="ids"),
        helper.make_node("Identity", ["past"], ["past_out"], name="past"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs, [w]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def graph(tmp_path):
    return make_graph(tmp_path / "tiny.onnx")


OTHERS = {"past_tokens": (0, 8, 16)}


# ------------------------------------------------------------------------------------------------
# Slugs, keys, paths
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA A10G", "nvidia-a10g"),
        ("Tesla T4", "tesla-t4"),
        ("NVIDIA GeForce RTX 4090 (laptop)", "nvidia-geforce-rtx-4090-laptop"),
    ],
)
def test_gpu_slug(name, slug):
    assert engines.gpu_slug(name) == slug


def test_gpu_slug_rejects_empty():
    with pytest.raises(ValueError):
        engines.gpu_slug(" / ")


def test_engine_path_layout(graph, tmp_path):
    profile = engines.default_profiles(graph, 4, (1, 8), others=OTHERS)
    path = engines.engine_path(graph, tmp_path / "engines", profile, "fp16", GPU, "10.13.0.35")
    key = engines.engine_key(graph, profile, "fp16")
    assert len(key) == 12 and int(key, 16) >= 0
    assert path == tmp_path / "engines" / "nvidia-h100-80gb-hbm3" / "trt-10.13.0.35" / f"tiny-fp16-{key}.plan"
    with pytest.raises(ValueError, match="unknown precision"):
        engines.engine_path(graph, tmp_path, profile, "int4", GPU, "10.0")


def test_engine_key_follows_graph_profiles_and_precision(graph, tmp_path):
    profile = engines.default_profiles(graph, 4, (1, 8), others=OTHERS)
    key = engines.engine_key(graph, profile, "fp16")
    assert engines.engine_key(graph, dict(reversed(list(profile.items()))), "fp16") == key  # order-free
    assert engines.engine_key(graph, [profile], "fp16") == key  # one profile, either form
    assert engines.engine_key(graph, profile, "fp32") != key
    assert engines.engine_key(graph, profile, "int8") != key
    wider = engines.default_profiles(graph, 8, (1, 8), others=OTHERS)
    assert engines.engine_key(graph, wider, "fp16") != key
    assert engines.engine_key(graph, [profile, wider], "fp16") != key
    other = make_graph(tmp_path / "tiny2.onnx", seed=1)  # same name and shapes, other weights
    assert engines.engine_key(other, profile, "fp16") != key


def test_engine_key_covers_external_data(tmp_path):
    path = make_graph(tmp_path / "ext.onnx")
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    profile = engines.default_profiles(path, 2, (1, 4), others=OTHERS)
    key = engines.engine_key(path, profile, "fp32")
    data = tmp_path / "ext.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert engines.engine_key(path, profile, "fp32") != key


# ------------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------------


def test_default_profiles_from_dynamic_axes(graph):
    profile = engines.default_profiles(graph, max_batch=8, text_range=(1, 16, 32), others=OTHERS)
    assert profile == {
        "input_ids": ((1, 1), (8, 16), (8, 32)),
        "features": ((1, 1, 8), (8, 16, 8), (8, 32, 8)),
        "past": ((1, 2, 0, 4), (8, 2, 8, 4), (8, 2, 16, 4)),
    }  # the scalar threshold is static: no profile entry
    two = engines.default_profiles(graph, max_batch=4, text_range=(2, 10), opt_batch=2, others={"past_tokens": (0, 5)})
    assert two["input_ids"] == ((1, 2), (2, 10), (4, 10))
    assert two["past"] == ((1, 2, 0, 4), (2, 2, 5, 4), (4, 2, 5, 4))
    assert engines.check_profiles(graph, profile) == [profile]


def test_default_profiles_asks_for_unknown_axes(graph):
    with pytest.raises(ValueError, match="'past_tokens'.*others="):
        engines.default_profiles(graph, 4, (1, 8))
    with pytest.raises(ValueError, match="text_range"):
        engines.default_profiles(graph, 4, (1,), others=OTHERS)


def test_check_profiles_catches_mistakes(graph):
    good = engines.default_profiles(graph, 4, (1, 8), others=OTHERS)
    with pytest.raises(ValueError, match="does not have: \\['pixels'\\]"):
        engines.check_profiles(graph, good | {"pixels": ((1,), (1,), (1,))})
    with pytest.raises(ValueError, match="misses dynamic inputs \\['past'\\]"):
        engines.check_profiles(graph, {k: v for k, v in good.items() if k != "past"})
    with pytest.raises(ValueError, match="rank"):
        engines.check_profiles(graph, good | {"input_ids": ((1,), (2,), (4,))})
    with pytest.raises(ValueError, match="fixed at 8"):
        engines.check_profiles(graph, good | {"features": ((1, 1, 8), (2, 2, 8), (4, 8, 16))})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        engines.check_profiles(graph, good | {"input_ids": ((1, 1), (8, 4), (4, 8))})
    with pytest.raises(ValueError, match="at least one"):
        engines.check_profiles(graph, [])


# ------------------------------------------------------------------------------------------------
# Without TensorRT / GPU
# ------------------------------------------------------------------------------------------------


def _no_tensorrt():
    raise ImportError("No module named 'tensorrt'")


def test_clear_error_without_tensorrt_and_gpu(graph, tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "_import_tensorrt", _no_tensorrt)
    monkeypatch.setattr(engines, "gpu_name", lambda device=0: None)
    monkeypatch.setattr(engines.shutil, "which", lambda name: None)
    with pytest.raises(EngineBuildUnavailable) as err:
        engines.build_engine(graph, tmp_path, engines.default_profiles(graph, 2, (1, 4), others=OTHERS))
    message = str(err.value)
    assert "the `tensorrt` Python package is not importable" in message
    assert "`nvidia-smi` is not on PATH" in message
    assert "pip install tensorrt" in message and "NVIDIA GPU and its driver" in message
    assert isinstance(err.value, RuntimeError)
    assert not list(tmp_path.rglob("*.plan"))


def test_clear_error_with_tensorrt_but_no_gpu(monkeypatch):
    monkeypatch.setattr(engines, "_import_tensorrt", lambda: FakeTRT())
    monkeypatch.setattr(engines, "gpu_name", lambda device=0: None)
    monkeypatch.setattr(engines.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    with pytest.raises(EngineBuildUnavailable) as err:
        engines.require_build_environment(1)
    message = str(err.value)
    assert "no CUDA GPU 1" in message and "CUDA_VISIBLE_DEVICES" in message
    assert "not importable" not in message


def test_this_machine_says_what_is_missing():
    try:
        engines.require_build_environment()
    except EngineBuildUnavailable as err:
        assert "cannot build a TensorRT engine here" in str(err) and "nvidia-smi" in str(err)
    else:
        pytest.skip("this machine has TensorRT and a GPU")


def test_visible_device_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert engines._visible_device(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-abc")
    assert engines._visible_device(0) == "3" and engines._visible_device(1) == "GPU-abc"
    assert engines._visible_device(2) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert engines._visible_device(0) is None


# ------------------------------------------------------------------------------------------------
# The build flow against a stand-in `tensorrt`
# ------------------------------------------------------------------------------------------------


class FakeTRT(types.SimpleNamespace):
    """Just enough of the TensorRT 10 Python API for build_engine; records every call."""

    def __init__(self, strongly_typed_only=False, parse_errors=(), build_fails=False):
        calls = {"build": 0, "parsed": [], "flags": [], "profiles": [], "network_flags": [], "timing_in": []}

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            def __init__(self):
                pass

        ILogger.Severity = Severity

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.cache = [], [], None

            def set_memory_pool_limit(self, pool, size):
                self.workspace = size

            def add_optimization_profile(self, profile):
                self.profiles.append(profile.shapes)

            def set_flag(self, flag):
                self.flags.append(flag)

            def create_timing_cache(self, data):
                calls["timing_in"].append(bytes(data))
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                calls["network_flags"].append(flags)
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls["build"] += 1
                calls["flags"].append(sorted(config.flags))
                calls["profiles"].append(config.profiles)
                if build_fails:
                    self.logger.log(Severity.ERROR, "out of workspace for tactic 42")
                    return None
                return json.dumps({"flags": sorted(config.flags)}).encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0

            def parse_from_file(self, path):
                calls["parsed"].append(path)
                self.num_errors = len(parse_errors)
                return not parse_errors

            def get_error(self, i):
                return parse_errors[i]

        builder_flags = types.SimpleNamespace() if strongly_typed_only else types.SimpleNamespace(FP16="FP16", INT8="INT8")
        super().__init__(
            __version__="10.99.1",
            ILogger=ILogger,
            Builder=Builder,
            OnnxParser=OnnxParser,
            BuilderFlag=builder_flags,
            NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=5),
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
            calls=calls,
        )


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kw):
        trt = FakeTRT(**kw)
        monkeypatch.setattr(engines, "_import_tensorrt", lambda: trt)
        monkeypatch.setattr(engines, "gpu_name", lambda device=0: GPU)
        monkeypatch.setattr(engines, "_LOGGER", None)  # the process logger is made from this module
        return trt

    return install


def test_build_writes_engine_metadata_and_timing_cache_then_reuses(graph, tmp_path, fake_trt):
    trt = fake_trt()
    profile = engines.default_profiles(graph, 4, (1, 8), others=OTHERS)
    cache = tmp_path / "timing.cache"
    path = engines.build_engine(graph, tmp_path / "engines", profile, "fp16", timing_cache=cache)
    assert path == engines.engine_path(graph, tmp_path / "engines", profile, "fp16", GPU, "10.99.1")
    assert path.parent == tmp_path / "engines" / "nvidia-h100-80gb-hbm3" / "trt-10.99.1"
    assert json.loads(path.read_bytes()) == {"flags": ["FP16"]}
    assert trt.calls["profiles"] == [[profile]]
    assert trt.calls["network_flags"] == [0]  # TensorRT 10: weakly typed, explicit batch
    assert trt.calls["parsed"] == [str(graph)]
    assert cache.read_bytes() == b"+timings"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["gpu"] == GPU and meta["tensorrt"] == "10.99.1" and meta["precision"] == "fp16"
    assert meta["key"] == engines.engine_key(graph, profile, "fp16")
    assert meta["profiles"][0]["past"] == [[1, 2, 0, 4], [4, 2, 8, 4], [4, 2, 16, 4]]

    assert engines.build_engine(graph, tmp_path / "engines", profile, "fp16", timing_cache=cache) == path
    assert trt.calls["build"] == 1  # reused
    engines.build_engine(graph, tmp_path / "engines", profile, "fp16", timing_cache=cache, force=True)
    assert trt.calls["build"] == 2
    assert trt.calls["timing_in"][-1] == b"+timings"  # the saved cache is read back

    fp32 = engines.build_engine(graph, tmp_path / "engines", profile, "fp32")
    assert fp32 != path and json.loads(fp32.read_bytes()) == {"flags": []}


def test_build_reports_every_parser_error(graph, tmp_path, fake_trt):
    fake_trt(parse_errors=("node 3 (NonZero): unsupported", "input 'x': bad type"))
    with pytest.raises(EngineBuildError) as err:
        engines.build_engine(graph, tmp_path, engines.default_profiles(graph, 2, (1, 4), others=OTHERS), "fp32")
    assert "2 error(s)" in str(err.value)
    assert "NonZero): unsupported" in str(err.value) and "input 'x': bad type" in str(err.value)
    assert not list(tmp_path.rglob("*.plan"))


def test_build_failure_carries_tensorrt_errors(graph, tmp_path, fake_trt):
    fake_trt(build_fails=True)
    with pytest.raises(EngineBuildError, match="out of workspace for tactic 42"):
        engines.build_engine(graph, tmp_path, engines.default_profiles(graph, 2, (1, 4), others=OTHERS), "fp32")


def test_int8_needs_qdq_graph_or_calibration(graph, tmp_path, fake_trt):
    trt = fake_trt()
    profile = engines.default_profiles(graph, 2, (1, 4), others=OTHERS)
    with pytest.raises(ValueError, match="no Q/DQ nodes"):
        engines.build_engine(graph, tmp_path, profile, "int8")

    rng = np.random.default_rng(0)
    feeds = [
        {
            "input_ids": rng.integers(0, 9, (2, 3)).astype(np.int64),
            "features": rng.standard_normal((2, 3, 8)).astype(np.float32),
            "past": rng.standard_normal((2, 2, 1, 4)).astype(np.float32),
            "threshold": np.array(0.5, np.float32),
        }
        for _ in range(3)
    ]
    path = engines.build_engine(graph, tmp_path, profile, "int8", calibration=feeds)
    assert json.loads(path.read_bytes()) == {"flags": ["FP16", "INT8"]}
    assert trt.calls["parsed"][-1].endswith("tiny-qdq.onnx")  # the calibrated QDQ graph was parsed
    assert json.loads(path.with_suffix(".json").read_text())["precision_from"] == "calibrated here"


def test_strongly_typed_tensorrt_gets_an_fp16_graph(graph, tmp_path, fake_trt):
    trt = fake_trt(strongly_typed_only=True)  # TensorRT 11: no FP16/INT8 builder flags
    path = engines.build_engine(graph, tmp_path, engines.default_profiles(graph, 2, (1, 4), others=OTHERS), "fp16")
    assert json.loads(path.read_bytes()) == {"flags": []}
    assert trt.calls["network_flags"] == [1 << 5]
    assert trt.calls["parsed"][-1].endswith("tiny-fp16.onnx")


def test_build_validates_before_touching_tensorrt(graph, tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "_import_tensorrt", _no_tensorrt)
    with pytest.raises(ValueError, match="unknown precision"):
        engines.build_engine(graph, tmp_path, None, "fp8")
    with pytest.raises(ValueError, match="past_tokens"):  # default profiles need the extra axis
        engines.build_engine(graph, tmp_path)
    with pytest.raises(FileNotFoundError):
        engines.build_engine(tmp_path / "missing.onnx", tmp_path)


def make_model_dir(folder):
    """An exported-model folder: one graph in fp32, fp16 and (dynamic) int8, and a manifest."""
    from compression.quantize import quantize_dynamic_int8, to_fp16
    from service.repository import GraphInfo, Manifest, TensorInfo, write_manifest

    folder.mkdir()
    fp32 = make_graph(folder / "tiny.onnx")
    to_fp16(fp32, folder / "tiny.fp16.onnx")
    quantize_dynamic_int8(fp32, folder / "tiny.int8.onnx")  # ORT dynamic INT8: not for TensorRT
    (folder / "tokenizer.json").write_text("{}")
    (folder / "reference.npz").write_bytes(b"")
    graph = GraphInfo(
        inputs=[TensorInfo(name="input_ids", dtype="int64", shape=["batch", "text"])],
        outputs=[TensorInfo(name="image_states", dtype="float32", shape=["batch", 17, 8])],
        files={"fp32": "tiny.onnx", "fp16": "tiny.fp16.onnx", "int8": "tiny.int8.onnx"},
    )
    manifest = Manifest(
        name="tiny",
        version="1",
        tasks=["vqa"],
        graphs={"tiny": graph},
        preprocessing={"image": {"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]}, "max_text_length": 12},
        tokens={"pad": 0, "cls": 1, "sep": 2, "bos": 3},
        answers=["yes", "no"],
        itc_temperature=0.07,
    )
    write_manifest(folder, manifest)
    return folder, manifest


def test_model_axis_ranges(tmp_path):
    _, manifest = make_model_dir(tmp_path / "model")
    ranges = engines.model_axis_ranges(manifest)
    assert ranges["image_tokens"] == (1, 17, 17)
    assert ranges["past_tokens"] == (0, 22, 44)  # 32 caption + 12 prompt tokens


def test_build_model_engines_puts_plans_where_the_service_looks(tmp_path, fake_trt):
    trt = fake_trt()
    model, _ = make_model_dir(tmp_path / "model")
    built = engines.build_model_engines(model, tmp_path / "cache", "fp16", max_batch=4)
    assert built == {"tiny": model / "tiny.fp16.plan"}  # service/runtime swaps tiny.fp16.onnx for it
    assert trt.calls["parsed"] == [str(model / "tiny.onnx")]  # fp16 engines come from the fp32 graph
    profile = trt.calls["profiles"][0][0]
    assert profile["input_ids"] == ((1, 1), (4, 12), (4, 12))
    assert profile["past"] == ((1, 2, 0, 4), (4, 2, 22, 4), (4, 2, 44, 4))
    cache = tmp_path / "cache" / "nvidia-h100-80gb-hbm3" / "trt-10.99.1"
    assert (cache / "timing.cache").is_file() and len(list(cache.glob("tiny-fp16-*.plan"))) == 1
    assert built["tiny"].read_bytes() == next(cache.glob("tiny-fp16-*.plan")).read_bytes()
    engines.build_model_engines(model, tmp_path / "cache", "fp16", max_batch=4)
    assert trt.calls["build"] == 1  # the second run reuses the cached engine

    with pytest.raises(ValueError, match="not a QDQ graph"):
        engines.build_model_engines(model, tmp_path / "cache", "int8")
    with pytest.raises(ValueError, match="unknown precision"):
        engines.build_model_engines(model, tmp_path / "cache", "bf16")
    manifest = json.loads((model / "manifest.json").read_text())
    del manifest["graphs"]["tiny"]["files"]["fp16"]
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no fp16 file"):
        engines.build_model_engines(model, tmp_path / "cache", "fp16")


# ------------------------------------------------------------------------------------------------
# The real thing
# ------------------------------------------------------------------------------------------------


def test_real_engine_build_and_cache(graph, tmp_path):
    try:
        trt, gpu = engines.require_build_environment()
    except EngineBuildUnavailable as err:
        print(f"skipping the real TensorRT build: {err}")
        pytest.skip(str(err))
    profile = engines.default_profiles(graph, 4, (1, 8, 16), others=OTHERS)
    cache = tmp_path / "timing.cache"
    path = engines.build_engine(graph, tmp_path / "engines", profile, "fp16", timing_cache=cache, workspace_gb=1)
    assert path.is_file() and cache.is_file() and engines.gpu_slug(gpu) in str(path)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    assert engine is not None
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert {"input_ids", "features", "past", "threshold", "logits"} <= names
    shapes = [tuple(d) for d in engine.get_tensor_profile_shape("features", 0)]
    assert shapes == [(1, 1, 8), (4, 8, 8), (4, 16, 8)]
    mtime = path.stat().st_mtime_ns
    assert engines.build_engine(graph, tmp_path / "engines", profile, "fp16", timing_cache=cache) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
