"""OpenVINO for the encoder modules on a CPU: the same ONNX files, run in bf16 where the CPU has AVX512-BF16.

Why: ONNX Runtime's CPU provider has no bf16 MatMul, and its int8 loses the slice embeddings' small differences
(``benchmarks/encoder-precision.md``). OpenVINO compiles the fp32 graph with ``INFERENCE_PRECISION_HINT=bf16``:
matrix products in bf16 with fp32 accumulation (AVX512-BF16), the rest fp32. No file of its own: a bundle's
``bf16`` encoders are its fp32 ONNX files, checked at export with this engine (``export/encoder_variants.py``).

Must-nots: the import is lazy (OpenVINO is an optional extra: ``pip install samf[openvino]``), and its absence
is one line. Telemetry is off, as ONNX Runtime's is: see :func:`import_openvino` (tested: loading and running the
encoders makes no network connection and writes nothing in HOME).
Pinned 2026.4.1: users reported a SIGFPE in ``compile_model`` on Zen 4 EPYC with 2025.3–2026.1; 2026.4.1 is
tested on this project's Zen 4 machines.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from samf.errors import EngineUnavailable, SamfError

#: Precisions this engine runs: OpenVINO's ``INFERENCE_PRECISION_HINT`` for each.
HINTS = {"bf16": "bf16", "fp32": "f32"}


def import_openvino():
    """``openvino``, imported with its telemetry off: ``import openvino`` loads the model converter, which sends
    an "import" event to Google Analytics from a subprocess unless told not to (measured: a DNS query on import;
    opt-out is a file in ~/intel or CI=true). With ``openvino_telemetry`` unimportable, the converter takes its
    own no-op stub (``openvino.tools.ovc.telemetry_stub``): nothing is sent and nothing is written in HOME."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: importing it raises ImportError
    try:
        import openvino as ov
    except ImportError as e:
        raise EngineUnavailable(f"OpenVINO is not installed ({e}); pip install 'samf[openvino]' for the bf16 "
                                "CPU encoders") from None
    return ov


def openvino_version() -> str | None:
    """OpenVINO's version, or None when it is not installed."""
    try:
        return import_openvino().get_version()
    except EngineUnavailable:
        return None


@dataclass(frozen=True)
class Port:
    """An input or output: its name and shape (ints, or the dimension's name when dynamic), as ORT's NodeArg."""

    name: str
    shape: list


class OvModule:
    """One exported module compiled by OpenVINO for the CPU; called as :class:`OrtModule` is, with named numpy
    inputs; the first output back (:meth:`outputs_of`: all)."""

    def __init__(self, path: str, precision: str = "bf16", threads: int = 0):
        if precision not in HINTS:
            raise SamfError(f"OpenVINO runs the encoders in {' or '.join(HINTS)}, not {precision!r}")
        ov = import_openvino()
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(path)
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise SamfError(f"OpenVINO cannot load {os.path.basename(path)}: {str(e).splitlines()[0]}") from None
        self.request = self.compiled.create_infer_request()
        self.inputs = {p.get_any_name(): Port(p.get_any_name(), _shape(p)) for p in self.compiled.inputs}
        self.outputs = {p.get_any_name(): Port(p.get_any_name(), _shape(p)) for p in self.compiled.outputs}
        self.precision = precision
        self.provider = f"OpenVINO {precision}"
        self.device = "cpu"

    def close(self) -> None:
        self.request = self.compiled = None

    def __call__(self, **feeds) -> np.ndarray:
        return next(iter(self.outputs_of(**feeds).values()))

    def outputs_of(self, **feeds) -> dict:
        """Every output, ``{name: array}`` in the graph's order (copies: the request reuses its buffers)."""
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise SamfError(f"missing inputs {sorted(missing)}")
        got = self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items() if k in self.inputs})
        by_name = {port.get_any_name(): value for port, value in got.items()}
        return {name: np.array(by_name[name], copy=True) for name in self.outputs}


def _shape(port) -> list:
    return [d.get_length() if d.is_static else f"d{i}" for i, d in enumerate(port.get_partial_shape())]
