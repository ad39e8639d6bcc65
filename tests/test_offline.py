"""A report is made without touching the network or leaving files behind (issue 11)."""

import os
import shutil
import subprocess
import sys

import pytest
from cli_runner import run_cli

PROBE = """
import sys, time
from samf.runtime.scan.ct import Volume
from samf.runtime.inference.pipeline import ReportPipeline
from samf.runtime.tools.phantom import make_phantom

p = make_phantom(3)
pipe = ReportPipeline(sys.argv[1])
print(pipe.report(Volume(p.volume, p.spacing, "phantom"), max_new_tokens=4).text)
time.sleep(12)  # ONNX Runtime's telemetry, when on, makes its first DNS lookup about 9 s after start
"""


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("offline") / "bundle")
    proc = run_cli("samf-export", "synthetic-bundle", "--preset", "tiny", "--quant", "Q8_0", "--precision", "fp16",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_no_socket_is_opened_and_nothing_is_written_outside_the_cache(tiny_bundle, tmp_path):
    """strace records every socket and connect of the process and its threads; HOME and TMPDIR are fresh
    folders. With ORT_DISABLE_TELEMETRY=0 the same run opens sockets and asks nscd for a host (DNS)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if "TELEMETRY" not in k and k != "XDG_CACHE_HOME"}
    env.update(HOME=str(home), TMPDIR=str(tmpdir))
    log = tmp_path / "strace.log"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=socket,connect", "-o", str(log), sys.executable,
                           "-c", PROBE, tiny_bundle], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [ln for ln in log.read_text().splitlines() if "socket(" in ln or "connect(" in ln]
    assert calls == []
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p != log)
    assert written == ["home/.cache/samf/verified.json"]  # the bundle-verification cache, nothing else

    # Without the cache, nothing at all is written outside the bundle (the report goes to stdout).
    shutil.rmtree(home / ".cache")
    proc = subprocess.run([sys.executable, "-c", PROBE.replace("time.sleep(12)", "pass"), tiny_bundle],
                          capture_output=True, text=True, env={**env, "SAMF_VERIFY_CACHE": "off"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and p != log) == []
