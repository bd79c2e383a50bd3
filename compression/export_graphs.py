"""The base both exporters build on: one graph as a torch module with named inputs and outputs
(`GraphModule`), and its trace to a checked ONNX file (`export_graph`, TorchScript exporter, opset
`OPSET`). The graphs themselves: compression/export.py (vision, text, fusion, VQA; `graph_modules`
names every graph the service runs) and compression/export_decoder.py (the caption decoder with
its KV cache).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

OPSET = 18


@dataclass
class GraphModule:
    """One exportable graph: a module whose forward takes `inputs` positionally and returns
    `outputs` in order; `sample` makes example inputs (batch b, text length t) for tracing;
    `dynamic_axes` names the dynamic dimensions per tensor (shared by export and manifest)."""

    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    sample: Callable[[int, int], tuple] | None = None
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    batch_one: bool = False  # data-dependent shapes baked for batch 1 (the gather graph)


def export_graph(graph: GraphModule, path: str | Path, b: int = 2, t: int = 8) -> Path:
    """Trace one graph to ONNX (TorchScript exporter, opset 18) and check it."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The batch-1 gather graph branches on shapes at trace time on purpose (batch 1 is baked
        # in); the tracer warns about every such branch.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph.module,
            graph.sample(1 if graph.batch_one else b, t),
            str(path),
            input_names=graph.inputs,
            output_names=graph.outputs,
            dynamic_axes=graph.dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return path
