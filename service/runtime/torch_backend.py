"""torch: the exporter's own graph modules, run eagerly, for parity checks against ONNX/TensorRT.

Not a serving path: torch is imported inside methods only, so the serving image never needs it.
Graph names pick modules from `compression.export.graph_modules`; file paths are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime.base import Runtime, RuntimeOptions, RuntimeUnavailable, TensorSpec, prepare_feeds


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model_dir: str | Path | None = None, options: RuntimeOptions | None = None):
        super().__init__(options)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._modules: dict = {}  # name -> compression.export.GraphModule
        self._specs: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {}

    def check_available(self) -> None:
        try:
            import torch
        except ImportError as e:
            raise RuntimeUnavailable(
                f"torch is not installed (pip install 'trimvlm[train]'), the torch runtime needs it: {e}"
            ) from e
        if self.options.device not in ("cpu", "cuda"):
            raise ValueError(f"torch: unknown device {self.options.device!r} (cpu | cuda)")
        if self.options.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable(f"torch {torch.__version__}: no CUDA GPU (torch.cuda.is_available() is False)")

    def load(self, graphs: dict[str, Path]) -> None:
        self.check_available()
        import torch

        from compression.artifacts import load_model_dir
        from compression.export import graph_modules

        if self.model_dir is None:
            raise ValueError("torch: TorchRuntime needs model_dir (a model folder) to load graph modules from")
        if self.options.intra_op_threads > 0:
            torch.set_num_threads(self.options.intra_op_threads)  # process-wide: parity runs only
        model = load_model_dir(self.model_dir).model
        registry = graph_modules(model)
        unknown = sorted(set(graphs) - set(registry))
        if unknown:
            raise KeyError(f"torch: no graph module(s) {unknown} for {self.model_dir}; available: {sorted(registry)}")
        for name in graphs:
            gm = registry[name]
            gm.module.to(self.options.device).eval()
            self._modules[name] = gm
            self._specs[name] = self._graph_specs(gm)

    def _graph_specs(self, gm) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Specs from the graph's example inputs (the ones export traces with) and its dynamic
        axes; without a sample, dtypes and shapes are unknown and feeds are passed as they are."""
        import torch

        sample = getattr(gm, "sample", None)
        if sample is None:
            return [TensorSpec(n, "unknown", ()) for n in gm.inputs], [TensorSpec(n, "unknown", ()) for n in gm.outputs]
        axes = getattr(gm, "dynamic_axes", {}) or {}
        args = sample(1, 2)
        with torch.inference_mode():
            outs = gm.module(*[a.to(self.options.device) for a in args])
        outs = outs if isinstance(outs, tuple | list) else (outs,)

        def spec(name, t):
            names = axes.get(name, {})
            return TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(names.get(i, d) for i, d in enumerate(t.shape)))

        return [spec(n, t) for n, t in zip(gm.inputs, args, strict=True)], [
            spec(n, t) for n, t in zip(gm.outputs, outs, strict=True)
        ]

    def _graph(self, graph: str):
        if graph not in self._modules:
            raise self._unknown_graph(graph)
        return self._modules[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        gm = self._graph(graph)
        feeds = prepare_feeds(graph, self.inputs(graph), feeds)
        args = [torch.from_numpy(feeds[n]).to(self.options.device) for n in gm.inputs]
        with torch.inference_mode():
            outs = gm.module(*args)
        outs = outs if isinstance(outs, tuple | list) else (outs,)
        if len(outs) != len(gm.outputs):
            raise RuntimeError(f"torch: graph {graph!r} returned {len(outs)} outputs, expected {gm.outputs}")
        # numpy has no bfloat16: hand those back as float32.
        outs = [t.float() if t.dtype == torch.bfloat16 else t for t in outs]
        return {n: t.detach().cpu().numpy() for n, t in zip(gm.outputs, outs, strict=True)}

    def inputs(self, graph: str) -> list[TensorSpec]:
        self._graph(graph)
        return self._specs[graph][0]

    def outputs(self, graph: str) -> list[TensorSpec]:
        self._graph(graph)
        return self._specs[graph][1]

    @property
    def graphs(self) -> list[str]:
        return list(self._modules)

    def describe(self) -> dict:
        import torch

        return super().describe() | {
            "torch_version": torch.__version__,
            "model_dir": str(self.model_dir),
            "threads": torch.get_num_threads(),
        }

    def close(self) -> None:
        self._modules.clear()
        self._specs.clear()
