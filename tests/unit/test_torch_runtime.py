"""compression/torch_runtime.py: the torch backend (parity checks) reached through service.runtime's
registry, and TorchTasks (a torch model behind TaskModel's task methods) on the same graph modules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import compression.torch_runtime
from compression.export_graphs import GraphModule
from compression.modeling import TrimVLM
from compression.torch_runtime import TorchRuntime, TorchTasks
from service.runtime import RuntimeOptions, TensorSpec, load_runtime
from tests.unit.test_modeling import tiny_config


def _torch_tiny(monkeypatch, with_sample: bool = True):
    """A tiny module behind the registry contract (load_model_dir + graph_modules)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()).eval()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}}
    if with_sample:
        gm = GraphModule(module, ["x"], ["y"], lambda b, t: (torch.randn(b, 4),), axes)
    else:  # the minimal contract: module, inputs, outputs
        gm = SimpleNamespace(module=module, inputs=["x"], outputs=["y"])
    monkeypatch.setattr(
        compression.torch_runtime, "load_model_dir", lambda path, device="cpu": SimpleNamespace(model="tiny-model")
    )
    monkeypatch.setattr(
        compression.torch_runtime, "graph_modules", lambda model: {"tiny": gm, "other": gm} if model == "tiny-model" else {}
    )
    return module, axes


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as compression/export_graphs.py uses
def test_torch_runtime_matches_onnxruntime(tmp_path, monkeypatch):
    module, axes = _torch_tiny(monkeypatch)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        module,
        (torch.randn(2, 4),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes=axes,
        opset_version=18,
        dynamo=False,
    )
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    with load_runtime("onnxruntime", {"tiny": path}, RuntimeOptions(intra_op_threads=1)) as ort_rt:
        expected = ort_rt.run("tiny", {"x": x})["y"]
        ort_specs = ort_rt.inputs("tiny"), ort_rt.outputs("tiny")
    # through the registry: the `torch` entry point (pyproject.toml), as Settings.backend = "torch" does
    with load_runtime("torch", {"tiny": path}, RuntimeOptions(), model_dir=tmp_path) as rt:
        assert isinstance(rt, TorchRuntime) and rt.graphs == ["tiny"]  # only the graphs asked for
        assert (rt.inputs("tiny"), rt.outputs("tiny")) == ort_specs
        got = rt.run("tiny", {"x": x.astype(np.float64)})  # cast like the other backends
        assert rt.describe()["torch_version"] == torch.__version__
        with pytest.raises(KeyError, match="loaded graphs: \\['tiny'\\]"):
            rt.run("other", {"x": x})
    np.testing.assert_allclose(got["y"], expected, rtol=1e-5, atol=1e-6)


def test_torch_runtime_minimal_contract_and_errors(tmp_path, monkeypatch):
    _torch_tiny(monkeypatch, with_sample=False)
    rt = TorchRuntime(RuntimeOptions(), model_dir=tmp_path)
    rt.load({"tiny": tmp_path / "ignored.onnx"})
    assert rt.inputs("tiny") == [TensorSpec("x", "unknown", ())]
    assert rt.run("tiny", {"x": np.zeros((2, 4), np.float32)})["y"].shape == (2, 3)
    with pytest.raises(ValueError, match="missing input"):
        rt.run("tiny", {})
    with pytest.raises(KeyError, match=r"no graph module\(s\) \['vision'\].*available: \['other', 'tiny'\]"):
        TorchRuntime(model_dir=tmp_path).load({"vision": Path("vision.onnx")})
    with pytest.raises(ValueError, match="needs model_dir"):
        TorchRuntime().load({"tiny": Path("x")})
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        TorchRuntime(RuntimeOptions(device="tpu"), model_dir=tmp_path).load({"tiny": Path("x")})


@torch.no_grad()
def test_torch_tasks_run_the_exported_graph_modules_and_match_the_model():
    torch.manual_seed(0)
    model = TrimVLM(tiny_config(itc_text_through_fusion=True)).eval()
    lm = SimpleNamespace(model=model, tokenizer=None, preprocessing=None, rerank_itc_weight=0.0)
    state = torch.get_rng_state()
    tasks = TorchTasks(lm, "cpu")
    assert torch.equal(torch.get_rng_state(), state)  # specs from sample inputs leave the caller's random stream alone
    assert tasks.runtime.graphs == ["vision", "text"]
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(4, 50, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    image_states, image_embeds = tasks.encode_images(pixels.numpy())
    text_states, text_embeds = tasks.encode_texts(ids.numpy(), mask.numpy())
    want_states = model.encode_image(pixels).last_hidden_state
    np.testing.assert_array_equal(image_states, want_states.numpy())
    np.testing.assert_array_equal(image_embeds, model.image_embeds(want_states).numpy())
    np.testing.assert_array_equal(text_states, model.text_encoder(ids, mask.bool()).last_hidden_state.numpy())
    states = model.encode_text(ids, mask.bool()).last_hidden_state
    np.testing.assert_array_equal(text_embeds, model.text_embeds(states, mask.bool()).numpy())
    fused = tasks.fuse(text_states, mask.numpy(), image_states)
    assert fused["vqa_logits"].shape == (2, model.config.num_answers) and fused["fused_states"].shape[:2] == (2, 7)
