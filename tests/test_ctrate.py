"""CT-RATE: a small tree in its exact layout, raw scanner values rescaled by the metadata CSV."""

import csv
import os

import nibabel as nib
import numpy as np
import pytest

from samf.errors import ScanError
from samf.runtime.scan.ct import load_scan
from samf.runtime.scan.ctrate import ctrate_path, read_metadata
from samf.runtime.scan.preprocess import PreprocessConfig
from samf.runtime.tools.phantom import make_phantom
from samf.train.data import dataset_kind, load_ctrate
from samf.train.datasets import load_dataset

LABELS = ["Medical material", "Arterial wall calcification", "Cardiomegaly", "Pleural effusion"]


def _write_tree(root):
    """Two v1-style volumes (raw unsigned values, unit spacing in the header) + the three CSVs."""
    names = ["train_1_a_1.nii.gz", "train_2_b_2.nii.gz"]
    meta_rows, rep_rows, lab_rows = [], [], []
    for i, name in enumerate(names):
        p = make_phantom(30 + i, shape=(32, 48, 48), spacing=(8.0, 7.5, 7.5))
        raw = np.round(p.volume + 1024).astype(np.uint16)             # scanner values, slope 1, intercept -1024
        path = ctrate_path(str(root), "train", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        nib.save(nib.Nifti1Image(raw.transpose(2, 1, 0), np.eye(4)), path)  # header without spacing
        meta_rows.append(dict(VolumeName=name, XYSpacing="[7.5, 7.5]", ZSpacing="8.0", RescaleSlope="1",
                              RescaleIntercept="-1024", NumberofSlices="32", Rows="48", Columns="48"))
        rep_rows.append(dict(VolumeName=name, ClinicalInformation_EN="", Technique_EN="",
                             Findings_EN=p.report, Impressions_EN="No acute findings."))
        lab_rows.append(dict(VolumeName=name, **{k: str(int(p.findings.cardiomegaly and k == "Cardiomegaly"))
                                                   for k in LABELS}))
    for fname, rows in (("metadata.csv", meta_rows), ("reports.csv", rep_rows), ("labels.csv", lab_rows)):
        with open(root / fname, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return names


def test_layout_path():
    got = ctrate_path("/d", "valid_fixed", "valid_12_c_3.nii.gz")
    assert got == "/d/valid_fixed/valid_12/valid_12_c/valid_12_c_3.nii.gz"
    with pytest.raises(ScanError):
        ctrate_path("/d", "train", "scan.nii.gz")


def test_metadata_rescales_raw_volumes_once(tmp_path):
    names = _write_tree(tmp_path)
    meta = read_metadata(str(tmp_path / "metadata.csv"))
    path = ctrate_path(str(tmp_path), "train", names[0])
    v = load_scan(path, ctrate_meta=meta[names[0]])
    ref = make_phantom(30, shape=(32, 48, 48), spacing=(8.0, 7.5, 7.5)).volume
    assert v.spacing == (8.0, 7.5, 7.5)
    assert np.abs(v.hu - np.round(ref)).max() <= 1.0
    # A volume already in HU (the fixed release) is not rescaled a second time.
    hu_path = str(tmp_path / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(np.round(ref).astype(np.int16).transpose(2, 1, 0), np.eye(4)), hu_path)
    assert np.abs(load_scan(hu_path, ctrate_meta=meta[names[0]]).hu - np.round(ref)).max() <= 1.0


def test_without_metadata_raw_values_are_refused(tmp_path):
    names = _write_tree(tmp_path)
    with pytest.raises(ScanError, match="Hounsfield"):
        load_scan(ctrate_path(str(tmp_path), "train", names[0]))


def test_dataset_loader(tmp_path):
    _write_tree(tmp_path)
    pre = PreprocessConfig(image_size=32, pixel_spacing_mm=12.0, slices_per_plane=4)
    exs = load_ctrate(str(tmp_path), "train", str(tmp_path / "reports.csv"), pre,
                      metadata_csv=str(tmp_path / "metadata.csv"), labels_csv=str(tmp_path / "labels.csv"),
                      progress=False)
    assert [e.image for e in exs] == ["train_1_a_1.nii.gz", "train_2_b_2.nii.gz"]
    assert exs[0].slices.shape == (12, 3, 32, 32)
    assert exs[0].report.endswith("No acute findings.")
    assert set(exs[0].findings) == set(LABELS)


def test_release_layout_is_recognised(tmp_path):
    """The release's folder names: reports/metadata/labels in their subfolders, volumes under train/."""
    _write_tree(tmp_path)
    for fname, sub, new in (("reports.csv", "radiology_text_reports", "train_reports.csv"),
                            ("metadata.csv", "metadata", "train_metadata.csv"),
                            ("labels.csv", "multi_abnormality_labels", "train_predicted_labels.csv")):
        (tmp_path / sub).mkdir()
        os.replace(tmp_path / fname, tmp_path / sub / new)
    assert dataset_kind(str(tmp_path)) == "ctrate"
    pre = PreprocessConfig(image_size=32, pixel_spacing_mm=12.0, slices_per_plane=4)
    exs = load_dataset(str(tmp_path), "train", pre, progress=False)
    assert len(exs) == 2 and set(exs[1].findings) == set(LABELS)
    assert exs[0].slices.min() >= -1.0 and exs[0].slices.max() <= 1.0   # rescaled by the metadata: real HU
    with pytest.raises(Exception, match="valid"):
        load_dataset(str(tmp_path), "valid", pre, progress=False)
