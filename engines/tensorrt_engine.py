"""TensorRT plans for the encoder modules (optional).

Needs NVIDIA's ``tensorrt`` (10.x or later) and ``cuda-python`` on a GPU machine; neither is importable
on CPU-only machines, where every entry point raises :class:`EngineUnavailable` with what to install.
A plan is bound to the GPU architecture, TensorRT version and OS that built it, and is executable code:
load only plans you built (the bundle records where each came from and its sha256).

Runtime call sequence (TensorRT's documented API): ``deserialize_cuda_engine`` ->
``create_execution_context`` -> ``set_input_shape`` / ``set_tensor_address`` -> ``execute_async_v3``.
"""

from __future__ import annotations

import numpy as np

from samf.runtime.errors import EngineUnavailable, SamfError

INSTALL_HINT = ("TensorRT is not available here: install NVIDIA's tensorrt (10.x+) and cuda-python wheels "
                "on a GPU machine, or run the encoders with --backend onnxruntime")


def _trt():
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise EngineUnavailable(f"{INSTALL_HINT} ({e})") from None
    return trt, cudart


def _check(err, what: str):
    code = err[0] if isinstance(err, tuple) else err
    if int(code) != 0:
        raise SamfError(f"CUDA error {int(code)} in {what}")
    return err[1] if isinstance(err, tuple) and len(err) > 1 else None


def tensorrt_version() -> str | None:
    """TensorRT's version string, or None where it is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


class TrtModule:
    """A deserialized plan; call with named numpy inputs, get the first output as numpy."""

    def __init__(self, plan_path: str):
        trt, cudart = _trt()
        self._trt, self._cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        with open(plan_path, "rb") as f:
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise SamfError(f"TensorRT cannot deserialize {plan_path} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def __call__(self, **feeds) -> np.ndarray:
        trt, cudart = self._trt, self._cudart
        allocs = []
        try:
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_input_shape(name, arr.shape)
                ptr = _check(cudart.cudaMallocAsync(arr.nbytes, self.stream), "cudaMallocAsync")
                allocs.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "H2D")
                self.context.set_tensor_address(name, ptr)
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = _check(cudart.cudaMallocAsync(host.nbytes, self.stream), "cudaMallocAsync")
                allocs.append(ptr)
                self.context.set_tensor_address(name, ptr)
                outs[name] = (host, ptr)
            if not self.context.execute_async_v3(self.stream):
                raise SamfError("TensorRT execution failed")
            for host, ptr in outs.values():
                _check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "D2H")
            _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            return outs[self.outputs[0]][0]
        finally:
            for ptr in allocs:
                cudart.cudaFreeAsync(ptr, self.stream)


def build_plan(onnx_path: str, plan_path: str, profiles: dict, workspace_gib: float = 4.0,
               timing_cache: str | None = None) -> dict:
    """Build a strongly typed plan from ONNX (precision comes from the graph, as TensorRT 11 requires).

    ``profiles``: ``{input: (min_shape, opt_shape, max_shape)}`` for the dynamic inputs. Returns facts
    about the build (TensorRT version, GPU name, compute capability) for the bundle manifest.
    """
    trt, cudart = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SamfError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache:
        blob = open(timing_cache, "rb").read() if _exists(timing_cache) else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SamfError(f"TensorRT failed to build {onnx_path}")
    tmp = plan_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(plan)
    import os

    os.replace(tmp, plan_path)
    if cache is not None:
        with open(timing_cache, "wb") as f:
            f.write(memoryview(cache.serialize()))
    props = _check(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return dict(tensorrt=trt.__version__, gpu=name.strip("\x00"), compute_capability=f"{props.major}.{props.minor}")


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
