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

from samf.errors import EngineUnavailable, SamfError

INSTALL_HINT = ("TensorRT is not available here: install NVIDIA's tensorrt (10.x+) and cuda-python wheels "
                "on a GPU machine, or run the encoders with --backend onnxruntime")


def import_tensorrt():
    """(tensorrt, cuda runtime bindings), or :class:`EngineUnavailable` saying what to install."""
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise EngineUnavailable(f"{INSTALL_HINT} ({e})") from None
    return trt, cudart


def cuda_ok(err, what: str):
    """The value of a cuda-python call's (error, value) result; :class:`SamfError` on a CUDA error."""
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
    """A deserialized plan; call with named numpy inputs, get the first output as numpy (:meth:`outputs_of`:
    every output)."""

    def __init__(self, plan_path: str):
        trt, cudart = import_tensorrt()
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
        self.stream = cuda_ok(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = self.engine = None

    def __call__(self, **feeds) -> np.ndarray:
        return self.outputs_of(**feeds)[self.outputs[0]]

    def outputs_of(self, **feeds) -> dict:
        """Every output, ``{name: array}`` in the plan's order."""
        trt, cudart = self._trt, self._cudart
        allocs = []
        try:
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_input_shape(name, arr.shape)
                ptr = cuda_ok(cudart.cudaMallocAsync(arr.nbytes, self.stream), "cudaMallocAsync")
                allocs.append(ptr)
                cuda_ok(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "H2D")
                self.context.set_tensor_address(name, ptr)
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = cuda_ok(cudart.cudaMallocAsync(host.nbytes, self.stream), "cudaMallocAsync")
                allocs.append(ptr)
                self.context.set_tensor_address(name, ptr)
                outs[name] = (host, ptr)
            if not self.context.execute_async_v3(self.stream):
                raise SamfError("TensorRT execution failed")
            for host, ptr in outs.values():
                cuda_ok(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "D2H")
            cuda_ok(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            return {name: host for name, (host, _) in outs.items()}
        finally:
            for ptr in allocs:
                cudart.cudaFreeAsync(ptr, self.stream)
