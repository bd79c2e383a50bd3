"""ONNX Runtime: one InferenceSession per graph, on CPU, CUDA or the TensorRT execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime.base import Runtime, RuntimeOptions, RuntimeUnavailable, TensorSpec, prepare_feeds

# ONNX tensor element types (as ORT spells them) -> numpy dtype names.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

_DEVICES = ("cpu", "cuda", "tensorrt")


def _tensor_specs(args) -> list[TensorSpec]:
    # ORT reports a named dynamic axis as its name, an unnamed one as None.
    return [
        TensorSpec(a.name, _ORT_DTYPES.get(a.type, a.type), tuple(d if d is not None else "?" for d in (a.shape or [])))
        for a in args
    ]


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, options: RuntimeOptions | None = None):
        super().__init__(options)
        self._sessions: dict = {}
        self._specs: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {}  # per graph: inputs, outputs
        # IO binding only pays where feeds must cross to a device; on CPU plain run() is as fast.
        self._io_binding = self.options.io_binding and self.options.device != "cpu"

    # ------------------------------------------------------------------ setup
    def _providers(self) -> list[tuple[str, dict]]:
        """Execution providers in priority order, each with its options; CPU always last so
        nodes a GPU provider can't take still run."""
        opts = self.options
        device_id = int(opts.extra.get("device_id", 0))
        providers: list[tuple[str, dict]] = []
        if opts.device == "tensorrt":
            trt: dict = {"device_id": device_id, "trt_fp16_enable": bool(opts.extra.get("trt_fp16", False))}
            if opts.tensorrt_cache_dir:
                # Building engines takes minutes; the cache makes restarts take seconds.
                Path(opts.tensorrt_cache_dir).mkdir(parents=True, exist_ok=True)
                trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(opts.tensorrt_cache_dir)}
            providers.append(("TensorrtExecutionProvider", trt))
        if opts.device in ("cuda", "tensorrt"):
            providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
        providers.append(("CPUExecutionProvider", {}))
        return providers

    def check_available(self) -> None:
        if self.options.device not in _DEVICES:
            raise ValueError(f"onnxruntime: unknown device {self.options.device!r} (one of {list(_DEVICES)})")
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeUnavailable(f"ONNX Runtime is not installed (pip install onnxruntime): {e}") from e
        available = ort.get_available_providers()
        # The first provider is the one asked for; CUDA behind TensorRT is only a fallback for
        # unsupported nodes, and onnxruntime-gpu always ships both.
        wanted = self._providers()[0][0]
        if wanted not in available:
            raise RuntimeUnavailable(
                f"onnxruntime {ort.__version__}: {wanted} is not available (available: {available}); "
                "install onnxruntime-gpu with matching CUDA/cuDNN (and TensorRT for the TensorRT provider)"
            )

    def _session_options(self):
        import onnxruntime as ort

        opts = self.options
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if opts.graph_optimization not in levels:
            raise ValueError(f"onnxruntime: unknown graph_optimization {opts.graph_optimization!r} (one of {list(levels)})")
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.intra_op_threads
        so.inter_op_num_threads = opts.inter_op_threads
        # inter-op threads only run independent branches in parallel mode.
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if opts.inter_op_threads > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_cpu_mem_arena = opts.memory_arena
        so.graph_optimization_level = levels[opts.graph_optimization]
        so.log_severity_level = int(opts.extra.get("ort_log_level", 3))  # errors only: EP placement notes are noise
        if "allow_spinning" in opts.extra:
            # Spinning threads burn CPU between requests; off helps when the CPU is shared.
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.extra["allow_spinning"] else "0")
        return so

    def load(self, graphs: dict[str, Path]) -> None:
        self.check_available()
        import onnxruntime as ort

        so = self._session_options()
        providers = self._providers()
        wanted = providers[0][0]
        sessions = {}
        for name, path in graphs.items():
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"onnxruntime: graph {name!r}: no file {path}")
            session = ort.InferenceSession(
                str(path), sess_options=so, providers=[p for p, _ in providers], provider_options=[o for _, o in providers]
            )
            # A listed GPU provider that fails to start (no GPU, missing CUDA/cuDNN libraries) makes
            # ORT fall back to CPU silently; say so instead, so the factory logs the fallback.
            if session.get_providers()[0] != wanted:
                raise RuntimeUnavailable(
                    f"onnxruntime: {wanted} did not start for graph {name!r} (active: {session.get_providers()}); "
                    "check the GPU driver and the CUDA/cuDNN/TensorRT libraries"
                )
            sessions[name] = session
        self._sessions.update(sessions)
        self._specs.update({n: (_tensor_specs(s.get_inputs()), _tensor_specs(s.get_outputs())) for n, s in sessions.items()})

    # ------------------------------------------------------------------ running
    def session(self, graph: str):
        """The InferenceSession behind one graph (for profiling and tests)."""
        if graph not in self._sessions:
            raise self._unknown_graph(graph)
        return self._sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(graph)
        feeds = prepare_feeds(graph, self.inputs(graph), feeds)
        names = [o.name for o in self.outputs(graph)]
        if not self._io_binding:
            return dict(zip(names, session.run(names, feeds), strict=True))
        # One binding per call (sessions are shared across threads; bindings are not).
        binding = session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name in names:
            binding.bind_output(name)  # ORT allocates; the copy back to CPU happens once, below
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    def inputs(self, graph: str) -> list[TensorSpec]:
        if graph not in self._specs:
            raise self._unknown_graph(graph)
        return self._specs[graph][0]

    def outputs(self, graph: str) -> list[TensorSpec]:
        if graph not in self._specs:
            raise self._unknown_graph(graph)
        return self._specs[graph][1]

    @property
    def graphs(self) -> list[str]:
        return list(self._sessions)

    def describe(self) -> dict:
        import onnxruntime as ort

        opts = self.options
        return super().describe() | {
            "onnxruntime_version": ort.__version__,
            "providers": {g: s.get_providers() for g, s in self._sessions.items()},
            "intra_op_threads": opts.intra_op_threads,
            "inter_op_threads": opts.inter_op_threads,
            "memory_arena": opts.memory_arena,
            "graph_optimization": opts.graph_optimization,
            "io_binding": self._io_binding,
        }

    def close(self) -> None:
        self._sessions.clear()
        self._specs.clear()
