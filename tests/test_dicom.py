"""DICOM series: order from positions, rescale to HU, series choice, refusals."""

import os
import shutil

import numpy as np
import pytest
from cli_runner import invoke_cli, run_cli
from dicom_writer import write_enhanced, write_series

from samf.errors import ScanError
from samf.runtime.scan.ct import load_scan, save_nifti
from samf.runtime.tools.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(21, shape=(24, 40, 40), spacing=(8.0, 9.0, 9.0))


def test_series_equals_the_nifti_of_the_same_scan(phantom, tmp_path):
    write_series(str(tmp_path / "dcm"), phantom.volume, phantom.spacing, slope=2.0, intercept=-2048.0)
    save_nifti(str(tmp_path / "ref.nii.gz"), phantom.volume, phantom.spacing)
    got, ref = load_scan(str(tmp_path / "dcm")), load_scan(str(tmp_path / "ref.nii.gz"))
    assert got.spacing == pytest.approx(ref.spacing)
    assert got.hu.shape == ref.hu.shape
    assert np.abs(got.hu - ref.hu).max() <= 1.0  # slope 2: values rounded to even HU
    assert got.info["format"] == "dicom" and got.info["images"] == 24


def test_enhanced_multiframe_file_equals_the_nifti(phantom, tmp_path):
    (tmp_path / "enh").mkdir()
    write_enhanced(str(tmp_path / "enh" / "volume.dcm"), phantom.volume, phantom.spacing, slope=2.0,
                   intercept=-2048.0)
    got = load_scan(str(tmp_path / "enh"))
    save_nifti(str(tmp_path / "ref.nii.gz"), phantom.volume, phantom.spacing)
    ref = load_scan(str(tmp_path / "ref.nii.gz"))
    assert got.spacing == pytest.approx(ref.spacing)
    assert np.abs(got.hu - ref.hu).max() <= 1.0       # frames were stored shuffled: order is from positions
    assert got.info["images"] == 24 and got.info["files"] == 1


def test_several_series_default_and_choice(phantom, tmp_path):
    folder = tmp_path / "mixed"
    big = write_series(str(folder / "a"), phantom.volume, phantom.spacing)
    small = write_series(str(folder / "b"), phantom.volume[:8], phantom.spacing)
    write_series(str(folder / "c"), phantom.volume, phantom.spacing, modality="MR")
    v = load_scan(str(folder), verbose=True)
    assert v.info["series"] == big and "3 series" in v.info["choice"]
    assert load_scan(str(folder), series=small).hu.shape[0] == 8
    with pytest.raises(ScanError, match="no series"):
        load_scan(str(folder), series="1.2.3")


def test_refusals(phantom, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="empty folder"):
        load_scan(str(tmp_path / "empty"))
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "readme.txt").write_text("hello")
    with pytest.raises(ScanError, match="no DICOM"):
        load_scan(str(tmp_path / "notdicom"))
    write_series(str(tmp_path / "mr"), phantom.volume, phantom.spacing, modality="MR")
    with pytest.raises(ScanError, match="not CT"):
        load_scan(str(tmp_path / "mr"))
    assert load_scan(str(tmp_path / "mr"), allow_non_ct=True).hu.shape == phantom.volume.shape


def test_pydicom_ct_small_is_a_single_slice(tmp_path):
    from pydicom.data import get_testdata_file

    (tmp_path / "one").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "one" / "x.dcm")
    with pytest.raises(ScanError, match="single image"):
        load_scan(str(tmp_path / "one"))


def test_compressed_without_decoder_names_what_to_install(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    from samf.runtime.scan.dicom import _read_pixels

    path = get_testdata_file("JPEG2000.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    try:
        arr = _read_pixels(path)
    except ScanError as e:  # no JPEG 2000 plugin here: the message says what to install
        assert "JPEG 2000" in str(e) and "pip install" in str(e)
    else:                   # a plugin is installed: the image decodes
        assert arr.shape == (ds.Rows, ds.Columns)


def test_cli_info_and_slices_on_a_dicom_folder(phantom, tmp_path):
    from PIL import Image

    write_series(str(tmp_path / "dcm"), phantom.volume, phantom.spacing)
    info = run_cli("samf", "info", str(tmp_path / "dcm"))
    assert info.returncode == 0 and "dicom" in info.stdout and "(24, 40, 40)" in info.stdout
    out = tmp_path / "png"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    proc = run_cli("samf", "slices", str(tmp_path / "dcm"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "mine.txt").read_text() == "keep me"   # nothing the user had is touched
    m = Image.open(out / "dcm" / "montage_axial.png")     # each scan's slices in a folder of their own
    assert m.size == (8 * 224, 3 * 224)                   # 8 slices across, 3 windows down (paper preset)
    assert len(list((out / "dcm").glob("sagittal_*_lung.png"))) == 8
    assert sorted(os.listdir(out)) == ["dcm", "mine.txt"]  # and no temporary files


def test_a_slices_run_that_dies_half_way_mixes_nothing(phantom, tmp_path, monkeypatch):
    from PIL import Image

    from samf.runtime.outputs.slices_png import write_slice_pngs
    from samf.runtime.scan.ct import Volume
    from samf.runtime.scan.preprocess import PreprocessConfig

    vol = Volume(phantom.volume, phantom.spacing, "a")
    out = tmp_path / "out" / "scan"
    first = write_slice_pngs(vol, PreprocessConfig(), str(out))
    before = {n: (out / n).read_bytes() for n in first}
    real, saved = Image.Image.save, []

    def dies_after_ten(self, fp, *a, **k):
        if len(saved) == 10:
            raise KeyboardInterrupt
        saved.append(fp)
        return real(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", dies_after_ten)
    other = Volume(-phantom.volume[::-1], phantom.spacing, "b")  # another scan, same folder name
    with pytest.raises(KeyboardInterrupt):
        write_slice_pngs(other, PreprocessConfig(), str(out))
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # the first scan's, untouched
    assert os.listdir(tmp_path / "out") == ["scan"]


def _edited_series(phantom, folder, edit):
    """A valid series whose files then go through ``edit(index, dataset)`` (return False to drop a tag's file)."""
    import os

    import pydicom

    write_series(str(folder), phantom.volume, phantom.spacing, shuffle_instance=False)
    for i, name in enumerate(sorted(os.listdir(folder), key=lambda n: pydicom.dcmread(folder / n).InstanceNumber)):
        ds = pydicom.dcmread(folder / name)
        edit(i, ds)
        ds.save_as(folder / name)
    return str(folder)


def _set(tag, value, only=None):
    def edit(i, ds):
        if only is None or i in only:
            if value is None:
                del ds[tag]
            else:
                setattr(ds, tag, value)
    return edit


@pytest.mark.parametrize("edit,words", [
    (_set("ImagePositionPatient", [1.0, 2.0], only={3}), "ImagePositionPatient has 2 values"),
    (_set("ImageOrientationPatient", [1, 0, 0, 0, 1], only={0}), "ImageOrientationPatient has 5 values"),
    (_set("PixelSpacing", [9.0], only={5}), "PixelSpacing has 1 values"),
    (_set("PixelSpacing", [0.0, 9.0], only={5}), "PixelSpacing [0.0, 9.0] mm is not a CT's"),
    (_set("ImageOrientationPatient", [2, 0, 0, 0, 1, 0]), "not two orthogonal unit vectors"),
    (_set("ImagePositionPatient", None, only=set(range(0, 24, 3))), "8 of 24 images have no position"),
    (_set("PixelSpacing", [8.5, 9.0], only={7}), "different pixel spacings"),
    (lambda i, ds: setattr(ds, "ImagePositionPatient", [-100.0 + 3.0 * i, -120.0, 50.0 + 8.0 * i]), "gantry tilt"),
    (lambda i, ds: setattr(ds, "ImagePositionPatient", [-100.0, -120.0, 50.0 + 8.0 * i + (1e7 if i > 11 else 0)]),
     "missing slices"),
    (lambda i, ds: setattr(ds, "ImagePositionPatient", [-100.0, -120.0, 50.0 + 1e7 * i]), "not a CT's"),
])
def test_header_values_no_ct_series_has_are_refused_in_one_line(phantom, tmp_path, edit, words):
    folder = _edited_series(phantom, tmp_path / "dcm", edit)
    with pytest.raises(ScanError) as e:
        load_scan(folder)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_identifiers_appear_only_with_verbose(phantom, tmp_path):
    """UIDs and series descriptions are identifiers (DICOM PS3.15): not in any output, message or file unless
    --verbose; patient data never."""
    import os

    import pydicom

    folder = tmp_path / "dcm"
    uid = "1.2.826.0.1.3680043.8.498.424242424242"
    write_series(str(folder), phantom.volume, phantom.spacing, series_uid=uid)
    write_series(str(folder / "other"), phantom.volume[:10], phantom.spacing, series_uid=uid + ".7")
    phi = {"PatientName": "Zqxname^Phiwhqsurname", "PatientID": "PHIID-99173", "SeriesDescription": "PHIDESC-5521",
           "PatientBirthDate": "19230417", "InstitutionName": "PHI-Institute-Xq", "AccessionNumber": "ACC-PHI-3311"}
    for root, _, names in os.walk(folder):
        for n in names:
            ds = pydicom.dcmread(os.path.join(root, n))
            for k, v in phi.items():
                setattr(ds, k, v)
            ds.save_as(os.path.join(root, n))
    secrets = [uid, "PHIDESC", "Zqxname", "Phiwhqsurname", "PHIID", "19230417", "PHI-Institute", "ACC-PHI"]
    out = tmp_path / "png"
    # In this process (what native code writes to fds 1 and 2 is caught too); test_cli_info_and_slices_on_a_dicom_folder
    # runs both commands in fresh interpreters.
    runs = [invoke_cli("samf", "info", str(folder)), invoke_cli("samf", "slices", str(folder), "--out", str(out)),
            invoke_cli("samf", "info", str(folder), "--series", "9.9.9"),
            invoke_cli("samf", "info", str(folder / "other"), "--spacing", "1", "1", "1")]
    assert [r.returncode for r in runs] == [0, 0, 2, 2]
    written = "".join(p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file())
    for text in [r.stdout + r.stderr for r in runs] + [written]:
        for secret in secrets:
            assert secret not in text
    verbose = invoke_cli("samf", "info", str(folder), "--verbose")
    assert uid in verbose.stdout and "PHIDESC-5521" in verbose.stdout
    assert not any(s in verbose.stdout + verbose.stderr for s in secrets if s not in (uid, "PHIDESC"))
