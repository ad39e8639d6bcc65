"""The fuzz suite: several hundred seeded hostile and valid inputs (tests/fuzz_cases.py) through the real CLI.

Every case ends in a valid result, or in exit 2 with exactly one ``error:`` line; never a traceback, never
past 60 s, never above 2 GB of RSS, and nothing that should be refused is accepted. A few cases of each family
(picked by a hash of their name, so the same ones every run) are fast tests; the rest are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass

import fuzz_cases
import pytest
from cli_runner import MODULES

TIMEOUT_S = 60
MAX_RSS_BYTES = 2 << 30
FAST_PER_FAMILY = 4  # cases of each family that run in `make test` (each is a fresh process, ~0.4 s)


@dataclass
class Outcome:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    max_rss_bytes: int


def run_measured(argv: list, cwd: str, env: dict, timeout: float = TIMEOUT_S) -> Outcome:
    """Run a console script in a fresh interpreter, killed after ``timeout``. Its peak RSS is its own VmHWM,
    written at exit (wait4's ru_maxrss would start at the size of this pytest process, which spawned it)."""
    tool, *args = argv
    out_path, err_path = os.path.join(cwd, ".stdout"), os.path.join(cwd, ".stderr")
    hwm_path = os.path.join(cwd, ".vmhwm")
    code = ("import atexit, sys\n"
            "def _hwm():\n"
            "    line = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
            f"    open({hwm_path!r}, 'w').write(line.split()[1])\n"
            "atexit.register(_hwm)\n"
            f"from samf.cli.{MODULES[tool]} import main; sys.exit(main())")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        status = rusage = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, rusage = os.wait4(proc.pid, 0)
                status = None
                break
            time.sleep(0.02)
        proc.returncode = 0  # reaped here; keep Popen from waiting on it again
    seconds = time.monotonic() - t0
    read = lambda p: open(p, "rb").read().decode("utf-8", "replace")  # noqa: E731
    code = None if status is None else os.waitstatus_to_exitcode(status)
    try:
        peak = int(open(hwm_path).read()) * 1024
    except (OSError, ValueError):  # killed, or left without the interpreter's exit: the upper bound
        peak = rusage.ru_maxrss * 1024
    return Outcome(code, read(out_path), read(err_path), seconds, peak)


@pytest.fixture(scope="session")
def fuzz_context(quick, tmp_path_factory) -> fuzz_cases.Context:
    from samf.runtime.bundle.signature import sign_manifest, write_keypair
    from samf.runtime.scan.ct import save_nifti
    from samf.runtime.tools.phantom import make_phantom

    root = tmp_path_factory.mktemp("fuzz-shared")
    scan = str(root / "scan.nii.gz")
    ph = make_phantom(11)
    save_nifti(scan, ph.volume, ph.spacing)
    trusted, _ = write_keypair(str(root / "site.key"))
    other, _ = write_keypair(str(root / "other.key"))
    signed = str(root / "signed-bundle")
    shutil.copytree(quick.bundle, signed)
    with open(os.path.join(signed, "manifest.json"), "rb") as f:
        sign_manifest(signed, f.read(), str(root / "site.key"))
    return fuzz_cases.Context(bundle=quick.bundle, signed_bundle=signed, trusted_key=trusted, other_key=other,
                              scan=scan)


CASES = fuzz_cases.generate()


def _fast_ids(cases) -> set:
    """Of each family, FAST_PER_FAMILY cases by the hash of their name: the first of each expectation (valid,
    hostile, either), then the next ones."""
    by_family = {}
    for c in sorted(cases, key=lambda c: zlib.crc32(c.id.encode())):
        by_family.setdefault(c.family, []).append(c)
    fast = set()
    for ranked in by_family.values():
        firsts = [next(c for c in ranked if c.expect == e) for e in sorted({c.expect for c in ranked})]
        picked = (firsts + [c for c in ranked if c not in firsts])[:FAST_PER_FAMILY]
        fast |= {c.id for c in picked}
    return fast


FAST = _fast_ids(CASES)


def _param(case):
    return pytest.param(case, id=case.id, marks=() if case.id in FAST else pytest.mark.slow)


def check(case: fuzz_cases.Case, res: Outcome) -> None:
    where = f"{case.id}: rc={res.returncode} after {res.seconds:.1f} s\n{res.stderr[-2000:]}"
    assert res.returncode is not None, f"hung (killed after {TIMEOUT_S} s): {where}"
    assert "Traceback" not in res.stderr, f"traceback: {where}"
    assert res.max_rss_bytes < MAX_RSS_BYTES, f"{res.max_rss_bytes / 2**30:.2f} GB RSS: {where}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    refused = res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    if case.expect == "accept":
        assert res.returncode == 0, f"a valid input was refused: {where}"
    elif case.expect == "refuse":
        assert res.returncode != 0, f"garbage accepted: {where}"
        assert refused, f"not one clean error line with exit 2: {where}"
        for w in case.words:
            assert w in lines[0], f"{w!r} not in the error: {where}"
    else:
        assert res.returncode == 0 or refused, f"neither a result nor one clean error: {where}"


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_fuzz_case(case, fuzz_context, tmp_path):
    folder = str(tmp_path)
    argv = case.make(folder, fuzz_context)
    env = {**os.environ, **case.env}
    res = run_measured(argv, folder, env)
    record = os.environ.get("SAMF_FUZZ_RECORD")  # a JSONL file: one line per case, for the README's table
    if record:
        with open(record, "a") as f:
            f.write(json.dumps(dict(id=case.id, family=case.family, expect=case.expect, rc=res.returncode,
                                    seconds=round(res.seconds, 3), max_rss_mb=res.max_rss_bytes >> 20,
                                    traceback="Traceback" in res.stderr)) + "\n")
    check(case, res)


def test_the_suite_is_large_and_covers_every_family():
    by_family = {}
    for c in CASES:
        by_family.setdefault(c.family, []).append(c.expect)
    assert len(CASES) >= 300
    assert set(by_family) == {"nifti-header", "nifti-bytes", "npy", "dicom", "values", "cli", "bundle"}
    assert all("refuse" in e and "accept" in e for e in by_family.values())
