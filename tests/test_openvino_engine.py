"""OpenVINO as the encoders' CPU backend: the same ONNX files, bf16 close to ONNX Runtime's fp32, nothing sent
over the network, and one line when it is not installed."""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from samf.engines import load_encoder_module
from samf.errors import EngineUnavailable

if importlib.util.find_spec("openvino") is None:  # found, not imported: see below
    pytest.skip("OpenVINO is an optional extra (samf[openvino]); CI installs it", allow_module_level=True)


#: Each test runs OpenVINO in a child process: a test process that has run torch and then OpenVINO was seen to
#: crash (SIGSEGV) at a later subprocess spawn, so the pytest process never loads it.
AGREEMENT = """
import sys
import numpy as np
from samf.engines import load_encoder_module
vit = sys.argv[1]
x = np.random.default_rng(0).standard_normal((24, 3, 48, 48)).astype(np.float32)
cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
ref = load_encoder_module("onnxruntime", vit, threads=1)(slices=x)
f32 = load_encoder_module("openvino", vit, precision="fp32", threads=1)
bf16 = load_encoder_module("openvino", vit, precision="bf16", threads=1)
assert f32.outputs["z2d"].shape[1] == ref.shape[1] and bf16.provider == "OpenVINO bf16"
got32, got16 = f32(slices=x), bf16(slices=x)
assert np.abs(got32 - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got32 - ref).max()   # f32: float noise
assert cos(got16, ref).min() >= 0.99, cos(got16, ref).min()  # bf16: 8 bits of mantissa, on raw inputs
assert not np.array_equal(got16, got32)                      # and bf16 did run in bf16 on this CPU
try:
    bf16(other=x)
    raise SystemExit("missing inputs were not refused")
except Exception as e:
    assert "missing inputs" in str(e), e
print("ok")
"""


def test_bf16_and_f32_agree_with_onnxruntime_on_the_same_file(quick):
    out = subprocess.run([sys.executable, "-c", AGREEMENT, os.path.join(quick.bundle, "vit.onnx")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_it_sends_nothing_over_the_network(quick, tmp_path):
    """``import openvino`` alone sends a telemetry event from a subprocess (a DNS query, seen under strace) and
    writes a client id in ~/intel. Through the engine: the converter holds OpenVINO's own no-op stub, strace
    (every process, every thread) sees no network socket connected, and HOME stays empty."""
    code = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from samf.engines import load_encoder_module
        m = load_encoder_module("openvino", {os.path.join(quick.bundle, 'vit.onnx')!r}, precision="bf16")
        m(slices=np.zeros((2, 3, 48, 48), np.float32))
        import openvino.tools.ovc.telemetry_utils as t
        assert t.tm.__name__ == "openvino.tools.ovc.telemetry_stub", t.tm
        time.sleep(2)  # the event, were it sent, goes from a subprocess started on import
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}  # its own opt-outs
    env["HOME"] = str(tmp_path / "home")
    os.makedirs(env["HOME"])
    cmd = [sys.executable, "-c", code]
    log = tmp_path / "strace.log"
    if shutil.which("strace"):  # .ci/run installs it
        cmd = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(log), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.listdir(env["HOME"]) == []
    if shutil.which("strace"):
        connects = [ln for ln in log.read_text().splitlines() if "AF_INET" in ln]
        assert connects == [], connects


def test_absent_openvino_is_one_line(quick, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(EngineUnavailable, match=r"OpenVINO is not installed .*pip install 'samf\[openvino\]'"):
        load_encoder_module("openvino", os.path.join(quick.bundle, "vit.onnx"))
