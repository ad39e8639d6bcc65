"""Phantoms written in CT-RATE's release layout, for tests and benchmarks of the CT-RATE path before a user
has the dataset (the layout of the CT-RATE release, https://huggingface.co/datasets/ibrahimhamamci/CT-RATE;
Hamamci et al., arXiv:2403.17834)::

    ROOT/train/train_1/train_1_a/train_1_a_1.nii.gz      raw unsigned scanner values, a header with no spacing
    ROOT/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz
    ROOT/radiology_text_reports/{train,validation}_reports.csv
    ROOT/metadata/{train,validation}_metadata.csv         spacing and rescale: the only place they are
    ROOT/multi_abnormality_labels/{train,valid}_predicted_labels.csv   the 18 labels

As in CT-RATE v1, a volume's values are ``HU + 1024`` and its header says 1 mm: read without the metadata CSV
it is refused (values no CT has), read with it, it is the phantom in HU at its true spacing.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from samf.runtime.atomic import atomic_file
from samf.runtime.progress import progress_bar
from samf.runtime.scan.ctrate import ctrate_path
from samf.runtime.tools.phantom import make_phantom

from .labels import CTRATE_LABELS, truth_labels

RAW_INTERCEPT = -1024.0
REPORT_FIELDS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
METADATA_FIELDS = ("VolumeName", "Rows", "Columns", "NumberofSlices", "XYSpacing", "ZSpacing", "RescaleIntercept",
                   "RescaleSlope")


def _write_csv(path: str, fields, rows: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path) as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)


def write_ctrate_release(root: str, n_train: int, n_valid: int, shape=(32, 48, 48), spacing=(8.0, 7.5, 7.5),
                         seed: int = 0, progress: bool = True) -> dict:
    """Write ``n_train + n_valid`` phantoms as a CT-RATE release tree at ``root``; returns the volume names per
    split. Two reconstructions of one scan share a patient folder, as CT-RATE's do."""
    import nibabel as nib

    names: dict = {"train": [], "valid": []}
    total = n_train + n_valid
    rows = {s: ([], [], []) for s in names}
    for i in progress_bar(range(total), desc="CT-RATE phantoms", disable=not progress, unit="scan"):
        split = "train" if i < n_train else "valid"
        k = i if split == "train" else i - n_train
        name = f"{split}_{k // 2 + 1}_a_{k % 2 + 1}.nii.gz"
        p = make_phantom(seed * 1_000_003 + i, shape=shape, spacing=spacing)
        raw = np.clip(np.round(p.volume - RAW_INTERCEPT), 0, 65535).astype(np.uint16)
        path = ctrate_path(root, split, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        nib.save(nib.Nifti1Image(raw.transpose(2, 1, 0), np.eye(4)), path)  # v1: no spacing in the header
        sz, sy, sx = spacing
        reports, meta, labels = rows[split]
        reports.append(dict(VolumeName=name, ClinicalInformation_EN="Not given.", Technique_EN="Non-contrast chest CT.",
                            Findings_EN=p.report, Impressions_EN="Correlate clinically."))
        meta.append(dict(VolumeName=name, Rows=shape[1], Columns=shape[2], NumberofSlices=shape[0],
                         XYSpacing=f"[{sx}, {sy}]", ZSpacing=sz, RescaleIntercept=RAW_INTERCEPT, RescaleSlope=1.0))
        truth = truth_labels(p.findings.to_dict())
        labels.append(dict(VolumeName=name, **{k: int(truth.get(k, False)) for k in CTRATE_LABELS}))
        names[split].append(name)
    for split, long in (("train", "train"), ("valid", "validation")):
        reports, meta, labels = rows[split]
        _write_csv(os.path.join(root, "radiology_text_reports", f"{long}_reports.csv"), REPORT_FIELDS, reports)
        _write_csv(os.path.join(root, "metadata", f"{long}_metadata.csv"), METADATA_FIELDS, meta)
        _write_csv(os.path.join(root, "multi_abnormality_labels", f"{split}_predicted_labels.csv"),
                   ("VolumeName",) + CTRATE_LABELS, labels)
    return names
