"""The native build (CMakeLists.txt, issue 29): llama.cpp's libraries built portable, every x86-64 CPU variant
chosen at load time, and the installed llama-cpp-python running exactly those libraries."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
import wheelhouse  # noqa: E402

#: /proc/cpuinfo flags each x86-64 variant of ggml's CPU backend needs (ggml/src/CMakeLists.txt's list, the
#: features its ggml_backend_score checks).
HASWELL = ["sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"]
SKYLAKEX = HASWELL + ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"]
VARIANTS = {
    "x64": [], "sse42": ["sse4_2"], "sandybridge": ["sse4_2", "avx"], "ivybridge": ["sse4_2", "avx", "f16c"],
    "piledriver": ["sse4_2", "avx", "f16c", "fma"], "haswell": HASWELL, "skylakex": SKYLAKEX,
    "cannonlake": SKYLAKEX + ["avx512vbmi"], "cascadelake": SKYLAKEX + ["avx512_vnni"],
    "icelake": SKYLAKEX + ["avx512vbmi", "avx512_vnni"], "cooperlake": SKYLAKEX + ["avx512_vnni", "avx512_bf16"],
    "zen4": SKYLAKEX + ["avx512vbmi", "avx512_vnni", "avx512_bf16"], "alderlake": HASWELL + ["avx_vnni"],
    "sapphirerapids": SKYLAKEX + ["avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"],
}

LOADED = """
import hashlib, json, os, sys
from samf.engines.llama_cpp_engine import LlamaCppLLM, loaded_cpu_variant
llm = LlamaCppLLM(sys.argv[1], n_ctx=64, n_threads=1)
libs = {}
for line in open("/proc/self/maps"):
    path = line.split()[-1]
    if "/llama_cpp/lib/" in path or os.environ.get("LLAMA_CPP_LIB_PATH", "//") in path:
        libs[os.path.basename(path)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
print(json.dumps(dict(variant=loaded_cpu_variant(), libs=libs)))
"""


def installed_lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def portable_installed() -> bool:
    """The installed llama-cpp-python is CMakeLists.txt's portable build (every CPU variant)."""
    built = installed_lib_dir() / "samf-build.json"
    return built.exists() and json.loads(built.read_text())["options"]["GGML_CPU_ALL_VARIANTS"] == "ON"


def cpu_flags() -> set:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_cmake_pins_the_llama_cpp_python_of_pyproject():
    """CMakeLists.txt builds the llama.cpp of the llama-cpp-python pyproject.toml installs, and hashes its source."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"llama-cpp-python==([^"]+)"', pyproject).group(1) == wheelhouse.pinned_version()
    assert re.search(r'SAMF_LLAMA_CPP_PYTHON_SHA256 "[0-9a-f]{64}"', (ROOT / "CMakeLists.txt").read_text())


def test_variants_score_as_the_cpu_says_and_the_best_is_loaded():
    """Each CPU variant of the installed build scores non-zero exactly where this CPU has its features (every
    variant is there, none missing), and the engine loads the highest-scoring one."""
    if not portable_installed():
        pytest.skip("the installed llama-cpp-python is not the portable build (make install installs it)")
    lib = installed_lib_dir()
    from samf.engines.llama_cpp_engine import cpu_variants

    assert cpu_variants(str(lib)) == sorted(VARIANTS)
    flags, scores = cpu_flags(), {}
    ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    for name in VARIANTS:
        score = ctypes.CDLL(str(lib / f"libggml-cpu-{name}.so")).ggml_backend_score
        score.restype = ctypes.c_int
        scores[name] = score()
        assert (scores[name] > 0) == all(f in flags for f in VARIANTS[name]), (name, scores[name])
    best = max(scores, key=scores.get)
    out = subprocess.run([sys.executable, "-c", "from samf.engines.llama_cpp_engine import _llama_cpp, "
                          "loaded_cpu_variant as v; _llama_cpp(); print(v())"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == best
    if {"avx512_bf16", "avx512_vnni", "avx512vbmi"} <= flags and "amx_int8" not in flags:
        assert best == "zen4"  # this project's Zen 4 machines: AVX-512 with VNNI and BF16


def test_no_avx_outside_the_cpu_variants():
    """Built without -march=native: libllama, libggml, libggml-base and the x64 variant use no AVX register (they
    run on any x86-64 CPU); the zen4 variant does use AVX-512 (zmm)."""
    if not portable_installed():
        pytest.skip("the installed llama-cpp-python is not the portable build (make install installs it)")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    lib = installed_lib_dir()

    def registers(name):
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib / name)], capture_output=True,
                              text=True, check=True).stdout
        return text.count("%ymm") + text.count("%zmm"), text.count("%zmm")

    for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu-x64.so"):
        assert registers(name) == (0, 0), name
    assert registers("libggml-cpu-zen4.so")[1] > 0


def test_a_pinned_variant_that_is_missing_is_one_line(tmp_path):
    if not portable_installed():
        pytest.skip("the installed llama-cpp-python is not the portable build (make install installs it)")
    out = subprocess.run([sys.executable, "-c", "from samf.engines.llama_cpp_engine import _llama_cpp; _llama_cpp()"],
                         capture_output=True, text=True, env={**os.environ, "SAMF_LLAMA_CPU_VARIANT": "pentium"})
    assert out.returncode != 0
    assert "SAMF_LLAMA_CPU_VARIANT=pentium: no such CPU variant" in out.stderr


def test_the_build_chatter_stays_off_stdout(tmp_path, monkeypatch, capfd):
    """`make install` reads the wheel's path from `wheelhouse.py llama-wheel`'s stdout: cmake's and the compiler's
    output (hundreds of kB on a first build) must go to stderr, or the Makefile's `$(...)` gets all of it."""
    fake = tmp_path / "cmake"
    fake.write_text("#!/bin/sh\nfor i in $(seq 2000); do echo \"[$i/2000] Building CXX object ggml.o\"; done\n")
    fake.chmod(0o755)
    monkeypatch.setattr(wheelhouse, "_cmake_tools", lambda log: str(fake))
    wheelhouse.cmake_build(tmp_path / "build", {}, None, log=lambda m: None)
    out, err = capfd.readouterr()
    assert out == "" and err.count("Building CXX object") == 4000  # configure and build, both on stderr


def _zip_libs(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        return {Path(n).name: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist()
                if n.startswith("llama_cpp/lib/") and ".so" in n}


@pytest.mark.slow
def test_the_built_libraries_are_the_ones_llama_cpp_python_loads(quick):
    """The wheel of CMakeLists.txt's build (cached, else built: `cmake -S . -B build && cmake --build build`) holds
    the very files the installed llama-cpp-python maps when it loads a model: libllama, libggml, libggml-base and
    the CPU variant chosen."""
    if not portable_installed():
        pytest.fail("the installed llama-cpp-python is not the portable build: run make install")
    wheel = wheelhouse.llama_wheel(dict(wheelhouse.DEFAULTS), log=lambda m: None)
    built = _zip_libs(wheel)
    gguf = next(Path(quick.bundle).glob("llm-Q8_0.gguf"))
    out = subprocess.run([sys.executable, "-c", LOADED, str(gguf)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout)
    expected = {"libllama.so", "libggml.so", "libggml-base.so", f"libggml-cpu-{loaded['variant']}.so"}
    assert expected <= set(loaded["libs"])
    for name, digest in loaded["libs"].items():
        assert built[name] == digest, name
    # And when this checkout's build folder holds that build, its files are the wheel's.
    local = ROOT / "build" / "llama_cpp_lib"
    if (local / "samf-build.json").exists() and (local / "libllama.so").exists():
        if json.loads((local / "samf-build.json").read_text())["options"] == json.loads(
                zipfile.ZipFile(wheel).read("llama_cpp/lib/samf-build.json"))["options"]:
            for name, digest in built.items():
                if (local / name).exists():
                    assert hashlib.sha256((local / name).read_bytes()).hexdigest() == digest, name


def _report(scan: str, bundle: str, env: dict) -> tuple:
    code = ("import json, sys\n"
            "from samf.cli.samf_cli import main\n"
            "from samf.engines.llama_cpp_engine import loaded_cpu_variant\n"
            "try:\n    main(['report', sys.argv[1], '--bundle', sys.argv[2], '--json'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(json.dumps(dict(variant=loaded_cpu_variant())))\n")
    out = subprocess.run([sys.executable, "-c", code, scan, bundle], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[0])["report"], json.loads(lines[-1])["variant"]


@pytest.mark.slow
def test_without_the_best_variant_the_same_greedy_report(quick, tmp_path):
    """A CPU without this one's best variant: a copy of the library folder without it (ggml then chooses among
    the rest), and the x64 baseline pinned (SAMF_LLAMA_CPU_VARIANT). Each loads and gives the same greedy report."""
    if not portable_installed():
        pytest.fail("the installed llama-cpp-python is not the portable build: run make install")
    scan = os.path.join(quick.data, quick.test[0].image)
    report, best = _report(scan, quick.bundle, {})
    lib = tmp_path / "lib"
    shutil.copytree(installed_lib_dir(), lib)
    (lib / f"libggml-cpu-{best}.so").unlink()
    report_without, chosen = _report(scan, quick.bundle, {"LLAMA_CPP_LIB_PATH": str(lib)})
    assert chosen not in (best, None)
    assert report_without == report
    report_x64, chosen = _report(scan, quick.bundle, {"SAMF_LLAMA_CPU_VARIANT": "x64"})
    assert chosen == "x64"
    assert report_x64 == report
