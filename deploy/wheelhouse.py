#!/usr/bin/env python3
"""The air-gapped install's two builds (docs/install.md), run by ``make install`` and ``make wheelhouse``.

``llama-wheel``: llama-cpp-python's wheel around the llama.cpp libraries that CMakeLists.txt builds (portable:
every x86-64 CPU variant, chosen at load time). Its Python files come from the very sdist CMake unpacked
(build/_src), its llama_cpp/lib from build/llama_cpp_lib; llama-cpp-python's own compile never runs. The wheel
is cached by what decides its content (CMakeLists.txt, the options, the compiler), outside the checkout
(``$SAMF_BUILD_CACHE``, default ~/.cache/samf-native/<key>/), so a fresh clone on the same machine, CI
included, does not compile again. Prints the wheel's path.

``build``: dist/wheelhouse/: every wheel samf's runtime and service need (samf with its ``serve`` extra; more
with ``--extras train``), the portable llama-cpp-python among them, a hash-locked requirements.txt,
SHA256SUMS, install.sh and a MANIFEST (versions, platform tags, the llama.cpp build options, each wheel's
SHA-256). The other wheels are the versions this Python environment runs (what its tests passed on), else
the newest that fit, downloaded by pip as binaries only.

Errors are one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import email.parser
import fcntl
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Bumped when the wheel's assembly below changes what it writes (a new key: the cached wheels are not reused).
WHEEL_FORMAT = 1
#: The options CMakeLists.txt takes, by the names `--cuda` etc. give them; their defaults are CMakeLists.txt's.
OPTIONS = {"cpu_all_variants": "SAMF_CPU_ALL_VARIANTS", "cuda": "SAMF_WITH_CUDA", "vulkan": "SAMF_WITH_VULKAN"}
DEFAULTS = {"cpu_all_variants": True, "cuda": False, "vulkan": False}
#: Never in the runtime's wheelhouse: the runtime does not import them (tests/test_imports.py).
TRAINING_ONLY = ("torch", "transformers", "peft")


class BuildError(Exception):
    pass


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pinned_version() -> str:
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(r'set\(SAMF_LLAMA_CPP_PYTHON_VERSION "([^"]+)"\)', text).group(1)


def _compiler() -> str:
    for cc in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cc and shutil.which(cc):
            out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
            return out.splitlines()[0] if out else cc
    raise BuildError("no C++ compiler found: building llama.cpp needs one (apt-get install g++ cmake)")


def build_key(options: dict) -> str:
    """What decides the wheel's bytes: the native build's description (CMakeLists.txt less its comment lines), its
    options, the compiler, the wheel's format."""
    h = hashlib.sha256()
    text = (ROOT / "CMakeLists.txt").read_text()  # its comments left out: they change no byte of the build
    h.update("\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")).encode())
    h.update(json.dumps(dict(options=options, compiler=_compiler(), format=WHEEL_FORMAT,
                             machine=platform.machine()), sort_keys=True).encode())
    return h.hexdigest()[:16]


def local_label(options: dict) -> str:
    """The wheel's local version label: what kind of build it is (``cpuall``, ``native``; ``.cuda``...)."""
    parts = ["samf", "cpuall" if options["cpu_all_variants"] else "native"]
    parts += [k for k in ("cuda", "vulkan") if options[k]]
    return ".".join(parts)


def cache_root() -> Path:
    return Path(os.environ.get("SAMF_BUILD_CACHE") or Path.home() / ".cache" / "samf-native")


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


CMAKE_MIN = (3, 21)  # CMakeLists.txt's cmake_minimum_required


def _cmake_tools(log) -> str:
    """A cmake of at least :data:`CMAKE_MIN`: the system's, else PyPI's ``cmake`` and ``ninja`` packages installed
    into the cache folder (as llama-cpp-python's own build gets them), whose bin folder is put first on PATH."""
    def version(exe):
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"(\d+)\.(\d+)", out)
        return (int(m[1]), int(m[2])) if m else (0, 0)

    system = shutil.which("cmake")
    if system and version(system) >= CMAKE_MIN:
        return system
    tools = cache_root() / "tools"
    exe = tools / "bin" / "cmake"
    if not exe.exists():
        log(f"cmake {'.'.join(map(str, CMAKE_MIN))}+ not found: pip install cmake ninja into {tools}")
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--prefix", str(tools),
                              "cmake>=3.21", "ninja"], capture_output=True, text=True)
        if run.returncode != 0 or not exe.exists():
            raise BuildError("cmake 3.21 or newer is needed to build llama.cpp (apt-get install cmake, or pip "
                             "install cmake)")
    os.environ["PATH"] = f"{tools / 'bin'}{os.pathsep}{os.environ['PATH']}"
    pure = sysconfig.get_path("purelib", vars={"base": str(tools), "platbase": str(tools)})
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [pure, os.environ.get("PYTHONPATH")]))
    return str(exe)


def cmake_build(build_dir: Path, options: dict, sdist: str | None, log) -> Path:
    """``cmake -S . -B build && cmake --build build`` with the options; the libraries' folder."""
    cmake = _cmake_tools(log)
    args = [cmake, "-S", str(ROOT), "-B", str(build_dir)]
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
        args += ["-G", "Ninja"]
    args += [f"-D{OPTIONS[k]}={'ON' if v else 'OFF'}" for k, v in options.items()]
    if sdist:
        args.append(f"-DSAMF_LLAMA_CPP_SDIST={os.path.abspath(sdist)}")
    jobs = str(os.cpu_count() or 1)
    for cmd in (args, [cmake, "--build", str(build_dir), "-j", jobs]):
        log(f"$ {' '.join(cmd)}")
        # The build's output goes to stderr: stdout is the wheel's path alone (the Makefile captures it).
        if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
            raise BuildError(f"{' '.join(cmd[:2])} failed (its output is above)")
    return build_dir / "llama_cpp_lib"


def _record_line(arcname: str, data: bytes) -> list:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [arcname, f"sha256={digest}", str(len(data))]


#: Libraries the build links that a workstation may lack (GCC's OpenMP runtime, which ggml's CPU backend
#: threads with; GPL with the GCC runtime library exception), put beside ours: every library has RUNPATH $ORIGIN.
BUNDLED = ("libgomp.so.1",)


def _bundled(libraries: list) -> list:
    """``(soname, real file)`` of each :data:`BUNDLED` library the built ones link, as ``ldd`` resolves it."""
    found = {}
    for lib in libraries:
        out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
        for m in re.finditer(r"^\s*(\S+) => (/\S+)", out, re.M):
            if m[1] in BUNDLED and os.path.dirname(m[2]) != str(lib.parent):
                found[m[1]] = Path(os.path.realpath(m[2]))
    return sorted(found.items())


def assemble_wheel(src: Path, libs: Path, version: str, out_dir: Path) -> Path:
    """llama-cpp-python's wheel: the sdist's llama_cpp package, ``libs``' libraries as llama_cpp/lib, its
    metadata (the sdist's PKG-INFO) under ``version``. Tagged py3-none-linux_x86_64, as its own build tags it
    (the Python is called through ctypes, so one wheel serves every Python 3)."""
    meta = email.parser.Parser().parsestr((src / "PKG-INFO").read_text())
    meta.replace_header("Version", version)
    dist = f"llama_cpp_python-{version}"
    tag = f"py3-none-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"
    files = []
    for path in sorted((src / "llama_cpp").rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_file() and "__pycache__" not in rel and "/lib/" not in rel:
            files.append((rel, path.read_bytes()))
    libraries = sorted(p for p in libs.iterdir() if p.name.endswith(".so") and not p.is_symlink())
    if not any(p.name == "libllama.so" for p in libraries):
        raise BuildError(f"{libs} has no libllama.so: the native build did not finish")
    files += [(f"llama_cpp/lib/{p.name}", p.read_bytes()) for p in libraries]
    files += [(f"llama_cpp/lib/{name}", p.read_bytes()) for name, p in _bundled(libraries)]
    files.append(("llama_cpp/lib/samf-build.json", (libs / "samf-build.json").read_bytes()))
    info = f"{dist}.dist-info"
    files.append((f"{info}/METADATA", meta.as_string().encode()))
    files.append((f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: samf deploy/wheelhouse.py\n"
                                   f"Root-Is-Purelib: false\nTag: {tag}\n".encode()))
    files.append((f"{info}/licenses/LICENSE.md", (src / "LICENSE.md").read_bytes()))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files:
        writer.writerow(_record_line(name, data))
    writer.writerow([f"{info}/RECORD", "", ""])
    files.append((f"{info}/RECORD", record.getvalue().encode()))
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{dist}-{tag}.whl"
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files:
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            z.writestr(zi, data)
    os.replace(tmp, wheel)
    return wheel


def llama_wheel(options: dict, build_dir: Path | None = None, sdist: str | None = None, log=print) -> Path:
    """The cached portable wheel for ``options``, built first when the cache has none."""
    key = build_key(options)
    folder = cache_root() / key
    with _locked(cache_root()):
        found = sorted(folder.glob("llama_cpp_python-*.whl"))
        if found:
            return found[0]
        if build_dir is None:
            build_dir = ROOT / ("build" if options == DEFAULTS else "build-" + local_label(options))
        t0 = time.monotonic()
        libs = cmake_build(build_dir, options, sdist, log)
        built = json.loads((libs / "samf-build.json").read_text())
        src = build_dir / "_src" / f"llama_cpp_python-{built['llama_cpp_python']}"
        version = f"{built['llama_cpp_python']}+{local_label(options)}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        wheel = assemble_wheel(src, libs, version, tmp)
        (tmp / "build.json").write_text(json.dumps(dict(key=key, samf_options=options, cmake=built,
                                                        seconds=round(time.monotonic() - t0, 1)), indent=1) + "\n")
        os.replace(tmp, folder)  # the cache holds a whole wheel or none
        log(f"llama-cpp-python {version}: built in {time.monotonic() - t0:.0f} s, cached in {folder}")
        return folder / wheel.name


# ---------------------------------------------------------------------------------------------- wheelhouse
def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: list) -> list:
    """samf's own requirements with ``extras``, llama-cpp-python's left out (its wheel is ours)."""
    project = _project()
    reqs = list(project["dependencies"])
    for extra in extras:
        if extra not in project["optional-dependencies"]:
            raise BuildError(f"samf has no extra {extra!r} (it has {', '.join(project['optional-dependencies'])})")
        reqs += project["optional-dependencies"][extra]
    return [r for r in reqs if _norm(re.split(r"[<>=!~;\[ ]", r, 1)[0]) != "llama-cpp-python"]


def _wheel_requires(wheel: Path) -> list:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(name).decode())
    return [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]


def _constraints(path: Path) -> Path:
    """This environment's versions as pip constraints: the wheelhouse gets what the tests ran on."""
    lines = []
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name and _norm(name) not in ("samf", "llama-cpp-python") and "+" not in (d.version or "+"):
            lines.append(f"{name}=={d.version}")
        elif name and _norm(name) == "torch":
            lines.append(f"{name}=={d.version}")  # torch's +cpu build: the CPU wheel, pinned
    path.write_text("\n".join(sorted(set(lines))) + "\n")
    return path


def _wheel_info(path: Path) -> dict:
    name, version, *rest = path.name[:-4].split("-")
    return dict(file=path.name, name=_norm(name), version=version, tags="-".join(rest[-3:]),
                sha256=sha256(path), size=path.stat().st_size)


def _glibc_needed(wheels: list) -> str:
    """The newest glibc any wheel asks for: manylinux tags, and for our own wheel the build machine's."""
    need = (2, 17)
    for w in wheels:
        for m in re.finditer(r"manylinux_(\d+)_(\d+)", w["tags"]):
            need = max(need, (int(m[1]), int(m[2])))
        if w["tags"].endswith("linux_x86_64") and "manylinux" not in w["tags"]:
            libc = platform.libc_ver()[1]
            if libc:
                need = max(need, tuple(int(x) for x in libc.split(".")[:2]))
    return f"{need[0]}.{need[1]}"


def build_wheelhouse(out: Path, extras: list, options: dict, fresh: bool = False, log=print) -> dict:
    t0 = time.monotonic()
    llama = llama_wheel(options, log=log)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        tmp = Path(tmp)
        stage = tmp / "wheels"
        stage.mkdir()
        shutil.copy2(llama, stage)
        log("samf's wheel")
        pip = [sys.executable, "-m", "pip"]
        run = subprocess.run(pip + ["wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp / "samf"),
                                    str(ROOT)], capture_output=True, text=True)
        if run.returncode != 0:
            raise BuildError(f"pip wheel samf failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
        shutil.copy2(next((tmp / "samf").glob("samf-*.whl")), stage)
        reqs = requirements(extras) + _wheel_requires(llama)
        log(f"dependencies, binary wheels only: {len(reqs)} requirements")
        cmd = pip + ["download", "--quiet", "--only-binary", ":all:", "-d", str(stage)] + reqs
        if not fresh:
            cmd += ["-c", str(_constraints(tmp / "constraints.txt"))]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise BuildError(f"pip download failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
        wheels = sorted(stage.glob("*.whl"))
        if not extras or "train" not in extras:
            bad = [w.name for w in wheels if _norm(w.name.split("-")[0]) in TRAINING_ONLY]
            if bad:
                raise BuildError(f"the runtime wheelhouse would hold {', '.join(bad)}: something requires them")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for w in wheels:
            shutil.copy2(w, out)
    infos = [_wheel_info(out / w.name) for w in wheels]
    samf = next(w for w in infos if w["name"] == "samf")
    pyver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    lock = [f"# samf {samf['version']} with {', '.join(extras) or 'no extras'}: every wheel, pinned and hashed.",
            "# pip install --no-index --find-links . --only-binary :all: --require-hashes -r requirements.txt"]
    lock += [f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}" for w in infos]
    (out / "requirements.txt").write_text("\n".join(lock) + "\n")
    (out / "SHA256SUMS").write_text("".join(f"{w['sha256']}  {w['file']}\n" for w in infos))
    with zipfile.ZipFile(llama) as z:
        native = json.loads(z.read("llama_cpp/lib/samf-build.json"))
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
                            capture_output=True, text=True).stdout.strip() or None
    manifest = dict(samf=samf["version"], samf_commit=commit, extras=extras,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    python=pyver, platform=f"{platform.system()} {platform.machine()}",
                    glibc_min=_glibc_needed(infos), llama_cpp=native,
                    size_bytes=sum(w["size"] for w in infos), wheels=infos)
    (out / "MANIFEST").write_text(json.dumps(manifest, indent=1) + "\n")
    script = (ROOT / "deploy" / "install.sh").read_text()
    for k, v in dict(PYTHON=pyver, SYSTEM=platform.system(), MACHINE=platform.machine(), GLIBC=manifest["glibc_min"],
                     SAMF=samf["version"]).items():
        script = script.replace(f"@{k}@", v)
    (out / "install.sh").write_text(script)
    (out / "install.sh").chmod(0o755)
    log(f"{out}: {len(infos)} wheels, {manifest['size_bytes'] / 1e6:.0f} MB, in {time.monotonic() - t0:.0f} s")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("llama-wheel", "build"):
        p = sub.add_parser(name)
        p.add_argument("--native", action="store_true", help="one CPU backend for this machine (-march=native)")
        p.add_argument("--cuda", action="store_true", help="ggml's CUDA backend too (needs the CUDA toolkit)")
        p.add_argument("--vulkan", action="store_true", help="ggml's Vulkan backend too (needs the Vulkan SDK)")
        if name == "llama-wheel":
            p.add_argument("--sdist", help="llama-cpp-python's source release, when pip cannot download it")
        else:
            p.add_argument("--out", default=str(ROOT / "dist" / "wheelhouse"))
            p.add_argument("--extras", default="serve", help="samf's extras, comma-separated (default: serve)")
            p.add_argument("--fresh", action="store_true", help="the newest dependencies, not this environment's")
    a = ap.parse_args(argv)
    options = dict(cpu_all_variants=not a.native, cuda=a.cuda, vulkan=a.vulkan)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if a.cmd == "llama-wheel":
            print(llama_wheel(options, sdist=a.sdist, log=log))
        else:
            extras = sorted({e.strip() for e in a.extras.split(",") if e.strip()} | {"serve"})
            build_wheelhouse(Path(a.out).resolve(), extras, options, fresh=a.fresh, log=log)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
