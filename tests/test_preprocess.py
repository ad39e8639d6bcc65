"""Shared preprocessing: slice geometry, orientation invariance, windows, refusals."""

import dataclasses

import numpy as np
import pytest

from samf.errors import ScanError
from samf.runtime.scan.ct import Volume, load_scan, save_nifti
from samf.runtime.scan.preprocess import PreprocessConfig, apply_windows, cut_slices, place_slices, preprocess
from samf.runtime.tools.phantom import make_phantom

CFG = PreprocessConfig(image_size=48, pixel_spacing_mm=8.0, slices_per_plane=6)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(11)


def test_shape_range_and_dtype(phantom):
    x = preprocess(Volume(phantom.volume, phantom.spacing, "p"), CFG)
    assert x.shape == (18, 3, 48, 48) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_slices_are_placed_over_the_body_not_the_air(phantom):
    # Pad the scan with 80 mm of air on every side: the same anatomy must be cut.
    v = phantom.volume
    pad = np.full((v.shape[0] + 32, v.shape[1] + 40, v.shape[2] + 40), -1000.0, np.float32)
    pad[16:-16, 20:-20, 20:-20] = v
    a = cut_slices(Volume(v, phantom.spacing, "a"), CFG)
    b = cut_slices(Volume(pad, phantom.spacing, "b"), CFG)
    # Slight differences remain from noise-driven body-box edges; anatomy must agree.
    assert np.mean(np.abs(a - b) < 50) > 0.97


def test_same_slices_whatever_the_file_orientation(phantom, tmp_path):
    import nibabel as nib

    ref_path = tmp_path / "ref.nii.gz"
    save_nifti(str(ref_path), phantom.volume, phantom.spacing)
    ref = cut_slices(load_scan(str(ref_path)), CFG)
    img = nib.load(str(ref_path))
    data = np.asarray(img.dataobj)
    # Flip X and swap the X/Z axes in the array, fixing the affine so the anatomy is unchanged.
    flipped = data[::-1].transpose(2, 1, 0)
    aff = img.affine.copy()
    sx, sy, sz = np.diag(aff)[:3]
    new_aff = np.zeros((4, 4))
    new_aff[0, 2] = -sx
    new_aff[0, 3] = (data.shape[0] - 1) * sx
    new_aff[1, 1] = sy
    new_aff[2, 0] = sz
    new_aff[3, 3] = 1
    p = tmp_path / "permuted.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), new_aff), str(p))
    got = cut_slices(load_scan(str(p)), CFG)
    assert np.allclose(got, ref, atol=1e-3)


def test_windows_become_channels():
    hu = np.array([[[-1000.0, -600.0, 40.0, 1000.0]]], np.float32)
    x = apply_windows(hu, ((-600, 1500), (40, 400)))
    assert x.shape == (1, 2, 1, 4)
    assert np.isclose(x[0, 0, 0, 1], 0.0)          # lung window centre -> 0
    assert np.isclose(x[0, 1, 0, 2], 0.0)          # mediastinal window centre -> 0
    assert x[0, 1, 0, 0] == -1.0 and x[0, 1, 0, 3] == 1.0


def test_refuses_a_scan_too_thin(phantom):
    thin = Volume(phantom.volume[:4], phantom.spacing, "thin")
    with pytest.raises(ScanError, match="too small"):
        preprocess(thin, CFG)


def test_refuses_a_single_slice(tmp_path, phantom):
    """(A NaN voxel: test_m3d's npy refusals.)"""
    np.save(tmp_path / "one.npy", phantom.volume[:1])
    with pytest.raises(ScanError, match="single slice"):
        load_scan(str(tmp_path / "one.npy"), spacing=(5, 4, 4))


def test_slab_modes():
    # A volume that only varies in-plane: every slab mode gives the thin slice back.
    rng = np.random.default_rng(0)
    plane = rng.uniform(-1000, 500, size=(1, 40, 40)).astype(np.float32)
    vol = Volume(np.repeat(plane, 40, axis=0), (4.0, 4.0, 4.0), "flat")
    thin = cut_slices(vol, CFG)[:6]
    for mode in ("mip", "mean"):
        cfg = PreprocessConfig(**{**CFG.to_dict(), "windows": CFG.windows, "slab": mode})
        assert np.allclose(cut_slices(vol, cfg)[:6], thin, atol=1e-3)
    # On a real scan, the maximum over a slab is never below its thin centre slice.
    p = make_phantom(2)
    v = Volume(p.volume, p.spacing, "p")
    mip = cut_slices(v, PreprocessConfig(**{**CFG.to_dict(), "windows": CFG.windows, "slab": "mip",
                                            "slab_samples": 3}))
    assert (mip >= cut_slices(v, CFG) - 1e-3).all()


def test_mean_slab_is_the_mean_of_its_thin_planes():
    """A ``mean`` slice equals the average of the thin slices at its slab's sample planes, taken one by one."""
    p = make_phantom(3)
    v = Volume(p.volume, p.spacing, "p")
    m = 4
    cfg = PreprocessConfig(**{**CFG.to_dict(), "windows": CFG.windows, "slab": "mean", "slab_samples": m})
    placed = place_slices(v, cfg)
    thin = [cut_slices(v, CFG, dataclasses.replace(
        placed, positions=placed.positions + ((j + 0.5) / m - 0.5) * placed.step[:, None])) for j in range(m)]
    mean = cut_slices(v, cfg, placed)
    scale = np.abs(mean).max()
    assert np.abs(mean - np.mean(thin, axis=0)).max() <= 1e-5 * scale
    assert np.abs(mean - thin[0]).max() > 0.01 * scale  # the slab is not one plane: the check can fail


def test_samf_csv_with_absolute_paths_and_plain_labels(tmp_path, phantom):
    from samf.train.data import load_samf_csv

    scan = tmp_path / "scans" / "a.nii.gz"
    scan.parent.mkdir()
    save_nifti(str(scan), phantom.volume, phantom.spacing)
    csv_path = tmp_path / "elsewhere" / "list.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(f"image,caption,label\n{scan},{phantom.report.replace(',', ' ')},abnormal\n")
    (ex,) = load_samf_csv(str(csv_path), CFG, progress=False)
    assert ex.slices.shape == (18, 3, 48, 48) and ex.findings == {"label": "abnormal"}
    assert ex.report.startswith(phantom.report.split(",")[0][:20])


def test_init_records_the_slab_a_run_is_cut_with(tmp_path):
    """The tiny preset cuts slab means, the paper preset the paper's thin slices; ``init --slab`` overrides, and a
    mode that does not exist is refused before the run folder is made."""
    from cli_runner import invoke_cli

    from samf.train.configs import PRESET_PREPROCESS
    from samf.train.run_folder import read_run

    assert PRESET_PREPROCESS["tiny"].slab == "mean" and PRESET_PREPROCESS["paper"].slab == "thin"
    for args, slab in (([], "mean"), (["--slab", "thin"], "thin"), (["--slab", "mip"], "mip")):
        run = str(tmp_path / f"run-{slab}")
        proc = invoke_cli("samf-train", "init", "--run", run, *args)
        assert proc.returncode == 0 and f"{slab} slices" in proc.stdout, proc.stderr
        assert PreprocessConfig.from_dict(read_run(run)["preprocess"]).slab == slab
    proc = invoke_cli("samf-train", "init", "--run", str(tmp_path / "bad"), "--slab", "thick")
    assert proc.returncode == 2 and "thick" in proc.stderr and not (tmp_path / "bad").exists()
