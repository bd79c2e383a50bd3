"""Graph variants (compression/quantize.py): ORT offline optimisation, dynamic and static INT8, FP16.

The graph is a tiny transformer block exported in the test (embedding, LayerNorm, attention, GELU
MLP, classifier), with dynamic batch and text axes, like the exported VLM graphs.
"""

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compression import quantize as q

ort = pytest.importorskip("onnxruntime")

WIDTH, VOCAB = 128, 100


class TinyBlock(nn.Module):
    def __init__(self, heads=4, ffn=512, answers=16):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, ffn), nn.Linear(ffn, WIDTH)
        self.head = nn.Linear(WIDTH, answers)
        self.heads = heads

    def forward(self, input_ids, features):
        x = self.emb(input_ids) + features
        b, t, d = x.shape
        q_, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, dim=-1))
        attn = (q_ @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(x[:, 0])


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quantize") / "block.onnx"
    axes = {"input_ids": {0: "batch", 1: "text"}, "features": {0: "batch", 1: "text"}, "logits": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            TinyBlock().eval(),
            (torch.randint(0, VOCAB, (2, 6)), torch.randn(2, 6, WIDTH)),
            str(path),
            input_names=["input_ids", "features"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=18,
            dynamo=False,
        )
    return path


def feed(b=3, t=7, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, VOCAB, (b, t)).astype(np.int64),
        "features": rng.standard_normal((b, t, WIDTH)).astype(np.float32),
    }


def run(path, inputs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_dynamic_int8_is_close_smaller_and_keeps_embeddings_and_attention_float(graph, tmp_path):
    out = q.quantize_dynamic_int8(graph, tmp_path / "dyn.onnx")
    assert out == tmp_path / "dyn.onnx"
    for b, t in ((1, 3), (5, 9)):  # dynamic axes survive
        inputs = feed(b, t)
        assert rel_err(run(out, inputs), run(graph, inputs)) < 0.05
    report = q.size_report(graph, out)
    assert report["ratio"] < 0.5 and report["dst_bytes"] < report["src_bytes"]
    kinds = ops(out)
    assert kinds.count("MatMulInteger") == 5  # qkv, proj, fc1, fc2, head
    assert kinds.count("MatMul") == 2  # Q·Kᵀ and P·V stay float
    embeddings = [t for t in onnx.load(str(out)).graph.initializer if t.name == "emb.weight"]
    assert embeddings and embeddings[0].data_type == onnx.TensorProto.FLOAT


def test_dynamic_int8_can_quantise_gathers_when_asked(graph, tmp_path):
    out = q.quantize_dynamic_int8(graph, tmp_path / "dyn-gather.onnx", op_types=("MatMul", "Gemm", "Gather"))
    emb = [t for t in onnx.load(str(out)).graph.initializer if t.name.startswith("emb.weight")]
    assert any(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for t in emb)
    assert rel_err(run(out, feed()), run(graph, feed())) < 0.1


def calibration(n=6):
    return (feed(4, 7, seed=100 + i) for i in range(n))  # a generator: read once


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_static_int8_cpu_is_close(graph, tmp_path, method):
    out = q.quantize_static_int8(graph, tmp_path / f"static-{method}.onnx", calibration(), method=method)
    inputs = feed(2, 5, seed=7)
    assert rel_err(run(out, inputs), run(graph, inputs)) < 0.05
    assert "QuantizeLinear" in ops(out) and "DequantizeLinear" in ops(out)
    assert q.has_qdq(out) and not q.has_qdq(graph)
    assert q.size_report(graph, out)["ratio"] < 0.5


def _zero_points(path):
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            yield node, inits[node.input[2]]


def test_static_int8_for_tensorrt_is_symmetric_int8_with_float_biases(graph, tmp_path):
    out = q.quantize_static_int8(graph, tmp_path / "static-trt.onnx", calibration(), target="tensorrt")
    zero_points = list(_zero_points(out))
    assert zero_points
    for node, zp in zero_points:
        assert zp.data_type == onnx.TensorProto.INT8, node.name
        assert not numpy_helper.to_array(zp).any(), node.name  # TensorRT: zero point 0 only
    assert not any(t.data_type == onnx.TensorProto.INT32 for t in onnx.load(str(out)).graph.initializer)
    assert rel_err(run(out, feed()), run(graph, feed())) < 0.05


def test_static_entropy_calibration_is_not_minmax(graph, tmp_path):
    """ORT's quantize_static alone would make entropy ranges equal to minmax ones (128 bins for 128
    levels); ours search a 2048-bin histogram."""

    def scales(path):
        inits = onnx.load(str(path)).graph.initializer
        return {t.name: numpy_helper.to_array(t) for t in inits if t.name.endswith("_scale") and t.dims == []}

    a = scales(q.quantize_static_int8(graph, tmp_path / "minmax.onnx", calibration(), method="minmax"))
    b = scales(q.quantize_static_int8(graph, tmp_path / "entropy.onnx", calibration(), method="entropy"))
    assert a.keys() == b.keys()
    assert any(not np.allclose(a[k], b[k]) for k in a)
    assert np.isfinite(run(tmp_path / "entropy.onnx", feed())).all()


def _max_int8_weight(path):
    inits = onnx.load(str(path)).graph.initializer
    weights = [numpy_helper.to_array(t) for t in inits if t.data_type == onnx.TensorProto.INT8 and t.dims]
    assert weights
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)


def test_cpu_int8_weights_are_7_bit_and_tensorrt_ones_8_bit(graph, tmp_path):
    """CPU graphs must not saturate ORT's U8S8 kernels on x86 without VNNI (VPMADDUBSW adds two
    uint8 x int8 products into int16: 255 * 64 * 2 fits, 255 * 127 * 2 does not), whatever CPU the
    tests run on; TensorRT graphs keep the full int8 range."""
    assert q.INT8_REDUCE_RANGE
    assert _max_int8_weight(q.quantize_dynamic_int8(graph, tmp_path / "dyn.onnx")) <= 64
    assert _max_int8_weight(q.quantize_dynamic_int8(graph, tmp_path / "dyn-pc.onnx", per_channel=True)) <= 64
    assert _max_int8_weight(q.quantize_static_int8(graph, tmp_path / "st.onnx", calibration())) <= 64
    assert _max_int8_weight(q.quantize_dynamic_int8(graph, tmp_path / "dyn8.onnx", reduce_range=False)) == 127
    assert _max_int8_weight(q.quantize_static_int8(graph, tmp_path / "trt.onnx", calibration(), target="tensorrt")) == 127


def test_static_int8_rejects_empty_or_mismatched_calibration(graph, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        q.quantize_static_int8(graph, tmp_path / "x.onnx", [])
    with pytest.raises(ValueError, match="missing: \\['features'\\]"):
        q.quantize_static_int8(graph, tmp_path / "x.onnx", [{"input_ids": feed()["input_ids"]}])
    with pytest.raises(ValueError, match="unknown calibration method"):
        q.quantize_static_int8(graph, tmp_path / "x.onnx", calibration(), method="mse")


def test_fp16_keeps_float32_io_and_layernorm(graph, tmp_path):
    out = q.to_fp16(graph, tmp_path / "fp16.onnx")  # runs onnx.checker on the path
    model = onnx.load(str(out))
    for value in list(model.graph.input) + list(model.graph.output):
        expected = onnx.TensorProto.INT64 if value.name == "input_ids" else onnx.TensorProto.FLOAT
        assert value.type.tensor_type.elem_type == expected, value.name
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits["head.bias"] == onnx.TensorProto.FLOAT16
    # LayerNorm computes in float32: every input arrives through a Cast to float
    cast_to = {o: a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to" for o in n.output}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 2
    assert all(cast_to.get(i) == onnx.TensorProto.FLOAT for n in norms for i in n.input)
    assert q.size_report(graph, out)["ratio"] < 0.6
    inputs = feed()
    try:
        got = run(out, inputs)
    except Exception as err:  # ORT CPU lacks float16 kernels for some op
        pytest.skip(f"ONNX Runtime (CPU) cannot run this float16 graph: {err}")
    assert got.dtype == np.float32
    assert rel_err(got, run(graph, inputs)) < 1e-2


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_optimized_graph_matches_original(graph, tmp_path, level):
    out = q.optimize_graph(graph, tmp_path / f"opt-{level}.onnx", level=level)
    for b, t in ((1, 4), (4, 11)):
        inputs = feed(b, t, seed=b)
        np.testing.assert_allclose(run(out, inputs), run(graph, inputs), rtol=1e-4, atol=1e-5)
    domains = {n.domain for n in onnx.load(str(out)).graph.node}
    if level == "basic":
        assert domains <= {"", "ai.onnx"}  # plain ONNX: portable to any runtime


def test_bad_arguments(graph, tmp_path):
    with pytest.raises(ValueError, match="unknown optimisation level"):
        q.optimize_graph(graph, tmp_path / "x.onnx", level="max")
    with pytest.raises(ValueError, match="must differ"):
        q.to_fp16(graph, graph)
    with pytest.raises(FileNotFoundError):
        q.quantize_dynamic_int8(tmp_path / "missing.onnx", tmp_path / "x.onnx")


def test_failed_symbolic_shape_inference_leaves_no_files_behind(graph, tmp_path, monkeypatch):
    """ORT's symbolic shape inference dumps sym_shape_infer_temp.onnx (+ a .data file) into the
    working directory when it gives up; pre-processing then retries without it, in a scratch dir."""
    import onnxruntime.quantization.shape_inference as shape_inference

    real = shape_inference.quant_pre_process
    calls = []

    def flaky(src, dst, skip_symbolic_shape=False, **kw):
        calls.append(skip_symbolic_shape)
        if not skip_symbolic_shape:
            Path("sym_shape_infer_temp.onnx").write_bytes(b"dump")
            raise Exception("Incomplete symbolic shape inference")
        return real(src, dst, skip_symbolic_shape=True, **kw)

    monkeypatch.setattr(shape_inference, "quant_pre_process", flaky)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = q.quantize_dynamic_int8(graph, "relative.onnx")
    assert calls == [False, True]
    assert out == work / "relative.onnx" and out.is_file()
    assert sorted(p.name for p in work.iterdir()) == ["relative.onnx"]
    assert rel_err(run(out, feed()), run(graph, feed())) < 0.05


def test_the_export_reports_int8_drop_is_the_worst_level():
    from compression.export_report import int8_max_drop_points

    acc = {"m fp32 full": 0.995, "m int8 full": 0.996, "m fp32 fast": 0.961, "m int8 fast": 0.956}
    assert int8_max_drop_points(acc, "m", "m", "int8", ["full", "fast"]) == pytest.approx(0.5)
