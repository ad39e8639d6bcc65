"""Run the console scripts as a user would: a fresh interpreter, real argv, captured output."""

import subprocess
import sys

MODULES = {"samf": "samf_cli", "samf-train": "train_cli", "samf-export": "export_cli"}


def run_cli(tool: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    code = f"import sys; from samf.cli.{MODULES[tool]} import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
