"""CT-RATE conventions: file layout from a volume name, and the metadata CSV's spacing and rescale.

CT-RATE v1 NIfTI headers carry neither spacing nor rescale: raw scanner values must be turned into HU
with the metadata CSV's RescaleSlope/RescaleIntercept, and spacing taken from XYSpacing/ZSpacing. The
fixed volumes (``*_fixed``) are already in HU; rescaling them again would double-rescale, so rescale is
applied only to data that has no negative values (raw scanner values are unsigned).
"""

from __future__ import annotations

import ast
import csv
import os
import re

import numpy as np

from samf.errors import ScanError

_NAME = re.compile(r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<rec>\d+)\.nii(\.gz)?$")


def ctrate_path(root: str, split_dir: str, volume_name: str) -> str:
    """``train_1_a_1.nii.gz`` -> ``ROOT/SPLIT_DIR/train_1/train_1_a/train_1_a_1.nii.gz``."""
    m = _NAME.match(volume_name)
    if not m:
        raise ScanError(f"not a CT-RATE volume name: {volume_name}")
    patient = f"{m['split']}_{m['patient']}"
    return os.path.join(root, split_dir, patient, f"{patient}_{m['scan']}", volume_name)


def read_metadata(csv_path: str) -> dict:
    """``{VolumeName: dict(spacing=(z, y, x), slope, intercept)}`` from CT-RATE's metadata CSV."""
    out = {}
    if not os.path.isfile(csv_path):  # a FIFO would block the read
        raise ScanError(f"{csv_path!r} is not a regular file" if os.path.exists(csv_path)
                        else f"metadata file not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ScanError(f"{csv_path}: not a CT-RATE metadata CSV ({type(e).__name__})") from None
    for row in rows:
        try:
            xy = ast.literal_eval(row["XYSpacing"]) if row.get("XYSpacing") else None
            spacing = (float(row["ZSpacing"]), float(xy[1]), float(xy[0])) if xy else None
            out[row["VolumeName"]] = dict(spacing=spacing, slope=float(row.get("RescaleSlope") or 1.0),
                                          intercept=float(row.get("RescaleIntercept") or 0.0))
        except (KeyError, ValueError, SyntaxError, TypeError, IndexError, RecursionError, MemoryError) as e:
            raise ScanError(f"{csv_path}: bad metadata row for {str(row.get('VolumeName'))[:80]!r}: "
                            f"{type(e).__name__}") from None
    return out


def apply_metadata(hu: np.ndarray, spacing: tuple, meta: dict) -> tuple:
    """(values, spacing) after CT-RATE metadata; rescale only raw (non-negative) scanner values.

    A float32 ``hu`` is rescaled in place: at 512×512×300 a copy costs half a second, a quarter of the load."""
    hu = hu.astype(np.float32, copy=False)
    if float(hu.min()) >= 0.0:
        if not hu.flags.writeable:
            hu = hu.copy()
        hu *= np.float32(meta["slope"])
        hu += np.float32(meta["intercept"])
    return hu, meta["spacing"] or spacing
