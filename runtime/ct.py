"""Load one CT scan into the canonical frame: ``[Z, Y, X]`` float32 Hounsfield units plus spacing in mm.

Canonical frame (RAS+ as nibabel defines it, axes reversed): Z toward the head, Y toward the front,
X toward the patient's right. Whatever the file's affine, "axial", "coronal" and "sagittal" then mean
the same anatomy. numpy + nibabel only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ScanError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A CT volume in the canonical frame."""

    hu: np.ndarray                  # [Z, Y, X] float32, Hounsfield units
    spacing: tuple                  # (sz, sy, sx) mm
    source: str = ""
    info: dict = field(default_factory=dict)


def _is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def load_scan(path: str, spacing: tuple | None = None, series: str | None = None,
              allow_non_ct: bool = False, ctrate_meta: dict | None = None) -> Volume:
    """Read a scan from ``path`` (NIfTI file, DICOM series folder or .npy volume); raise
    :class:`ScanError` with a one-line reason when it is unusable.

    ``series`` picks a SeriesInstanceUID in a folder holding several; ``allow_non_ct`` lets a non-CT
    DICOM series through (its values are then not checked as HU); ``ctrate_meta`` is this volume's row
    of CT-RATE's metadata CSV (:func:`samf.runtime.ctrate.read_metadata`).
    """
    t0 = time.perf_counter()
    if not os.path.exists(path):
        raise ScanError(f"scan not found: {path}")
    if os.path.isdir(path):
        from .dicom import load_dicom_series

        vol = _canonical(*load_dicom_series(path, series, allow_non_ct), path)
    elif _is_nifti(path):
        vol = _load_nifti(path)
        if ctrate_meta is not None:
            from .ctrate import apply_metadata

            vol.hu, vol.spacing = apply_metadata(vol.hu, vol.spacing, ctrate_meta)
            vol.info["ctrate_metadata"] = True
    elif path.lower().endswith(".npy"):
        vol = _load_npy(path, spacing)
    else:
        raise ScanError(f"unsupported scan format: {os.path.basename(path)} "
                        "(expected .nii, .nii.gz, .npy or a DICOM folder)")
    if not (allow_non_ct and vol.info["format"] == "dicom"):  # a non-CT series is not in HU
        check_volume(vol)
    vol.info["load_s"] = time.perf_counter() - t0
    return vol


def _load_nifti(path: str) -> Volume:
    import nibabel as nib  # lazy: keeps `import samf.runtime` light

    try:
        img = nib.squeeze_image(nib.load(path))  # drops a trailing time axis of length 1
        if len(img.shape) < 3:
            raise ScanError(f"{path}: a {len(img.shape)}-D image, not a CT volume")
        if len(img.shape) != 3:
            raise ScanError(f"{path}: expected a 3-D volume, got shape {img.shape}")
        return _canonical(img, {"format": "nifti"}, path)
    except ScanError:
        raise
    except Exception as e:  # nibabel raises many types for truncated/corrupt files
        raise ScanError(f"cannot read NIfTI {path}: {type(e).__name__}: {e}".splitlines()[0]) from None


def _canonical(img, info: dict, path: str) -> Volume:
    """A 3-D nibabel image in any orientation -> canonical :class:`Volume`."""
    import nibabel as nib

    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    # nibabel's canonical array is [X, Y, Z] (RAS); ours is [Z, Y, X].
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    return Volume(hu=hu, spacing=zooms[::-1], source=path, info=info)


def _load_npy(path: str, spacing) -> Volume:
    if spacing is None:
        raise ScanError(f"{path}: a .npy volume needs its voxel spacing (--spacing Z Y X in mm)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ScanError(f"cannot read .npy {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if data.ndim != 3:
        raise ScanError(f"{path}: expected a 3-D [Z, Y, X] array, got shape {data.shape}")
    return Volume(hu=data.astype(np.float32), spacing=tuple(float(s) for s in spacing), source=path,
                  info={"format": "npy"})


def check_volume(vol: Volume) -> None:
    """Refuse what is not a CT volume in HU: non-finite voxels, a single slice, values outside CT's range."""
    hu = vol.hu
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise ScanError(f"{vol.source}: shape {hu.shape} is a single slice, not a volume")
    if any(not np.isfinite(s) or s <= 0 for s in vol.spacing):
        raise ScanError(f"{vol.source}: invalid voxel spacing {vol.spacing}")
    if not np.isfinite(hu).all():
        raise ScanError(f"{vol.source}: volume has NaN or infinite voxels")
    lo, hi = float(hu.min()), float(hu.max())
    if lo > -500.0 or hi < 0.0 or lo < -3000.0 or hi > 40000.0:
        raise ScanError(f"{vol.source}: values {lo:.0f}..{hi:.0f} do not look like CT in Hounsfield units "
                        "(no air near -1000 HU)")


def save_nifti(path: str, hu: np.ndarray, spacing: tuple) -> None:
    """Write a canonical ``[Z, Y, X]`` HU volume as NIfTI (int16, RAS affine), atomically."""
    import nibabel as nib

    sz, sy, sx = spacing
    affine = np.diag([sx, sy, sz, 1.0])
    img = nib.Nifti1Image(np.round(hu.transpose(2, 1, 0)).astype(np.int16), affine)
    img.header.set_xyzt_units("mm")
    tmp = path + ".tmp" + (".nii.gz" if path.endswith(".gz") else ".nii")
    nib.save(img, tmp)
    os.replace(tmp, path)
