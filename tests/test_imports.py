"""Imports run one way: cli → export → train → runtime → engines → errors. The runtime and the engines run
without torch, and so do the bundle tools (`samf-export verify | sign | keygen | build-engines`)."""

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import samf

ROOT = pathlib.Path(samf.__file__).parent
#: A module may import its own layer and those below it, never one above.
LAYERS = {"errors": 0, "engines": 1, "runtime": 2, "train": 3, "export": 4, "cli": 5}


def _samf_imports(path: pathlib.Path, package: str):
    """(line, samf subpackage) for every import of samf code in ``path``, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [f"{package}.{node.module}" if node.module else package]
            elif node.level == 2:
                names = [node.module or ""]
            elif node.module and (node.module == "samf" or node.module.startswith("samf.")):
                names = [node.module[5:] or (node.names[0].name if node.names else "")]
        elif isinstance(node, ast.Import):
            names = [a.name[5:] for a in node.names if a.name.startswith("samf.")]
        for name in names:
            yield node.lineno, name.split(".")[0]


def test_imports_run_one_way():
    wrong = []
    for package, level in LAYERS.items():
        files = [ROOT / "errors.py"] if package == "errors" else sorted((ROOT / package).glob("*.py"))
        for f in files:
            for line, target in _samf_imports(f, package):
                if target in LAYERS and LAYERS[target] > level:
                    wrong.append(f"{f.relative_to(ROOT)}:{line} imports samf.{target}")
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


def test_the_layer_check_sees_a_wrong_arrow(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from samf.train.vlm import SamfVLM\n    from ..cli import common\n")
    assert [t for _, t in _samf_imports(bad, "runtime")] == ["train", "cli"]


def test_runtime_and_engine_sources_name_no_training_stack():
    pat = re.compile(r"^\s*(import|from)\s+(torch|transformers|peft)\b", re.M)
    for folder in ("runtime", "engines"):
        for f in (ROOT / folder).glob("*.py"):
            assert not pat.search(f.read_text()), f"{f} imports a training stack"


NO_TORCH = "import sys\nfor m in ('torch', 'transformers', 'peft'):\n    sys.modules[m] = None  # import fails\n"


def test_runtime_and_bundle_tools_import_with_torch_unimportable():
    code = NO_TORCH + (
        "import samf.runtime.inference.pipeline, samf.runtime.bundle.bundle, samf.runtime.bundle.manifest\n"
        "import samf.runtime.bundle.signature\n"
        "import samf.engines.onnxruntime_engine, samf.engines.llama_cpp_engine, samf.engines.tensorrt_engine\n"
        "import samf.export.tensorrt_build, samf.cli.samf_cli, samf.cli.export_cli, samf.runtime.tools.phantom\n"
        "assert not any(m.startswith('samf.train') for m in sys.modules), 'the runtime pulled in samf.train'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _export_cli_without_torch(*args):
    code = NO_TORCH + "from samf.cli.export_cli import main\nsys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_bundle_tools_run_without_torch(quick, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(quick.bundle, bundle)
    key = str(tmp_path / "k.key")
    for args in (["keygen", key], ["sign", str(bundle), "--key", key],
                 ["verify", str(bundle), "--trusted-key", key + ".pub"]):
        proc = _export_cli_without_torch(*args)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
    signed = (bundle / "manifest.json").read_text()
    proc = _export_cli_without_torch("build-engines", str(bundle))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: TensorRT is not available")
    assert (bundle / "manifest.json").read_text() == signed  # nothing half-written


@pytest.mark.parametrize("module", ["samf.cli.samf_cli"])
def test_importing_the_workstation_cli_loads_no_training_stack(module):
    code = f"import sys, {module}\nprint(','.join(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
