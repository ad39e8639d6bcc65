"""Load one CT scan into the canonical frame: ``[Z, Y, X]`` float32 Hounsfield units plus spacing in mm.

Canonical frame (RAS+ as nibabel defines it, axes reversed): Z toward the head, Y toward the front,
X toward the patient's right. Whatever the file's affine, "axial", "coronal" and "sagittal" then mean
the same anatomy. numpy + nibabel only.

Two intensity kinds exist. ``"hu"``: Hounsfield units (NIfTI, DICOM, CT-RATE, plain .npy). ``"unit"``: values
already windowed and scaled to [0, 1] with no way back to HU, as in M3D's .npy volumes (PNG slices from
Radiopaedia, min-max normalised, resized to 32×256×256, spacing lost); preprocessing then skips the HU windows.
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

    hu: np.ndarray                  # [Z, Y, X] float32, Hounsfield units (or [0, 1], see ``intensity``)
    spacing: tuple                  # (sz, sy, sx) mm
    source: str = ""
    info: dict = field(default_factory=dict)
    intensity: str = "hu"           # "hu", or "unit" for already-normalised volumes (M3D)


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


#: M3D's grid (depth, rows, columns) after its resize; the physical size is lost, so by default the grid is
#: taken to span a cube of this many mm (a chest-sized field of view). ``--spacing`` overrides it.
M3D_SHAPE = (32, 256, 256)
M3D_ASSUMED_FOV_MM = 336.0


def _load_npy(path: str, spacing) -> Volume:
    """A ``.npy`` volume: M3D's normalised ``[1, D, H, W]`` / ``[D, H, W]`` in [0, 1] (plane from the file
    name), or a plain ``[Z, Y, X]`` HU array in the canonical frame whose spacing the user gives."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ScanError(f"cannot read .npy {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if data.ndim == 4 and data.shape[0] == 1:   # M3D keeps a leading channel axis
        data = data[0]
    if data.ndim != 3:
        raise ScanError(f"{path}: expected a 3-D [Z, Y, X] array, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise ScanError(f"{path}: a {data.dtype} array, not image data")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise ScanError(f"{path}: volume has NaN or infinite voxels")
    if data.size and float(data.min()) >= 0.0 and float(data.max()) <= 1.0:
        return _m3d_volume(path, data, spacing)
    if spacing is None:
        raise ScanError(f"{path}: a .npy HU volume needs its voxel spacing (--spacing Z Y X in mm)")
    return Volume(hu=data, spacing=tuple(float(s) for s in spacing), source=path, info={"format": "npy"})


def m3d_plane(path: str) -> str:
    """The plane an M3D volume was stacked in, read from its name (``Axial_C__portal_venous_phase.npy``)."""
    name = os.path.basename(path).lower()
    for plane in ("coronal", "sagittal"):
        if plane in name:
            return plane
    return "axial"


def _m3d_volume(path: str, data: np.ndarray, spacing) -> Volume:
    """M3D's [stack, rows, cols] of display images -> canonical [Z, Y, X].

    The images are in radiological display orientation (patient's right on the image's left; superior or
    anterior at the top). The stack's direction is not recorded; we take it head→feet (axial),
    front→back (coronal), right→left (sagittal), the usual viewer order. Spacing: the user's, or the grid
    spread over a cube of :data:`M3D_ASSUMED_FOV_MM`, since M3D's resize discarded it.
    """
    plane = m3d_plane(path)
    d = data[::-1, ::-1, ::-1]                       # every display axis runs against the canonical one
    canon = {"axial": d,                             # [S→I, A→P, R→L] reversed = [Z, Y, X]
             "coronal": d.transpose(1, 0, 2),        # [A→P, S→I, R→L] reversed, rows become Z
             "sagittal": d.transpose(1, 2, 0)}[plane]  # [R→L, S→I, A→P] reversed -> [Z, Y, X]
    if spacing is None:
        spacing = tuple(M3D_ASSUMED_FOV_MM / n for n in canon.shape)
        assumed = True
    else:
        spacing, assumed = tuple(float(s) for s in spacing), False
    return Volume(hu=np.ascontiguousarray(canon), spacing=spacing, source=path, intensity="unit",
                  info={"format": "m3d-npy", "plane": plane, "spacing_assumed": assumed})


def check_volume(vol: Volume) -> None:
    """Refuse what is not a CT volume: non-finite voxels, a single slice, values outside CT's range."""
    hu = vol.hu
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise ScanError(f"{vol.source}: shape {hu.shape} is a single slice, not a volume")
    if any(not np.isfinite(s) or s <= 0 for s in vol.spacing):
        raise ScanError(f"{vol.source}: invalid voxel spacing {vol.spacing}")
    if not np.isfinite(hu).all():
        raise ScanError(f"{vol.source}: volume has NaN or infinite voxels")
    lo, hi = float(hu.min()), float(hu.max())
    if vol.intensity == "unit":
        if hi - lo < 1e-3:
            raise ScanError(f"{vol.source}: a constant volume (all voxels {lo:.3f})")
        return
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
