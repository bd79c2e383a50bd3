"""Native TensorRT: serialized engines (.plan) run with TensorRT 10's name-based tensor API.

Device memory and streams come from cuda-python (no torch, no pycuda). Both `tensorrt` and the
CUDA bindings are imported in load(), so this module imports anywhere; load() raises
RuntimeUnavailable with the reason where they or a GPU are missing.

Engines are built offline for one GPU model and TensorRT version (compression/ writes them next to
the ONNX graphs); dynamic axes are bounded by the engine's optimization profile 0.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.runtime.base import Runtime, RuntimeOptions, RuntimeUnavailable, TensorSpec, prepare_feeds


def _import_cudart():
    """cuda-python's runtime bindings (the module moved in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return cudart


def _check(cudart, result):
    """cuda-python returns (error, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error: {cudart.cudaGetErrorString(err)[1].decode()} ({err})")
    return values[0] if len(values) == 1 else values


@dataclass
class _Engine:
    """One graph: its engine, an execution context and the device buffers it last used."""

    engine: object
    context: object
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dtypes: dict[str, np.dtype]
    buffers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (device pointer, bytes)
    allocator: object | None = None  # for outputs whose shape is only known after running
    lock: threading.Lock = field(default_factory=threading.Lock)  # a context runs one call at a time


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, options: RuntimeOptions | None = None):
        super().__init__(options)
        self._engines: dict[str, _Engine] = {}
        self._trt = None
        self._cudart = None
        self._runtime = None
        self._stream = None
        self._device_name = ""

    # ------------------------------------------------------------------ setup
    def check_available(self) -> None:
        try:
            import tensorrt  # noqa: F401
        except ImportError as e:
            raise RuntimeUnavailable(
                f"TensorRT is not installed (pip install tensorrt, needs an NVIDIA GPU and driver): {e}"
            ) from e
        try:
            cudart = _import_cudart()
        except ImportError as e:
            raise RuntimeUnavailable(
                f"cuda-python is not installed (pip install cuda-python), needed for TensorRT buffers: {e}"
            ) from e
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count == 0:
            raise RuntimeUnavailable(f"no CUDA GPU visible to TensorRT (cudaGetDeviceCount: {err}, {count} devices)")

    def load(self, graphs: dict[str, Path]) -> None:
        self.check_available()
        import tensorrt as trt

        cudart = _import_cudart()
        self._trt, self._cudart = trt, cudart
        device_id = int(self.options.extra.get("device_id", 0))
        _check(cudart, cudart.cudaSetDevice(device_id))
        gpu = _check(cudart, cudart.cudaGetDeviceProperties(device_id)).name
        self._device_name = (gpu.decode(errors="replace") if isinstance(gpu, bytes) else str(gpu)).rstrip("\x00")
        if self._stream is None:
            self._stream = _check(cudart, cudart.cudaStreamCreate())
        if self._runtime is None:
            self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime and engines
            self._runtime = trt.Runtime(self._logger)
        for name, path in graphs.items():
            path = Path(path)
            if path.suffix == ".onnx":  # the factory swaps in a sibling .plan where one was built
                raise RuntimeUnavailable(
                    f"tensorrt: graph {name!r}: no engine built for {path} (expected {path.with_suffix('.plan')})"
                )
            if not path.is_file():
                raise FileNotFoundError(f"tensorrt: graph {name!r}: no engine file {path}")
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:  # TensorRT logs the reason (usually another TensorRT version or GPU)
                raise RuntimeUnavailable(
                    f"tensorrt {trt.__version__}: cannot deserialize {path} on {self._device_name}; "
                    "engines only load with the TensorRT version and GPU model they were built for"
                )
            self._engines[name] = self._describe_engine(engine)

    def _describe_engine(self, engine) -> _Engine:
        trt = self._trt
        inputs, outputs, dtypes = [], [], {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtypes[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            # TensorRT keeps no axis names: a dynamic axis (-1) reads "?", like an unnamed ONNX axis.
            shape = tuple(d if d >= 0 else "?" for d in engine.get_tensor_shape(name))
            spec = TensorSpec(name, dtypes[name].name, shape)
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeError("tensorrt: cannot create an execution context (out of GPU memory?)")
        return _Engine(engine, context, inputs, outputs, dtypes)

    def _engine(self, graph: str) -> _Engine:
        if graph not in self._engines:
            raise self._unknown_graph(graph)
        return self._engines[graph]

    # ------------------------------------------------------------------ running
    def _buffer(self, eng: _Engine, name: str, nbytes: int) -> int:
        """A device buffer of at least nbytes for one tensor, kept and grown across calls."""
        ptr, size = eng.buffers.get(name, (0, 0))
        if nbytes > size or ptr == 0:
            if ptr:
                _check(self._cudart, self._cudart.cudaFree(ptr))
            size = max(nbytes, 256)  # never 0: a null address reads as "not set" to TensorRT
            ptr = _check(self._cudart, self._cudart.cudaMalloc(size))
            eng.buffers[name] = (ptr, size)
        return ptr

    def _output_allocator(self, eng: _Engine):
        """TensorRT asks this for outputs whose shape depends on the data (NonZero in the trimmed
        gather graph) and tells it the real shape afterwards."""
        trt, runtime = self._trt, self

        class _Allocator(trt.IOutputAllocator):
            def __init__(self):
                trt.IOutputAllocator.__init__(self)
                self.shapes: dict[str, tuple[int, ...]] = {}

            def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
                return runtime._buffer(eng, tensor_name, int(size))

            def reallocate_output(self, tensor_name, memory, size, alignment):  # TensorRT < 10
                return runtime._buffer(eng, tensor_name, int(size))

            def notify_shape(self, tensor_name, shape):
                self.shapes[tensor_name] = tuple(int(d) for d in shape)

        return _Allocator()

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        eng = self._engine(graph)
        feeds = prepare_feeds(graph, eng.inputs, feeds)
        cudart, ctx, stream = self._cudart, eng.context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with eng.lock:
            for name, arr in feeds.items():
                if not ctx.set_input_shape(name, arr.shape):
                    lo, opt, hi = eng.engine.get_tensor_profile_shape(name, 0)
                    raise ValueError(
                        f"tensorrt: graph {graph!r}: input {name!r} shape {arr.shape} is outside the engine's profile "
                        f"(min {tuple(lo)}, max {tuple(hi)})"
                    )
                ptr = self._buffer(eng, name, arr.nbytes)
                if arr.nbytes:
                    _check(cudart, cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream))
                ctx.set_tensor_address(name, ptr)
            shapes = {}
            for spec in eng.outputs:
                shape = tuple(ctx.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):  # data-dependent: known only after running
                    eng.allocator = eng.allocator or self._output_allocator(eng)
                    ctx.set_output_allocator(spec.name, eng.allocator)
                else:
                    shapes[spec.name] = shape
                    nbytes = int(np.prod(shape, dtype=np.int64)) * eng.dtypes[spec.name].itemsize
                    ctx.set_tensor_address(spec.name, self._buffer(eng, spec.name, nbytes))
            if not ctx.execute_async_v3(int(stream)):
                raise RuntimeError(f"tensorrt: graph {graph!r}: execute_async_v3 failed (see the TensorRT log)")
            if eng.allocator is not None:
                _check(cudart, cudart.cudaStreamSynchronize(stream))  # the allocator hears the shapes by now
                shapes |= {n: s for n, s in eng.allocator.shapes.items() if n not in shapes}
            results = {}
            for spec in eng.outputs:
                out = np.empty(shapes[spec.name], eng.dtypes[spec.name])
                if out.nbytes:
                    _check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, eng.buffers[spec.name][0], out.nbytes, d2h, stream))
                results[spec.name] = out
            # Host arrays (feeds and results) must stay alive until the copies finish.
            _check(cudart, cudart.cudaStreamSynchronize(stream))
        return results

    def inputs(self, graph: str) -> list[TensorSpec]:
        return self._engine(graph).inputs

    def outputs(self, graph: str) -> list[TensorSpec]:
        return self._engine(graph).outputs

    @property
    def graphs(self) -> list[str]:
        return list(self._engines)

    def dummy_feeds(self, graph: str, batch: int = 1, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Dynamic axes take the profile's optimum shape (an arbitrary 1 may be below its minimum)."""
        eng = self._engine(graph)
        feeds = {}
        for spec in eng.inputs:
            shape = tuple(eng.engine.get_tensor_profile_shape(spec.name, 0)[1]) if "?" in spec.shape else spec.shape
            dtype = eng.dtypes[spec.name]
            feeds[spec.name] = np.zeros(shape, dtype) if dtype.kind == "f" else np.ones(shape, dtype)
        return feeds

    def describe(self) -> dict:
        info = super().describe() | {"device": "cuda", "gpu": self._device_name}
        if self._trt is not None:
            info["tensorrt_version"] = self._trt.__version__
        return info

    def close(self) -> None:
        cudart = self._cudart
        for eng in self._engines.values():
            for ptr, _ in eng.buffers.values():
                cudart.cudaFree(ptr)
        self._engines.clear()  # contexts and engines go before the runtime
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._runtime = None
