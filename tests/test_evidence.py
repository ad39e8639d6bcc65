"""The slices that mattered: the fusion's attention as evidence, from `samf report --evidence`, the JSON, and an
older bundle's fusion that has none."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from cli_runner import invoke_cli, run_cli
from PIL import Image

from samf.runtime.inference.evidence import Evidence
from samf.runtime.outputs.evidence_png import RANK_COLOURS, evidence_montage
from samf.runtime.scan.ct import load_scan
from samf.runtime.scan.preprocess import PLANES, PreprocessConfig, SlicePlacement, place_slices
from samf.runtime.tools.phantom import make_phantom, sample_findings


def _one_line_failure(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_report_evidence_writes_the_top_slices_and_says_the_same_in_json(quick, tmp_path):
    scan = os.path.join(quick.data, quick.test[0].image)
    r = run_cli("samf", "report", scan, "--bundle", quick.bundle, "--quant", "F32", "--encoders", "fp32",
                "--max-tokens", "8", "--json", "--evidence", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    said = json.loads(r.stdout)["evidence"]
    folder = tmp_path / "ev" / os.path.basename(scan)[: -len(".nii.gz")]
    with open(folder / "evidence.json") as f:
        written = json.load(f)
    alpha, gamma = np.array(said["alpha"]), np.array(said["gamma"])
    assert abs(alpha.sum() - 1) < 1e-4 and abs(gamma.sum() - 1) < 1e-4
    assert said["ranking"] == "mean of alpha and gamma" and written["alpha"] == said["alpha"]
    S = len(alpha) // 3
    files = set(os.listdir(folder))
    with open(os.path.join(quick.bundle, "manifest.json")) as f:
        placement = place_slices(load_scan(scan), PreprocessConfig.from_dict(json.load(f)["preprocess"]))
    for p, plane in enumerate(PLANES):
        top = said["top"][plane]
        score = (alpha + gamma)[p * S:(p + 1) * S]
        ranked = [score[e["slice"]] for e in top]                  # best first (the JSON's 6 digits: 1e-5)
        assert all(a >= b - 1e-5 for a, b in zip(ranked, ranked[1:]))
        rest = [score[k] for k in range(S) if k not in {e["slice"] for e in top}]
        assert max(rest) <= min(ranked) + 1e-5
        assert [e["rank"] for e in top] == [1, 2, 3]
        for e, w in zip(top, written["top"][plane]):
            assert {k: v for k, v in w.items() if k != "png"} == e
            assert w["png"] == f"{plane}_top{e['rank']}_slice{e['slice']:02d}.png" and w["png"] in files
            assert e["alpha"] == pytest.approx(alpha[p * S + e["slice"]], abs=1e-6)
            position = placement.positions[p, e["slice"]]  # a thin slice reads its two voxels, a slab all of it
            half = 0.0 if placement.thin else placement.step[p] / 2
            assert e["voxels"] == [int(np.floor(position - half)), int(np.ceil(position + half))]
    assert files == {"evidence.json", "montage.png"} | {w["png"] for t in written["top"].values() for w in t}
    montage = np.asarray(Image.open(folder / "montage.png"))
    assert montage.ndim == 3 and montage.shape[2] == 3
    rows = np.array_split(montage, 3, axis=0)
    for row in rows:  # each plane's row frames its best slice in the rank-1 colour
        assert (row == RANK_COLOURS[0]).all(axis=2).any()


def _without_attention(src: str, dst: str) -> str:
    """A copy of bundle ``src`` whose fusion.onnx outputs the fused rows only, as bundles exported before the
    attention outputs did, resealed."""
    import onnx

    from samf.runtime.bundle.bundle import sha256_of
    from samf.runtime.bundle.manifest import seal

    shutil.copytree(src, dst)
    path = os.path.join(dst, "fusion.onnx")
    model = onnx.load(path)
    keep = [o for o in model.graph.output if o.name == "fused"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    os.remove(path)
    onnx.save(model, path)
    with open(os.path.join(dst, "manifest.json")) as f:
        m = json.load(f)
    m["files"]["fusion.onnx"] = dict(sha256=sha256_of(path), size=os.path.getsize(path))
    m["io_signature"]["fusion"]["outputs"] = {"fused": m["io_signature"]["fusion"]["outputs"]["fused"]}
    os.remove(os.path.join(dst, "manifest.json"))  # copytree kept the original's mode: replace, not overwrite
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump(seal(m), f, indent=2)
    return dst


def test_an_older_bundle_reports_but_has_no_evidence(quick, tmp_path):
    bundle = _without_attention(quick.bundle, str(tmp_path / "older"))
    scan = os.path.join(quick.data, quick.test[0].image)
    common = ("--bundle", bundle, "--quant", "F32", "--encoders", "fp32", "--max-tokens", "8")
    r = invoke_cli("samf", "report", scan, *common, "--json")  # in-process: see invoke_cli
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["evidence"] is None and out["report"]
    r = invoke_cli("samf", "report", scan, *common, "--evidence", str(tmp_path / "ev"))
    _one_line_failure(r, "no attention", "samf-export bundle")
    assert not (tmp_path / "ev").exists()


def test_a_batch_writes_each_scans_evidence_and_each_series_sr(quick, tmp_path):
    """--evidence and --dicom-out over several scans: a folder per scan (same names as --out's files), the SR and
    PDF for the DICOM series only, and rows that say where they went."""
    from dicom_writer import PATIENT, write_series

    series = str(tmp_path / "series")
    ph = make_phantom(33, shape=(24, 40, 40), spacing=(8.0, 9.0, 9.0))
    write_series(series, ph.volume, ph.spacing, patient=PATIENT)
    niftis = [os.path.join(quick.data, ex.image) for ex in quick.test[:2]]
    ev, dcm, out = (str(tmp_path / d) for d in ("ev", "dcm", "out"))
    r = invoke_cli("samf", "report", *niftis, series, "--bundle", quick.bundle, "--quant", "F32", "--max-tokens",
                   "8", "--out", out, "--evidence", ev, "--dicom-out", dcm)
    assert r.returncode == 0, r.stderr
    names = [os.path.basename(n)[: -len(".nii.gz")] for n in niftis] + ["series"]
    assert sorted(os.listdir(ev)) == sorted(names)
    for name in names:
        assert {"evidence.json", "montage.png"} <= set(os.listdir(os.path.join(ev, name)))
    assert os.listdir(dcm) == ["series"] and sorted(os.listdir(os.path.join(dcm, "series"))) == [
        "report_pdf.dcm", "sr.dcm"]
    assert r.stderr.count("not a DICOM series folder") == 2
    rows = {json.loads(line)["input"]: json.loads(line) for line in open(os.path.join(out, "reports.jsonl"))}
    assert rows[series]["dicom_out"] == [os.path.join(dcm, "series", f) for f in ("sr.dcm", "report_pdf.dcm")]
    assert all(rows[n]["evidence_dir"] == os.path.join(ev, m) for n, m in zip(niftis + [series], names))
    with open(os.path.join(ev, "series", "evidence.json")) as f:
        assert [s["plane"] for s in json.load(f)["source_images"]] == ["axial"] * 3
    # Outputs that cannot be written fail their scan's row, and what was written for it is removed: here the
    # series' SR cannot go where a file already has its folder's name, so its evidence folder goes too.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "series").write_text("")
    r = invoke_cli("samf", "report", niftis[0], series, "--bundle", quick.bundle, "--quant", "F32", "--max-tokens",
                   "8", "--evidence", str(tmp_path / "ev3"), "--dicom-out", str(blocked))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert os.listdir(tmp_path / "ev3") == [names[0]]
    # An older bundle: the batch refuses before reading any scan, and leaves no output folder.
    older = _without_attention(quick.bundle, str(tmp_path / "older"))
    r = invoke_cli("samf", "report", *niftis, "--bundle", older, "--evidence", str(tmp_path / "ev2"),
                   "--out", str(tmp_path / "out2"))
    _one_line_failure(r, "no attention")
    assert not (tmp_path / "ev2").exists() and not (tmp_path / "out2").exists()


def test_montage_frames_each_planes_best_slices_by_rank():
    S, H = 4, 16
    alpha = np.full(3 * S, 1.0 / (3 * S))
    alpha[[2, S + 0, 2 * S + 3]] += 0.05   # each plane's best slice
    alpha[[1, S + 3, 2 * S + 1]] += 0.02   # each plane's second
    alpha /= alpha.sum()
    placement = SlicePlacement(positions=np.tile(np.arange(S) + 0.5, (3, 1)), step=np.ones(3), centre=np.zeros(3),
                               spacing=(1.0, 1.0, 1.0), thin=True)
    ev = Evidence(alpha=alpha, gamma=None, placement=placement)
    assert ev.ranking == "alpha" and [ev.top(p, 2) for p in range(3)] == [[2, 1], [0, 3], [3, 1]]
    img = evidence_montage(np.zeros((3 * S, 3, H, H), np.float32), ev, n=2)
    tile_h, tile_w = img.shape[0] // 3, img.shape[1] // S
    for p, (best, second) in enumerate([[2, 1], [0, 3], [3, 1]]):
        for k in range(S):
            corner = tuple(img[p * tile_h, k * tile_w])
            want = RANK_COLOURS[0] if k == best else RANK_COLOURS[1] if k == second else (32, 32, 32)
            assert corner == want, (p, k, corner)


def test_phantom_masks_change_nothing_and_sit_where_the_finding_is():
    seed = next(s for s in range(100) if (f := sample_findings(np.random.default_rng(s))).nodule
                and f.effusion in ("left", "right"))
    plain = make_phantom(seed)
    masked = make_phantom(seed, with_masks=True)
    assert len(masked.masks) == 2
    assert np.array_equal(plain.volume, masked.volume) and plain.report == masked.report
    assert masked.masks.keys() == {k for k, present in (
        ("nodule", masked.findings.nodule), ("effusion_left", masked.findings.effusion in ("left", "bilateral")),
        ("effusion_right", masked.findings.effusion in ("right", "bilateral"))) if present}
    for name, mask in masked.masks.items():
        assert mask.shape == masked.volume.shape and mask.any()
        value = 30.0 if name == "nodule" else 15.0       # the finding's HU, before noise
        assert abs(float(np.median(masked.volume[mask])) - value) < 60, name


@pytest.mark.parametrize("spacing", [None, (5.0, 4.0, 3.0)])
def test_slice_locations_follow_the_files_affine_and_a_given_spacing(tmp_path, spacing):
    """A NIfTI stored left-posterior-superior with an offset origin: each slice's patient point (LPS) is the file's
    own affine applied to the voxel the slice is at; with --spacing, the same directions at the given sizes."""
    import nibabel as nib

    ph = make_phantom(3, shape=(40, 48, 56), spacing=(5.0, 4.0, 4.0))
    data = ph.volume.transpose(2, 1, 0)[::-1, ::-1, :]        # [i, j, k]: i toward the left, j posterior, k up
    X, Y, _ = data.shape
    affine = np.array([[-4.0, 0, 0, 10.0], [0, -4.0, 0, 20.0], [0, 0, 5.0, -30.0], [0, 0, 0, 1]])
    path = str(tmp_path / "lps.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(np.int16), affine), path)
    vol = load_scan(path, spacing=spacing)
    step = np.array([5.0, 4.0, 4.0] if spacing is None else spacing)[::-1]  # sizes along i, j, k
    file_affine = np.diag([-step[0], -step[1], step[2], 1.0])
    file_affine[:3, 3] = affine[:3, 3]
    placement = place_slices(vol, PreprocessConfig(image_size=32, pixel_spacing_mm=8.0, slices_per_plane=5))
    for plane in range(3):
        for k in range(5):
            zyx = placement.centre.copy()
            zyx[plane] = placement.positions[plane, k]                     # the slice's centre, canonical
            ijk = np.array([X - 1 - zyx[2], Y - 1 - zyx[1], zyx[0], 1.0])   # canonical -> the file's voxel
            ras = file_affine @ ijk
            want = ras[:3] * [-1, -1, 1]
            assert np.allclose(placement.patient_point(plane, k), want, atol=1e-6), (plane, k)
    # The planes' normals in LPS: axial +S, coronal toward anterior (-P), sagittal toward the right (-L).
    assert np.allclose([placement.patient_normal(p) for p in range(3)], [[0, 0, 1], [0, -1, 0], [-1, 0, 0]])


def test_a_volume_without_a_position_is_located_from_its_first_voxel():
    S = 4
    placement = SlicePlacement(positions=np.array([[1.5, 3.5, 5.5, 7.5]] * 3), step=np.full(3, 2.0),
                               centre=np.full(3, 4.0), spacing=(2.0, 1.0, 0.5), thin=True)
    ev = Evidence(alpha=np.full(3 * S, 1.0 / (3 * S)), gamma=None, placement=placement)
    assert ev.to_dict()["positioned"] is False
    assert [(ev.describe(p, 1)["location_axis"], ev.describe(p, 1)["location_mm"]) for p in range(3)] == [
        ("Z", 7.0), ("Y", 3.5), ("X", 1.75)]
    assert ev.describe(0, 1)["voxels"] == [3, 4]
