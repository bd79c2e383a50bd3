"""Caption decoding without a K/V cache, and the floor under a cached step, for the KV part of
`trimvlm bench scale`.

The service decodes with the whole cache: the cross-attention K/V once per image (decoder_cross_kv)
and the self-attention K/V grown by one token per step (decoder_step). Two slower ways of decoding
the same tokens are timed beside it:
- cross K/V cached only: decoder_nocache over the whole prefix at every step, the cross K/V still
  projected once per image (half a cache: the stricter baseline);
- no cache: decoder_nocache with the cross K/V projected again from the image states at every step,
  which is how transformers' BLIP decoder runs without past_key_values (generate(use_cache=False)).

A batch-1 cached step reads every weight of decoder_step once, so its floor is the time ONNX Runtime
takes to stream that many bytes through one MatMul at batch 1 (`weight_stream_ms`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

HIDDEN = 768  # the rows of the streamed matrix; any width reads the same bytes


def recomputing_cross(run, image_states: np.ndarray):
    """A runner over which service.generation.greedy_decode(use_cache=False) decodes with no K/V
    cache at all: every decoder_nocache call gets the cross K/V projected again from the image
    states of its rows. The projection greedy_decode makes before its first step serves that first
    step, so both paths project the image exactly once per step. Rows must not drop out mid-caption
    (the bench masks [SEP]), since the rows are taken as the first `batch` image states."""
    fresh = False  # the last decoder_cross_kv call has not been used by a step yet

    def go(graph: str, feeds: dict) -> dict:
        nonlocal fresh
        if graph == "decoder_cross_kv":
            fresh = True
        elif graph == "decoder_nocache":
            if not fresh:
                rows = feeds["input_ids"].shape[0]
                feeds = {**feeds, **run("decoder_cross_kv", {"image_states": image_states[:rows]})}
            fresh = False
        return run(graph, feeds)

    return go


def stream_graph(path: Path) -> Path:
    """A one-MatMul ONNX graph, x [1, HIDDEN] @ w [HIDDEN, N], with w an input so the file stays tiny."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "weight_stream",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [HIDDEN, "n"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def weight_stream_ms(nbytes: dict[str, int], options, repeats: int = 7) -> dict[str, float]:
    """Batch-1 MatMul time over fp32 weights of each given byte count (p50 of `repeats` after a
    warm-up), in ONNX Runtime with the service's runtime settings: the least time a batch-1 step
    that reads that many weight bytes can take on this machine."""
    from service.runtime import load_runtime

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        runtime = load_runtime("onnxruntime", {"stream": stream_graph(Path(tmp) / "stream.onnx")}, options, fallback=False)
        try:
            x = np.ones((1, HIDDEN), np.float32)
            for name, size in nbytes.items():
                w = np.random.default_rng(0).standard_normal((HIDDEN, max(1, size // (4 * HIDDEN))), np.float32)
                runtime.run("stream", {"x": x, "w": w})
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    runtime.run("stream", {"x": x, "w": w})
                    times.append((time.perf_counter() - t0) * 1000)
                out[name] = round(float(np.median(times)), 2)
                del w
        finally:
            runtime.close()
    return out
