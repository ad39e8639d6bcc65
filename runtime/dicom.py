"""DICOM series folders: find the series, pick one, sort slices by position, rescale to HU, orient.

Slices are ordered by ImagePositionPatient projected on the slice normal (not by file name or
InstanceNumber); RescaleSlope/Intercept give HU; PixelSpacing and the positions give the spacing. The
volume is handed to nibabel with its patient-space affine so it lands in the same canonical frame as a
NIfTI file. numpy + pydicom (+ nibabel) only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import ScanError

#: What to install for compressed transfer syntaxes pydicom cannot decode by itself.
_DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


@dataclass
class Series:
    uid: str
    modality: str
    description: str
    files: list = field(default_factory=list)   # (path, header) pairs

    def __len__(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        return f"{self.uid} ({self.modality}, {len(self)} images{', ' + self.description if self.description else ''})"


def find_series(folder: str) -> dict:
    """``{SeriesInstanceUID: Series}`` for every DICOM image below ``folder`` (headers only)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError):
                continue
            if "SeriesInstanceUID" not in ds or "ImagePositionPatient" not in ds:
                continue
            uid = str(ds.SeriesInstanceUID)
            s = series.setdefault(uid, Series(uid, str(ds.get("Modality", "")), str(ds.get("SeriesDescription", ""))))
            s.files.append((path, ds))
    return series


def choose_series(series: dict, uid: str | None = None) -> tuple:
    """The requested series, or the CT series with the most images; returns (series, a line saying why)."""
    if not series:
        raise ScanError("no DICOM images found")
    if uid is not None:
        if uid not in series:
            raise ScanError(f"no series {uid}; found: " + "; ".join(s.summary() for s in series.values()))
        return series[uid], f"series {series[uid].summary()}"
    ct = [s for s in series.values() if s.modality == "CT"] or list(series.values())
    best = max(ct, key=len)
    why = f"series {best.summary()}"
    if len(series) > 1:
        why += f"; {len(series)} series in the folder, the CT one with most images was chosen (pick with --series)"
    return best, why


def load_dicom_series(folder: str, uid: str | None = None, allow_non_ct: bool = False):
    """Read one series of ``folder`` into a nibabel image in patient RAS space, plus a description."""
    import nibabel as nib

    if not any(files for _, _, files in os.walk(folder)):
        raise ScanError(f"{folder} is an empty folder")
    series = find_series(folder)
    if not series:
        raise ScanError(f"{folder} holds no DICOM images")
    s, why = choose_series(series, uid)
    if s.modality != "CT" and not allow_non_ct:
        raise ScanError(f"series {s.uid} is {s.modality or 'of unknown modality'}, not CT (use --allow-non-ct)")
    if len(s) < 2:
        raise ScanError(f"series {s.uid} has a single image: a slice, not a volume")
    hdr0 = s.files[0][1]
    iop = np.asarray(hdr0.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([np.dot(np.asarray(h.ImagePositionPatient, float), normal) for _, h in s.files])
    order = np.argsort(pos)
    files = [s.files[i] for i in order]
    pos = pos[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise ScanError(f"series {s.uid}: several images share one position (a multi-phase or duplicated series)")
    dz = float(np.median(gaps))
    dr, dc = (float(v) for v in hdr0.PixelSpacing)   # row spacing, column spacing
    slices = [_pixels_hu(p) for p, _ in files]
    shapes = {a.shape for a in slices}
    if len(shapes) != 1:
        raise ScanError(f"series {s.uid}: images of different sizes {sorted(shapes)}")
    vol = np.stack(slices, axis=0)                    # [k, row j, col i]
    # Voxel (i, j, k) -> LPS: IPP_0 + i*dc*row_dir + j*dr*col_dir + k*dz*normal; LPS -> RAS flips x, y.
    affine = np.eye(4)
    affine[:3, 0] = row_dir * dc
    affine[:3, 1] = col_dir * dr
    affine[:3, 2] = normal * dz
    affine[:3, 3] = np.asarray(files[0][1].ImagePositionPatient, float)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), affine)
    info = dict(format="dicom", series=s.uid, modality=s.modality, images=len(files), choice=why,
                uneven_spacing=bool(np.ptp(gaps) > 0.01 * dz), n_series=len(series))
    return img, info


def _pixels_hu(path: str) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32)
    except (RuntimeError, NotImplementedError) as e:  # no decoder for this transfer syntax
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise ScanError(f"{path}: cannot decode {name} pixel data ({str(e).splitlines()[0][:80]}); "
                        f"{_DECODER_HINT}") from None
    except Exception as e:
        raise ScanError(f"{path}: unreadable DICOM image ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    if arr.ndim != 2:
        raise ScanError(f"{path}: a {arr.ndim}-D image; multi-frame DICOM is not supported yet")
    return arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
