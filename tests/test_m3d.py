"""M3D: normalised .npy volumes in each plane, the M3D-Cap JSON and M3D-VQA CSV layouts, dataset detection."""

import csv
import json
import os

import numpy as np
import pytest

from samf.errors import ScanError
from samf.runtime.scan.ct import load_scan
from samf.runtime.scan.preprocess import PreprocessConfig, apply_windows, cut_slices, preprocess
from samf.runtime.tools.phantom import make_phantom
from samf.train.data import DataError, dataset_kind
from samf.train.datasets import load_dataset

PRE = PreprocessConfig(image_size=32, pixel_spacing_mm=12.0, slices_per_plane=4)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(5, shape=(32, 40, 40), spacing=(10.0, 9.0, 9.0))


def _m3d_stack(hu, plane):
    """What M3D's preparation makes of a canonical volume: display images stacked, windowed to [0, 1]."""
    unit = np.clip((hu + 1000.0) / 2000.0, 0.0, 1.0).astype(np.float32)
    d = unit[::-1, ::-1, ::-1]                                   # [Z, Y, X] -> [S→I, A→P, R→L]
    stack = {"axial": d, "coronal": d.transpose(1, 0, 2), "sagittal": d.transpose(2, 0, 1)}[plane]
    return stack[None]                                           # M3D keeps a channel axis: [1, D, H, W]


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_m3d_stacks_in_any_plane_land_in_the_canonical_frame(phantom, plane, tmp_path):
    path = tmp_path / f"{plane.capitalize()}_non_contrast.npy"
    np.save(path, _m3d_stack(phantom.volume, plane))
    vol = load_scan(str(path), spacing=phantom.spacing)
    assert vol.intensity == "unit" and vol.info["plane"] == plane
    expect = np.clip((phantom.volume + 1000.0) / 2000.0, 0.0, 1.0)
    assert vol.hu.shape == phantom.volume.shape and np.allclose(vol.hu, expect)


def test_m3d_slices_match_the_hu_path_with_the_same_window(phantom, tmp_path):
    """Normalised volumes skip the HU windows; with M3D's window as ours the model sees the same slices."""
    np.save(tmp_path / "Axial.npy", _m3d_stack(phantom.volume, "axial"))
    m3d = preprocess(load_scan(str(tmp_path / "Axial.npy"), spacing=phantom.spacing),
                     PreprocessConfig(**{**PRE.to_dict(), "windows": PRE.windows, "body_threshold_unit": 0.25}))
    from samf.runtime.scan.ct import Volume

    clipped = np.clip(phantom.volume, -1000.0, 1000.0)        # M3D's images were windowed before stacking
    hu = apply_windows(cut_slices(Volume(clipped, phantom.spacing), PRE), ((0.0, 2000.0),))
    assert m3d.shape == (12, 3, 32, 32)
    assert np.allclose(m3d[:, 0], m3d[:, 2])                   # one value, every channel
    assert np.abs(m3d[:, :1] - hu).max() < 1e-4


def test_m3d_default_spacing_is_assumed_and_said(tmp_path):
    chest = make_phantom(5, shape=(32, 256, 256), spacing=(10.5, 1.3125, 1.3125))  # M3D's grid, anatomy on it
    np.save(tmp_path / "Axial.npy", _m3d_stack(chest.volume, "axial"))
    vol = load_scan(str(tmp_path / "Axial.npy"))
    assert vol.info["spacing_assumed"] and vol.spacing == pytest.approx((10.5, 1.3125, 1.3125))
    assert preprocess(vol, PRE).shape == (12, 3, 32, 32)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_m3d_noise_is_refused_and_anatomy_is_not(plane, tmp_path):
    """Uniform noise in [0, 1] is not an M3D volume (issue 30): the HU volumes' anatomy check (neighbouring
    voxels correlate) applies, --force passes it. Phantoms in [0, 1] pass it in every plane, window and size."""
    path = tmp_path / f"{plane.capitalize()}.npy"
    np.save(path, np.random.default_rng(0).random((1, 32, 256, 256), dtype=np.float32))
    with pytest.raises(ScanError, match="noise, not anatomy.*--force"):
        load_scan(str(path))
    assert load_scan(str(path), force=True).intensity == "unit"
    windows = {"m3d": (-1000.0, 2000.0), "fuzz": (-1024.0, 4000.0), "lung": (-1350.0, 1500.0), "bone": (-450.0, 1500.0)}
    for seed, shape, spacing in ((0, (64, 96, 96), (4.0, 3.5, 3.5)), (3, (32, 40, 40), (10.0, 9.0, 9.0)),
                                 (6, (40, 64, 64), (6.0, 5.0, 5.0))):
        hu = make_phantom(seed, shape=shape, spacing=spacing).volume
        for lo, width in windows.values():
            unit = np.clip((hu - lo) / width, 0.0, 1.0).astype(np.float32)
            d = unit[::-1, ::-1, ::-1]
            np.save(path, {"axial": d, "coronal": d.transpose(1, 0, 2), "sagittal": d.transpose(2, 0, 1)}[plane])
            assert load_scan(str(path)).intensity == "unit"


def test_npy_refusals(tmp_path):
    np.save(tmp_path / "nan.npy", np.full((8, 8, 8), np.nan, np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((8, 8, 8), np.float32))
    np.save(tmp_path / "two_d.npy", np.zeros((8, 8), np.float32))
    np.save(tmp_path / "hu.npy", np.full((8, 8, 8), -1000.0, np.float32))
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    for name, why in (("nan", "NaN"), ("flat", "constant"), ("two_d", "3-D"), ("hu", "spacing"),
                      ("broken", "cannot read")):
        with pytest.raises(ScanError, match=why):
            load_scan(str(tmp_path / f"{name}.npy"))


def _write_m3d_tree(root, phantom):
    """Two cases in M3D-Cap's layout plus an M3D-VQA CSV (one row for a volume that is not downloaded)."""
    entries = []
    for i, plane in enumerate(("Axial", "Coronal")):
        case = root / "ct_quizze" / f"00000{i}"
        case.mkdir(parents=True)
        np.save(case / f"{plane}_C__portal_venous_phase.npy", _m3d_stack(phantom.volume, plane.lower()))
        (case / "text.txt").write_text(f"Case {i}.\n{phantom.report}\n")
        entries.append({"image": f"ct_quizze/00000{i}/{plane}_C__portal_venous_phase.npy",
                        "text": f"ct_quizze/00000{i}/text.txt"})
    (root / "M3D_Cap.json").write_text(json.dumps({"train": entries, "validation": entries[:1], "test": []}))
    cols = ["Question ID", "Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
            "Choice D", "Answer", "Answer Choice"]
    with open(root / "M3D_VQA_train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerow({"Question ID": 1, "Image Path": entries[0]["image"], "Text": "", "Question Type": "Plane",
                    "Question": "In which plane is this image?", "Choice A": "Axial", "Choice B": "Coronal",
                    "Choice C": "Sagittal", "Choice D": "Oblique", "Answer": "Axial", "Answer Choice": "A"})
        w.writerow({"Question ID": 2, "Image Path": "ct_quizze/999/Axial.npy", "Text": "", "Question Type": "Phase",
                    "Question": "Which phase?", "Choice A": "a", "Choice B": "b", "Choice C": "c", "Choice D": "d",
                    "Answer": "a", "Answer Choice": "A"})
    return entries


def test_m3d_cap_and_vqa_layout(phantom, tmp_path):
    entries = _write_m3d_tree(tmp_path, phantom)
    assert dataset_kind(str(tmp_path)) == "m3d"
    exs = load_dataset(str(tmp_path), "train", PRE, progress=False)
    assert [e.image for e in exs] == [e["image"] for e in entries]
    assert exs[0].report.startswith("Case 0. ") and "\n" not in exs[0].report
    assert exs[0].questions == [dict(question="In which plane is this image?",
                                     choices=["Axial", "Coronal", "Sagittal", "Oblique"], answer="A", type="Plane")]
    # The same phantom stacked axially and coronally gives the same slices.
    assert np.allclose(exs[0].slices, exs[1].slices, atol=1e-5)
    assert len(load_dataset(str(tmp_path), "valid", PRE, progress=False)) == 1


def test_samf_mcq_csv_lower_case_answers(tmp_path):
    from samf.train.data import read_mcq_csv

    with open(tmp_path / "mcq.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Question ID", "Image", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
                    "Answer Choice", "Answer"])
        w.writerow([1, "a.nii.gz", "Is there an effusion?", "yes", "no", "left only", "right only", "b", "no"])
    assert read_mcq_csv(str(tmp_path / "mcq.csv")) == {
        "a.nii.gz": [dict(question="Is there an effusion?", choices=["yes", "no", "left only", "right only"],
                          answer="B")]}


def test_unknown_folder_is_refused_in_one_line(tmp_path):
    with pytest.raises(DataError, match="not a dataset folder"):
        dataset_kind(str(tmp_path))
    (tmp_path / "train.csv").write_text("path,text\nx,y\n")
    with pytest.raises(DataError, match="missing column"):
        load_dataset(str(tmp_path), "train", PRE, progress=False)
    assert os.path.exists(tmp_path / "train.csv")


def test_m3d_through_a_prepared_cache(phantom, tmp_path):
    """samf-train prepare reads M3D's layout as load_dataset does: the same texts and questions, slices within the
    cache's 1/255."""
    from samf.train.scan_cache import prepare_cache

    _write_m3d_tree(tmp_path / "m3d", phantom)
    out = str(tmp_path / "cache")
    record = prepare_cache(str(tmp_path / "m3d"), out, PRE, progress=False, echo=lambda m: None)
    assert {s: v["scans"] for s, v in record["splits"].items()} == {"train": 2, "valid": 1, "test": 0}
    fresh = load_dataset(str(tmp_path / "m3d"), "train", PRE, progress=False)
    cached = load_dataset(out, "train", PRE)
    for c, e in zip(cached, fresh):
        assert (c.image, c.report, c.questions) == (e.image, e.report, e.questions)
        assert np.abs(c.slices - e.slices).max() <= 0.5 / 127.5 + 1e-6
