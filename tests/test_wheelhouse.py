"""The air-gapped install (issue 29): `make wheelhouse`'s folder installs into a fresh venv with no network at all
(a network namespace of its own, `unshare -n`) and no compiler, and that install reports as the development one
does; a changed wheelhouse, another Python or another machine installs nothing and says why in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MB = 400  # the runtime wheelhouse's floor
INSTALL_S = 180  # the offline install's floor on the 2-core machine
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "cmake", "ninja", "make")

pytestmark = pytest.mark.slow


def _offline_ok():
    if os.geteuid() != 0:
        return "needs root for unshare -n (a network namespace of its own)"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        return "unshare -n is not available here"
    return None


def offline(cmd: list, **kw) -> subprocess.CompletedProcess:
    """``cmd`` in a network namespace of its own: no interface but a loopback that is down."""
    return subprocess.run(["unshare", "-n"] + cmd, capture_output=True, text=True, **kw)


def venv(path: Path, python: str = sys.executable) -> Path:
    subprocess.run([python, "-m", "venv", str(path)], check=True)
    return path / "bin"


def shims(folder: Path) -> Path:
    """Compilers that leave a mark and fail: the install must run none of them."""
    folder.mkdir()
    for name in COMPILERS:
        (folder / name).write_text(f"#!/bin/sh\necho {name} >> {folder}/called\nexit 1\n")
        (folder / name).chmod(0o755)
    return folder


def install(house: Path, bin_dir: Path, shim: Path, pre: list = ()) -> tuple:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "VIRTUAL_ENV"}
    env["PATH"] = f"{bin_dir}:{shim}:/usr/bin:/bin"
    t0 = time.monotonic()
    out = offline(list(pre) + ["sh", str(house / "install.sh")], env=env, timeout=900)
    return out, time.monotonic() - t0


def installed(bin_dir: Path, name: str) -> bool:
    return subprocess.run([str(bin_dir / "python"), "-c", f"import {name}"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def house(tmp_path_factory) -> Path:
    """`make wheelhouse`'s build (the portable llama-cpp-python from its cache, or compiled once)."""
    why = _offline_ok()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("wheelhouse") / "wheelhouse"
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "wheelhouse.py"), "build", "--out", str(out)],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_wheelhouse_installs_offline_and_reports_as_the_development_install(house, quick, tmp_path):
    manifest = json.loads((house / "MANIFEST").read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert {"samf", "llama-cpp-python", "onnxruntime", "fastapi", "uvicorn", "highdicom"} <= names
    assert not names & {"torch", "transformers", "peft"}  # the runtime never imports them
    assert manifest["size_bytes"] <= LIMIT_MB * 1e6
    assert sum(p.stat().st_size for p in house.iterdir()) <= LIMIT_MB * 1e6
    assert manifest["llama_cpp"]["options"]["GGML_NATIVE"] == "OFF"
    assert manifest["llama_cpp"]["options"]["GGML_CPU_ALL_VARIANTS"] == "ON"
    lock = (house / "requirements.txt").read_text()
    assert all(f"--hash=sha256:{w['sha256']}" in lock for w in manifest["wheels"])

    bin_dir, shim = venv(tmp_path / "venv"), shims(tmp_path / "shims")
    out, seconds = install(house, bin_dir, shim)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert not (shim / "called").exists(), (shim / "called").read_text()
    assert seconds <= INSTALL_S, f"the offline install took {seconds:.0f} s"
    print(f"offline install: {seconds:.1f} s, {manifest['size_bytes'] / 1e6:.0f} MB")
    assert not installed(bin_dir, "torch")

    scan = os.path.join(quick.data, quick.test[0].image)
    args = ["report", scan, "--bundle", quick.bundle, "--json"]
    there = offline([str(bin_dir / "samf")] + args, timeout=600)
    assert there.returncode == 0, there.stderr[-3000:]
    here = subprocess.run([shutil.which("samf")] + args, capture_output=True, text=True, timeout=600)
    assert here.returncode == 0, here.stderr[-3000:]
    assert json.loads(there.stdout)["report"] == json.loads(here.stdout)["report"]
    assert json.loads(there.stdout)["new_tokens"] == json.loads(here.stdout)["new_tokens"]


def test_a_changed_wheel_is_refused_by_the_hash_check(house, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(house, changed, copy_function=os.link)  # hard links: only the changed file is new
    wheel = next(changed.glob("samf-*.whl"))
    data = wheel.read_bytes()
    wheel.unlink()
    wheel.write_bytes(data + b"\0")  # still a valid zip, another SHA-256
    bin_dir, shim = venv(tmp_path / "venv"), shims(tmp_path / "shims")

    out, _ = install(changed, bin_dir, shim)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: "), out.stderr
    assert "differs from SHA256SUMS" in out.stderr
    assert not installed(bin_dir, "samf") and not installed(bin_dir, "llama_cpp")

    # pip's own check, without install.sh's: the lock's hashes refuse it too, and nothing is installed.
    (changed / "SHA256SUMS").unlink()
    pip = offline([str(bin_dir / "python"), "-m", "pip", "--isolated", "install", "--no-index", "--find-links",
                   str(changed), "--require-hashes", "-r", str(changed / "requirements.txt")],
                  env={**os.environ, "PIP_CONFIG_FILE": "/dev/null"}, timeout=600)
    assert pip.returncode != 0
    assert "DO NOT MATCH THE HASHES" in pip.stderr
    assert not installed(bin_dir, "samf") and not installed(bin_dir, "numpy")


def _other_python() -> str | None:
    """A Python 3 of another minor version than this one that can make a venv: one pyenv installed, or on PATH."""
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.*/bin/python3")
                   if not p.parent.parent.name.startswith(mine + "."))
    found += [shutil.which(f"python3.{n}") for n in range(8, 15) if f"3.{n}" != mine]
    return next((p for p in found if p and subprocess.run([p, "-c", "import venv, ensurepip"],
                                                           capture_output=True).returncode == 0), None)


def test_another_python_or_machine_is_one_line_and_installs_nothing(house, tmp_path):
    shim = shims(tmp_path / "shims")
    other = _other_python()
    if other is None:
        pytest.skip("no Python other than this one's version to try")
    bin_dir = venv(tmp_path / "other", other)
    out, _ = install(house, bin_dir, shim)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "this wheelhouse is for Python" in out.stderr, out.stderr
    assert not installed(bin_dir, "samf")

    bin_dir = venv(tmp_path / "venv")
    out, _ = install(house, bin_dir, shim, pre=["setarch", "i686"])  # uname -m says i686
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "this machine is Linux i686" in out.stderr, out.stderr
    assert not installed(bin_dir, "samf")
