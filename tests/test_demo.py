"""`samf demo` end to end through the console script, on a reduced size (marked slow)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    code = "import sys; from samf.cli.samf_cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "demo", "--workdir", str(tmp_path), "--train", "60",
                           "--test", "4", "--finetune-steps", "40", "--show", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generated" in proc.stdout and "reference" in proc.stdout
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["runtime_equals_torch"] == "4/4"
    assert all(v <= 1e-4 for v in summary["onnx_max_abs_diff"].values())
    assert (tmp_path / "bundle" / "manifest.json").exists()
