"""ONNX Runtime sessions for the encoder modules: CUDA when onnxruntime-gpu sees a GPU, else CPU.

:meth:`OrtModule.run_bound` runs with I/O binding: inputs may be arrays already on the session's device
(:class:`onnxruntime.OrtValue`), and outputs are written into arrays on that device, so on CUDA the slice
embeddings stay on the GPU from the ViT through the aggregator to the fusion. On CPU the same calls run with
host memory; the pipeline uses them on both, so the path a GPU takes is the path the tests run."""

from __future__ import annotations

import numpy as np

from samf.errors import EngineUnavailable, SamfError


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise EngineUnavailable(f"onnxruntime is not installed ({e}); pip install onnxruntime") from None
    return ort


def available_providers(prefer_gpu: bool = True) -> list:
    have = _ort().get_available_providers()
    order = ["CUDAExecutionProvider", "CPUExecutionProvider"] if prefer_gpu else ["CPUExecutionProvider"]
    return [p for p in order if p in have] or ["CPUExecutionProvider"]


class OrtModule:
    """One exported module; call it with named numpy inputs, get its first output (:meth:`outputs_of`: all)."""

    def __init__(self, path: str, prefer_gpu: bool = True, threads: int = 0):
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # No busy-waiting after a run: the LLM runs right after the encoders on the same cores, and
        # spinning ORT threads were measured to slow llama.cpp's prefill from ~1 ms to ~50 ms (tiny model).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=available_providers(prefer_gpu))
        except Exception as e:
            raise SamfError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def close(self) -> None:
        self.session = None  # ONNX Runtime frees a session with its last reference

    def __call__(self, **feeds) -> np.ndarray:
        return next(iter(self.outputs_of(**feeds).values()))

    def outputs_of(self, **feeds) -> dict:
        """Every output, ``{name: array}`` in the graph's order."""
        self._require(feeds)
        return dict(zip(self.outputs, self.session.run(None, feeds)))

    def _require(self, feeds: dict) -> None:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise SamfError(f"missing inputs {sorted(missing)}")

    def device_array(self, shape) -> "object":
        """An fp32 array of ``shape`` on this session's device (an ``OrtValue``), for :meth:`run_bound`."""
        return _ort().OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.device, 0)

    def run_bound(self, feeds: dict, outputs: dict | None = None):
        """Run with I/O binding. ``feeds``: numpy arrays (copied to the device) or ``OrtValue``s already there.
        ``outputs``: ``{name: (OrtValue, shape)}``, written in place (``shape`` may differ from the array's
        as long as the size is the same: a ``[K, D]`` output can fill a ``[1, K, D]`` array). Without
        ``outputs`` every output comes back as numpy, ``{name: array}``."""
        self._require(feeds)
        ort = _ort()
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        if outputs:
            for name, (array, shape) in outputs.items():
                binding.bind_output(name, array.device_name(), 0, np.float32, list(shape), array.data_ptr())
        else:
            for name in self.outputs:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return None if outputs else dict(zip(self.outputs, binding.copy_outputs_to_cpu()))
