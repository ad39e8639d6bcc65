"""One small adapter per deployable inference engine; each loads its library lazily and never imports torch.

- ``onnxruntime_engine.OrtModule``: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)
- ``tensorrt_engine.TrtModule``: TensorRT plans (optional; needs NVIDIA's tensorrt + cuda-python)
- ``openvino_engine.OvModule``: OpenVINO on the CPU, bf16 where the CPU has it (optional; ``samf[openvino]``)
- ``llama_cpp_engine.LlamaCppLLM``: llama.cpp with embedding injection
"""

ENCODER_BACKENDS = ("onnxruntime", "tensorrt", "openvino")


def load_encoder_module(backend: str, path: str, **kwargs):
    """The encoder module at ``path`` on ``backend`` (``onnxruntime``, ``tensorrt`` or ``openvino``)."""
    if backend == "onnxruntime":
        from .onnxruntime_engine import OrtModule

        return OrtModule(path, **kwargs)
    if backend == "tensorrt":
        from .tensorrt_engine import TrtModule

        return TrtModule(path, **kwargs)
    if backend == "openvino":
        from .openvino_engine import OvModule

        return OvModule(path, **kwargs)
    from samf.errors import SamfError

    raise SamfError(f"unknown encoder backend {backend!r}; one of {', '.join(ENCODER_BACKENDS)}")
