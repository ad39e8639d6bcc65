"""Imports run one way: cli → export → train → runtime → engines → errors; inside runtime/, its sub-packages run one
way too (tools → service → outputs → inference → bundle → scan → the helpers at its top), and no folder holds an
import circle. The runtime and the engines run without torch, and so do the bundle tools (`samf-export verify |
sign | keygen | build-engines`)."""

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import tomllib

import samf

ROOT = pathlib.Path(samf.__file__).parent
#: A module may import its own layer and those below it, never one above.
LAYERS = {"errors": 0, "engines": 1, "runtime": 2, "train": 3, "export": 4, "cli": 5}
#: runtime/'s sub-packages, lowest first: each may import its own and those before it, never one after. The modules
#: at runtime/'s top (atomic, progress, workers, options: helpers every layer uses) come before them all and import
#: none.
RUNTIME_ORDER = ("scan", "bundle", "inference", "outputs", "service", "tools")


def _sources(folder: str) -> list:
    """Every .py file of a layer, its sub-packages included."""
    return [ROOT / "errors.py"] if folder == "errors" else sorted((ROOT / folder).rglob("*.py"))


def _package(path: pathlib.Path) -> str:
    """The dotted package (without ``samf.``) a source file of this repository is in: ``runtime.scan``."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def _is_module(name: str) -> bool:
    """Whether ``name`` (dotted, without ``samf.``) is a module or a package of this repository."""
    where = ROOT.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def _samf_imports(path: pathlib.Path, package: str):
    """(line, module) for every import of samf code in ``path``, at the top or inside a function: the module
    dotted without ``samf.`` (``runtime.scan.ct``), relative imports resolved against ``package``, and ``from
    PACKAGE import NAME`` taken as the module NAME where NAME is one."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and (node.module == "samf" or node.module.startswith("samf.")):
                base = node.module[5:]
            else:
                continue
            subs = [f"{base}.{a.name}" if base else a.name for a in node.names]
            found = [s for s in subs if _is_module(s)]
            names = found if found else [base]
        elif isinstance(node, ast.Import):
            names = [a.name[5:] for a in node.names if a.name.startswith("samf.")]
        else:
            continue
        for name in names:
            yield node.lineno, name


def test_imports_run_one_way():
    wrong = []
    for package, level in LAYERS.items():
        for f in _sources(package):
            for line, target in _samf_imports(f, _package(f)):
                layer = target.split(".")[0]
                if layer in LAYERS and LAYERS[layer] > level:
                    wrong.append(f"{f.relative_to(ROOT)}:{line} imports samf.{target}")
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


def test_the_layer_check_sees_a_wrong_arrow(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from samf.train.vlm import SamfVLM\n    from ..cli import common\n")
    assert [t for _, t in _samf_imports(bad, "runtime")] == ["train.vlm", "cli.common"]
    assert [t for _, t in _samf_imports(bad, "runtime.scan")] == ["train.vlm", "runtime.cli"]  # ..: runtime


def _runtime_rank(module: str) -> int:
    """Where a runtime module sits in :data:`RUNTIME_ORDER`: 0 for runtime/'s own top (``runtime``, ``runtime.atomic``),
    1 for scan/, and so on; a sub-package missing from the order fails here, so a new one gets a place."""
    parts = module.split(".")
    if len(parts) == 1 or not (ROOT / "runtime" / parts[1]).is_dir():
        return 0
    assert parts[1] in RUNTIME_ORDER, f"runtime/{parts[1]}/ has no place in RUNTIME_ORDER (tests/test_imports.py)"
    return 1 + RUNTIME_ORDER.index(parts[1])


def _runtime_arrows_up(path: pathlib.Path, package: str) -> list:
    """``(line, module)`` of each import in ``path`` (in runtime ``package``) of a runtime module placed after
    its own sub-package in :data:`RUNTIME_ORDER`."""
    here = _runtime_rank(package)
    return [(line, t) for line, t in _samf_imports(path, package)
            if t.split(".")[0] == "runtime" and _runtime_rank(t) > here]


def test_runtime_sub_packages_import_one_way():
    assert sorted(p.name for p in (ROOT / "runtime").iterdir() if (p / "__init__.py").exists()) \
        == sorted(RUNTIME_ORDER)
    wrong = [f"{f.relative_to(ROOT)}:{line} imports samf.{target}"
             for f in _sources("runtime") for line, target in _runtime_arrows_up(f, _package(f))]
    assert wrong == [], "runtime/ imports against the order " + " → ".join(RUNTIME_ORDER) + ":\n" + "\n".join(wrong)


def test_the_runtime_order_check_sees_a_wrong_arrow(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from ..atomic import atomic_file\nfrom .ct import Volume\nfrom ..bundle.bundle import Bundle\n"
                   "def f():\n    from ..service.jobs import JobStore\n    from samf.runtime.outputs import compose\n")
    assert _runtime_arrows_up(bad, "runtime.scan") == [(3, "runtime.bundle.bundle"), (5, "runtime.service.jobs"),
                                                       (6, "runtime.outputs.compose")]
    assert _runtime_arrows_up(bad, "runtime.tools") == []
    # at runtime/'s top (a helper), no sub-package may be imported ("..x" there is samf.x, not runtime's)
    assert [t for _, t in _runtime_arrows_up(bad, "runtime")] == ["runtime.outputs.compose"]


def _circles(graph: dict) -> list:
    """Import circles of ``graph`` (module -> modules it imports), each as the modules along it: at least one
    through every module that lies on one (a depth-first walk), none when there is none."""
    found, seen = [], set()

    def walk(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                circle = path[path.index(nxt):]
                key = frozenset(circle)
                if key not in seen:
                    seen.add(key)
                    found.append(circle + [nxt])
            elif nxt not in done:
                walk(nxt, path + [nxt])
        done.add(node)

    done: set = set()
    for start in sorted(graph):
        if start not in done:
            walk(start, [start])
    return found


def _folder_graphs() -> dict:
    """``{folder: {module: modules of the same folder it imports}}`` for every folder of samf's layers, a
    package's ``__init__`` included (as ``folder.__init__``)."""
    graphs: dict = {}
    for layer in LAYERS:
        for f in _sources(layer):
            package = _package(f)
            name = f"{package}.{f.stem}" if package else f.stem
            edges = graphs.setdefault(package, {}).setdefault(name, set())
            for _, target in _samf_imports(f, package):
                if (ROOT.joinpath(*target.split(".")) / "__init__.py").is_file():
                    target += ".__init__"
                if target.rsplit(".", 1)[0] == package and target != name:
                    edges.add(target)
    return graphs


def test_no_import_circles_inside_a_folder():
    circles = [" → ".join(c) for graph in _folder_graphs().values() for c in _circles(graph)]
    assert circles == [], "import circles inside a folder (move what both need into a module below them):\n" \
        + "\n".join(circles)


def test_the_circle_check_sees_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": set(), "c": {"b"}}) == []


def test_runtime_and_engine_sources_name_no_training_stack_and_no_click():
    pat = re.compile(r"^\s*(import|from)\s+(torch|transformers|peft)\b", re.M)
    for folder in ("runtime", "engines"):
        for f in _sources(folder):
            assert not pat.search(f.read_text()), f"{f} imports a training stack"
    click = re.compile(r"^\s*(import|from)\s+click\b", re.M)  # the command line is cli/'s
    for f in _sources("runtime"):
        assert not click.search(f.read_text()), f"{f} imports click"


def test_every_package_is_installed():
    """pyproject.toml lists packages one by one: a new sub-package missing there would be left out of a wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"samf"} | {"samf." + ".".join(p.parent.relative_to(ROOT).parts)
                        for layer in LAYERS if layer != "errors" for p in (ROOT / layer).rglob("__init__.py")}
    assert found - listed == set(), "packages missing from pyproject.toml's [tool.setuptools] packages"


NO_TORCH = "import sys\nfor m in ('torch', 'transformers', 'peft'):\n    sys.modules[m] = None  # import fails\n"


def _modules(folder: str) -> list:
    return ["samf." + ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for f in _sources(folder)]


def test_runtime_and_bundle_tools_import_with_torch_unimportable():
    """Every runtime and engine module, and the workstation's CLIs, import with torch unimportable, and pull in
    nothing of samf.train."""
    modules = _modules("runtime") + _modules("engines") + [
        "samf.export.tensorrt_build", "samf.cli.samf_cli", "samf.cli.serve_cli", "samf.cli.export_cli"]
    code = NO_TORCH + "".join(f"import {m}\n" for m in modules) + (
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


def test_preparing_a_scan_cache_needs_no_torch(tmp_path):
    """`samf-train prepare` only reads and preprocesses scans (the runtime's code): it starts without torch, so a
    data machine without the training stack can prepare, and a killed and rerun prepare starts in a second."""
    from samf.runtime.tools.phantom import generate_phantom_dataset

    data, out = str(tmp_path / "data"), str(tmp_path / "cache")
    generate_phantom_dataset(data, 3, 1, seed=3, shape=(32, 48, 48), spacing=(8.0, 7.5, 7.5), progress=False)
    code = NO_TORCH + "from samf.cli.train_cli import main\nsys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "prepare", "--data", data, "--out", out, "--preset", "tiny",
                           "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cache ready" in proc.stdout
