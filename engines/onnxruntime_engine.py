"""ONNX Runtime sessions for the encoder modules: CUDA when onnxruntime-gpu sees a GPU, else CPU."""

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
    """One exported module; call it with named numpy inputs, get its first output."""

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
        self.provider = self.session.get_providers()[0]

    def close(self) -> None:
        self.session = None  # ONNX Runtime frees a session with its last reference

    def __call__(self, **feeds) -> np.ndarray:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise SamfError(f"missing inputs {sorted(missing)}")
        return self.session.run(None, feeds)[0]
