"""One small adapter per deployable inference engine; each loads its library lazily and never imports torch.

- ``onnxruntime_engine.OrtModule``: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)
- ``tensorrt_engine.TrtModule``: TensorRT plans (optional; needs NVIDIA's tensorrt + cuda-python)
- ``llama_cpp_engine.LlamaCppLLM``: llama.cpp with embedding injection
"""

ENCODER_BACKENDS = ("onnxruntime", "tensorrt")


def load_encoder_module(backend: str, path: str, **kwargs):
    """The encoder module at ``path`` on ``backend`` (``onnxruntime`` or ``tensorrt``)."""
    if backend == "onnxruntime":
        from .onnxruntime_engine import OrtModule

        return OrtModule(path, **kwargs)
    if backend == "tensorrt":
        from .tensorrt_engine import TrtModule

        return TrtModule(path, **kwargs)
    from samf.errors import SamfError

    raise SamfError(f"unknown encoder backend {backend!r}; one of {', '.join(ENCODER_BACKENDS)}")
