"""Bad input gets one line on stderr, a non-zero exit, no traceback; nothing the user had is damaged."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest
from cli_runner import invoke_cli, run_cli

from samf.runtime.inference.pipeline import RECORD_FIELDS
from samf.runtime.scan.ct import save_nifti
from samf.runtime.tools.phantom import make_phantom
from samf.train.run_files import MERGED_DIR


def samf(*args):
    """``samf ARGS`` in this process: these tests are of the message and the exit code. The ones whose process
    matters (its start, a hang, its threads), and one of each command, run it in a fresh interpreter (run_cli)."""
    return invoke_cli("samf", *args)


def assert_clean_failure(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def good_scan(tmp_path_factory):
    p = tmp_path_factory.mktemp("scan") / "ok.nii.gz"
    ph = make_phantom(5)
    save_nifti(str(p), ph.volume, ph.spacing)
    return str(p)


def test_missing_scan(tmp_path):
    assert_clean_failure(run_cli("samf", "report", str(tmp_path / "nope.nii.gz"), "--bundle", str(tmp_path)),
                         "not found")


def test_not_a_ct_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    assert_clean_failure(samf("report", str(p), "--bundle", str(tmp_path)), "unsupported")


def test_nifti_that_is_not_ct(tmp_path):
    p = tmp_path / "mri.nii.gz"
    save_nifti(str(p), np.random.default_rng(0).uniform(0, 800, (20, 20, 20)).astype(np.float32), (2, 2, 2))
    assert_clean_failure(run_cli("samf", "info", str(p)), "do not look like CT")


def test_corrupt_nifti(tmp_path, good_scan):
    raw = open(good_scan, "rb").read()
    p = tmp_path / "truncated.nii.gz"
    p.write_bytes(raw[: len(raw) // 3])
    assert_clean_failure(samf("report", str(p), "--bundle", str(tmp_path)), "cannot read NIfTI")
    q = tmp_path / "garbage.nii.gz"
    q.write_bytes(gzip.compress(b"\x00" * 100))
    assert_clean_failure(samf("info", str(q)), "cannot read NIfTI")


def test_folder_without_a_bundle(tmp_path, good_scan):
    assert_clean_failure(samf("report", good_scan, "--bundle", str(tmp_path)), "not a samf bundle")


def test_info_describes_a_scan(good_scan):
    proc = samf("info", good_scan)
    assert proc.returncode == 0, proc.stderr
    assert "(64, 96, 96)" in proc.stdout and "nifti" in proc.stdout


@pytest.fixture()
def bundle_copy(quick, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(quick.bundle, dst)
    return dst


def test_bundle_missing_artifact(bundle_copy, good_scan):
    os.remove(bundle_copy / "fusion.onnx")
    assert_clean_failure(samf("report", good_scan, "--bundle", str(bundle_copy)), "missing artifact fusion.onnx")


@pytest.mark.parametrize("encoders", ["fp32", "auto"])
def test_bundle_altered_artifact(bundle_copy, good_scan, encoders):
    """The ViT the report loads is hashed as it is opened: the fp32 one, or with auto on a CPU the int8 one
    where the bundle kept it."""
    name = "vit-int8.onnx" if encoders == "auto" and (bundle_copy / "vit-int8.onnx").exists() else "vit.onnx"
    p = bundle_copy / name
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    assert_clean_failure(samf("report", good_scan, "--bundle", str(bundle_copy), "--encoders", encoders), name,
                         "sha256")


def test_bundle_truncated_artifact(bundle_copy, good_scan):
    p = bundle_copy / "llm-Q8_0.gguf"
    p.write_bytes(p.read_bytes()[:1000])
    assert_clean_failure(samf("report", good_scan, "--bundle", str(bundle_copy)), "llm-Q8_0.gguf", "bytes")


def test_bundle_of_another_schema(bundle_copy, good_scan):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    assert_clean_failure(samf("report", good_scan, "--bundle", str(bundle_copy)), "schema")


def test_unknown_quant(quick, good_scan):
    assert_clean_failure(samf("report", good_scan, "--bundle", quick.bundle, "--quant", "Q2_K"), "no Q2_K")


def test_report_runs_from_the_bundle(quick, good_scan):
    proc = run_cli("samf", "report", good_scan, "--bundle", quick.bundle, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # The input's path around the result record (Result.to_record): the names the batch and the service use.
    assert list(out) == ["path", "input", *(f for f in RECORD_FIELDS if f != "choice_nll")]  # not a question
    assert out["path"] == os.path.abspath(good_scan) and out["input"] == good_scan
    assert out["report"] and out["new_tokens"] > 0 and out["encoders"] == out["identity"]["encoder_precision"]
    assert {"preprocess", "vit", "aggregator", "fusion", "llm_prefill", "llm_decode"} <= set(out["timings"])
    assert out["scan"]["format"] == "nifti" and len(out["scan"]["shape"]) == 3


def test_tensorrt_backend_without_tensorrt(quick, good_scan):
    assert_clean_failure(samf("report", good_scan, "--bundle", quick.bundle, "--backend", "tensorrt"),
                         "TensorRT is not available")


def test_export_never_replaces_a_folder_that_is_not_a_bundle(quick, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    proc = run_cli("samf-export", "bundle", quick.merged, "--out", str(mine))
    assert_clean_failure(proc, "not a samf bundle")
    assert (mine / "notes.txt").read_text() == "precious"


def test_bench_reports_stages_and_quantization_cost(quick, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("samf", "bench", "--bundle", quick.bundle, "--data", quick.data, "--scans", "2",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| Q8_0 |" in proc.stdout and "| F32 |" in proc.stdout
    res = json.loads(out.read_text())
    assert {r["quant"] for r in res["runs"]} == {"F32", "Q8_0"}
    assert all(r["reference_nll"] > 0 and r["decode_tok_s"] > 0 for r in res["runs"])
    assert res["runs"][0]["same_report_as_first"] == 1.0


@pytest.mark.parametrize("tool,args", [
    ("samf", ["report"]),                                             # missing argument
    ("samf", ["report", "x.nii.gz", "--bundle", "b", "--max-tokens", "-1"]),  # out of range (gave an empty report)
    ("samf", ["reprot"]),                                             # unknown command
    ("samf", ["report", "x.nii.gz", "--bundle", "b", "--bogus"]),     # unknown option
    ("samf-train", ["finetune", "--run", "r", "--data", "d", "--steps", "many"]),
    ("samf-export", ["synthetic-bundle", "--out", "b", "--layers", "0"]),
])
def test_usage_errors_are_one_line_with_exit_2(tool, args):
    proc = invoke_cli(tool, *args)
    assert proc.returncode == 2
    assert_clean_failure(proc, "error:", "--help")


def test_a_newline_in_a_file_name_cannot_forge_a_second_line(tmp_path):
    proc = samf("report", str(tmp_path / "scan\nerror: forged"), "--bundle", str(tmp_path))
    assert_clean_failure(proc, "not found", "\\nerror: forged")


def test_help_and_version_still_exit_0():
    for args in (["--help"], ["--version"], ["report", "--help"]):
        proc = samf(*args)
        assert proc.returncode == 0 and proc.stdout.strip(), args


def test_telemetry_is_off_before_any_library_loads_unless_the_user_says_otherwise():
    import subprocess
    import sys

    code = ("import os, samf, onnxruntime; "
            "print(os.environ['ORT_DISABLE_TELEMETRY'], os.environ['HF_HUB_DISABLE_TELEMETRY'])")
    env = {k: v for k, v in os.environ.items() if "TELEMETRY" not in k}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "ORT_DISABLE_TELEMETRY": "0"})
    assert out.stdout.split() == ["0", "1"]


# ----------------------------------------------------------------------------- hostile scans (issue 11)

def _nifti(path, data, pixdim=None):
    """A .nii of ``data`` at 4×4×5 mm; ``pixdim`` {index: value} then written over the header's bytes, as a
    broken writer would leave them (nibabel itself will not write a zero or absurd spacing)."""
    import struct

    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 5.0, 1.0])), str(path))
    with open(path, "r+b") as f:
        for i, v in (pixdim or {}).items():
            f.seek(76 + 4 * i)
            f.write(struct.pack("<f", v))
    return str(path)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    assert_clean_failure(run_cli("samf", "info", str(fifo), timeout=30), "not a regular file")


def test_a_flipped_byte_in_a_nii_gz_is_caught(tmp_path, good_scan):
    raw = bytearray(open(good_scan, "rb").read())
    raw[-8] ^= 0x01  # gzip's CRC32 of the data: nibabel alone never reads it
    p = tmp_path / "flipped.nii.gz"
    p.write_bytes(bytes(raw))
    assert_clean_failure(samf("info", str(p)), "corrupt gzip")


def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path, good_scan):
    import nibabel as nib

    huge = tmp_path / "huge.nii"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 1000))
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((1.0, 1.0, 1.0))
    huge.write_bytes(hdr.binaryblock + b"\x00" * 4000)   # 4 KB declaring 2 GB
    assert_clean_failure(samf("info", str(huge)), "declares", "SAMF_MAX_VOXELS")

    ph = make_phantom(5)
    bomb = tmp_path / "bomb.nii.gz"  # a valid scan, then 200 MB of zeros in the same gzip stream
    plain = tmp_path / "plain.nii"
    save_nifti(str(plain), ph.volume, ph.spacing)
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(plain.read_bytes())
        f.write(b"\x00" * (200 << 20))
    proc = samf("info", str(bomb))
    assert_clean_failure(proc, "more data than its header declares")


def test_values_and_headers_no_ct_has_are_refused(tmp_path):
    ph = make_phantom(5)
    vol = np.ascontiguousarray(ph.volume.transpose(2, 1, 0))  # nibabel's [X, Y, Z]
    cases = {
        "complex": (_nifti(tmp_path / "c.nii", vol.astype(np.complex64)), "not real numbers"),
        "zero pixdim": (_nifti(tmp_path / "z.nii", vol.astype(np.int16), pixdim={2: 0.0}), "--spacing"),
        "1e38 mm voxels": (_nifti(tmp_path / "b.nii", vol.astype(np.int16), pixdim={1: 1e38}), "--spacing"),
        "3x3x3": (_nifti(tmp_path / "t.nii", vol[:3, :3, :3].astype(np.int16)), "too small"),
        "negated": (_nifti(tmp_path / "n.nii", (-vol).astype(np.int16)), "--force"),
        "noise": (_nifti(tmp_path / "u.nii", np.random.default_rng(0).uniform(-1024, 1500, vol.shape)
                         .astype(np.int16)), "--force"),
    }
    for name, (path, words) in cases.items():
        proc = samf("info", path)
        assert proc.returncode == 2, name
        assert_clean_failure(proc, words)
    ok = samf("info", cases["zero pixdim"][0], "--spacing", "5", "4", "4")
    assert ok.returncode == 0, ok.stderr
    forced = samf("info", cases["negated"][0], "--force")
    assert forced.returncode == 0, forced.stderr


def test_options_that_do_not_apply_to_the_input_are_refused(good_scan, tmp_path):
    assert_clean_failure(samf("info", good_scan, "--series", "1.2.3"), "--series applies to a DICOM folder only")
    folder = tmp_path / "dcm"
    folder.mkdir()
    assert_clean_failure(samf("info", str(folder), "--spacing", "1", "1", "1"), "does not apply to a DICOM")


def test_npy_files_that_are_not_what_they_claim(tmp_path):
    ph = make_phantom(5)
    npz = tmp_path / "archive.npy"
    with open(npz, "wb") as f:
        np.savez(f, hu=ph.volume)
    assert_clean_failure(samf("info", str(npz), "--spacing", "5", "4", "4"), "an .npz archive")
    cplx = tmp_path / "complex.npy"
    np.save(cplx, ph.volume.astype(np.complex64))
    assert_clean_failure(samf("info", str(cplx), "--spacing", "5", "4", "4"), "not real-valued")


# ----------------------------------------------------------------------------- the last hostile inputs (issue 30)

def _dicom_folder(folder) -> str:
    from dicom_writer import write_series

    ph = make_phantom(5, shape=(24, 40, 40), spacing=(8.0, 9.0, 9.0))
    write_series(str(folder), ph.volume, (8.0, 9.0, 9.0), shuffle_instance=False)
    return str(folder)


def test_fifos_and_devices_in_a_dicom_folder_are_skipped_unopened(tmp_path):
    """A FIFO in a series folder hung `samf info` and `samf slices` (and a batch's content hash): what is not a
    regular file, or a link to one, is skipped without being opened for reading."""
    from samf.runtime.service.worklist import content_sha256

    folder = _dicom_folder(tmp_path / "dcm")
    plain = content_sha256(folder)
    os.mkfifo(os.path.join(folder, "fifo"))
    os.symlink("fifo", os.path.join(folder, "IMG-link-to-fifo"))
    os.symlink("/dev/zero", os.path.join(folder, "IMG-zero"))
    info = run_cli("samf", "info", folder, timeout=30)
    assert info.returncode == 0 and "images   24" in info.stdout, info.stderr
    out = tmp_path / "out"
    made = run_cli("samf", "slices", folder, "--out", str(out), timeout=30)
    assert made.returncode == 0, made.stderr
    assert len(os.listdir(out / "dcm")) == 75  # 3 planes × 8 slices × 3 windows + 3 montages
    assert content_sha256(folder) == plain and content_sha256(os.path.join(folder, "fifo")) is None
    only = tmp_path / "only"
    only.mkdir()
    os.mkfifo(only / "IMG0")
    assert_clean_failure(run_cli("samf", "info", str(only), timeout=30), "no DICOM")


@pytest.mark.parametrize("out", ["/dev/null", "/dev/null/slices", "a" * 300, "b" * 300 + "/c"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_any_work(good_scan, tmp_path, out):
    """`--out /dev/null` and a 300-character name gave tracebacks; refused in one line, nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    proc = samf("slices", good_scan, "--out", str(work / out))
    assert_clean_failure(proc, "--out", "not a folder" if out.startswith("/dev") else "longer than the")
    assert os.listdir(work) == []


def test_unknown_quant_types_are_refused_before_the_export_starts(tmp_path):
    """`samf-export bundle --quant BOGUS` failed after the ONNX export and the base GGUF were written."""
    import time

    ckpt = tmp_path / MERGED_DIR
    ckpt.mkdir()
    t0 = time.monotonic()
    proc = invoke_cli("samf-export", "bundle", str(ckpt), "--out", str(tmp_path / "b"), "--quant", "Q8_0",
                      "--quant", "BOGUS")
    assert_clean_failure(proc, "--quant", "'BOGUS'", "Q4_K_M")  # not "preprocess.json": nothing was read
    proc = invoke_cli("samf-export", "synthetic-bundle", "--out", str(tmp_path / "s"), "--quant", "q2_k")
    assert_clean_failure(proc, "--quant", "'q2_k'")
    src = tmp_path / "base.gguf"
    src.write_bytes(b"GGUF")
    proc = invoke_cli("samf-export", "quantize", str(src), str(tmp_path / "q.gguf"), "--type", "BOGUS")
    assert_clean_failure(proc, "--type", "'BOGUS'")
    assert sorted(os.listdir(tmp_path)) == ["base.gguf", MERGED_DIR] and os.listdir(ckpt) == []
    assert time.monotonic() - t0 < 30


def test_quant_types_are_read_whatever_their_case():
    import click

    from samf.cli.export_cli import _quant_types

    param = click.Option(["--quant"], multiple=True)
    assert _quant_types(None, param, ("q8_0", "Q4_K_M", "Q8_0")) == ("Q8_0", "Q4_K_M")
    assert _quant_types(None, click.Option(["--type"]), "q6_k") == "Q6_K"


def test_more_threads_than_cores_are_capped_with_a_note(capsys):
    import click

    from samf.cli.common import capped_threads
    from samf.engines.native import usable_cores

    cores = usable_cores()
    assert capped_threads(None) is None and capped_threads(1) == 1 and capped_threads(cores) == cores
    assert capsys.readouterr().err == ""
    assert capped_threads(512) == cores
    assert capsys.readouterr().err.strip() == f"note: --threads 512 is more than the {cores} cores this process " \
                                              f"may use; using {cores}"
    with pytest.raises(click.UsageError, match="at least 1"):
        capped_threads(-3)


def test_a_report_with_512_threads_runs_on_the_cores_there_are(quick, good_scan):
    """`--threads 512` on two cores hung a report under load: the engines get the cores this process may use."""
    from samf.engines.native import usable_cores

    proc = run_cli("samf", "report", good_scan, "--bundle", quick.bundle, "--threads", "512", "--max-tokens", "4",
                   "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note:")]
    assert notes == [f"note: --threads 512 is more than the {usable_cores()} cores this process may use; "
                     f"using {usable_cores()}"]
    assert json.loads(proc.stdout)["report"]


def test_uniform_noise_in_unit_range_is_not_an_m3d_volume(tmp_path):
    noise = tmp_path / "Axial.npy"
    np.save(noise, np.random.default_rng(0).random((1, 32, 256, 256), dtype=np.float32))
    assert_clean_failure(samf("info", str(noise)), "noise, not anatomy", "--force")
    forced = samf("info", str(noise), "--force")
    assert forced.returncode == 0 and "m3d-npy" in forced.stdout, forced.stderr
