"""ONNX export of the VQA path: ONNX Runtime matches torch, thresholds are live graph inputs."""

import numpy as np
import pytest
import torch

from compression.export import export_vqa
from compression.trimmed import Trim, trimmed_vqa_forward
from tests.unit.test_trim import inputs, trimmed_model

ort = pytest.importorskip("onnxruntime")


def _feed(pixels, ids, mask, threshold=None):
    feed = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy().astype(np.int64)}
    if threshold is not None:
        feed |= {"token_threshold": np.array(threshold, np.float32), "head_threshold": np.array(threshold, np.float32)}
    return feed


def test_full_graph_matches_torch_with_dynamic_batch_and_length(tmp_path):
    model = trimmed_model()
    sess = ort.InferenceSession(str(export_vqa(model, tmp_path / "full.onnx", "full")))
    for b, n in ((1, 5), (3, 9)):
        pixels, ids, mask = inputs(b, n)
        with torch.no_grad():
            ref, _ = model.vqa_forward(pixels, ids, mask)
        assert np.allclose(sess.run(None, _feed(pixels, ids, mask))[0], ref.numpy(), atol=1e-4)


def test_gather_graph_matches_torch_mask_mode_at_any_threshold(tmp_path):
    model = trimmed_model(seed=5)
    sess = ort.InferenceSession(str(export_vqa(model, tmp_path / "gather.onnx", "gather")))
    kept = set()
    for seed in range(4):
        pixels, ids, mask = inputs(1, 7, seed=seed)
        for threshold in (0.2, 0.5, 0.8):
            logits, image_kept = sess.run(None, _feed(pixels, ids, mask, threshold))
            with torch.no_grad():
                ref, trace = trimmed_vqa_forward(
                    model, pixels, ids, mask, Trim(mode="mask", token_threshold=threshold, head_threshold=threshold)
                )
            assert np.allclose(logits, ref.numpy(), atol=1e-4)
            assert image_kept[0] == trace.image_kv.item()
            kept.add(float(image_kept[0]))
    assert len(kept) > 2  # data-dependent lengths really vary inside one graph


def test_trimmed_graph_needs_trimmers(tmp_path):
    from compression.modeling import TrimVLM
    from tests.unit.test_modeling import tiny_config

    with pytest.raises(ValueError, match="trimmers"):
        export_vqa(TrimVLM(tiny_config()), tmp_path / "x.onnx", "gather")
