"""The runtime and the engine adapters must run on a machine without torch, transformers or peft."""

import subprocess
import sys

CODE = """
import sys
import samf.runtime, samf.engines
import samf.runtime.pipeline, samf.runtime.bundle, samf.runtime.ct, samf.runtime.preprocess, samf.runtime.prompt
import samf.engines.onnxruntime_engine, samf.engines.llama_cpp_engine, samf.engines.tensorrt_engine
import samf.cli.samf_cli
bad = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print(",".join(bad))
"""


def test_runtime_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"runtime pulled in: {out.stdout.strip()}"


def test_runtime_sources_do_not_import_training_stacks():
    import pathlib
    import re

    import samf

    root = pathlib.Path(samf.__file__).parent
    pat = re.compile(r"^\s*(import|from)\s+(torch|transformers|peft)\b", re.M)
    for folder in ("runtime", "engines"):
        for f in (root / folder).glob("*.py"):
            assert not pat.search(f.read_text()), f"{f} imports a training stack"
