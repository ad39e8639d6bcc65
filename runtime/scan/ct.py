"""Load one CT scan into the canonical frame: ``[Z, Y, X]`` float32 Hounsfield units plus spacing in mm.

Canonical frame (RAS+ as nibabel defines it, axes reversed): Z toward the head, Y toward the front,
X toward the patient's right. Whatever the file's affine, "axial", "coronal" and "sagittal" then mean
the same anatomy. numpy + nibabel only.

Two intensity kinds exist. ``"hu"``: Hounsfield units (NIfTI, DICOM, CT-RATE, plain .npy). ``"unit"``: values
already windowed and scaled to [0, 1] with no way back to HU, as in M3D's .npy volumes (PNG slices from
Radiopaedia, min-max normalised, resized to 32×256×256, spacing lost); preprocessing then skips the HU windows.
"""

from __future__ import annotations

import gzip
import os
import stat
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from samf.errors import ScanError

from .guards import MIN_EXTENT_MM, MIN_VOXELS_PER_AXIS, PLAUSIBLE_SPACING_MM, max_voxels

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A CT volume in the canonical frame."""

    hu: np.ndarray                  # [Z, Y, X] float32, Hounsfield units (or [0, 1], see ``intensity``)
    spacing: tuple                  # (sz, sy, sx) mm
    source: str = ""
    info: dict = field(default_factory=dict)
    intensity: str = "hu"           # "hu", or "unit" for already-normalised volumes (M3D)
    affine: np.ndarray | None = None  # canonical voxel (x, y, z) -> RAS mm, where the file records a position


def _is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def load_scan(path: str, spacing: tuple | None = None, series: str | None = None,
              allow_non_ct: bool = False, ctrate_meta: dict | None = None, force: bool = False,
              verbose: bool = False) -> Volume:
    """Read a scan from ``path`` (NIfTI file, DICOM series folder or .npy volume); raise
    :class:`ScanError` with a one-line reason when it is unusable.

    ``series`` picks a SeriesInstanceUID in a folder holding several; ``allow_non_ct`` lets a non-CT
    DICOM series through (its values are then not checked as HU); ``ctrate_meta`` is this volume's row
    of CT-RATE's metadata CSV (:func:`samf.runtime.scan.ctrate.read_metadata`); ``force`` skips the check that
    the values look like a CT (:func:`check_volume`), not the checks that the file is sound. Series UIDs and
    descriptions (identifiers) appear in messages and ``info`` only when ``verbose``.
    """
    t0 = time.perf_counter()
    if not os.path.exists(path):
        raise ScanError(f"scan not found: {path}")
    if not os.path.isdir(path) and not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would hang
        raise ScanError(f"{path!r} is not a regular file")
    if spacing is not None and os.path.isdir(path):
        raise ScanError("--spacing does not apply to a DICOM folder: its spacing comes from the series")
    if series is not None and not os.path.isdir(path):
        raise ScanError("--series applies to a DICOM folder only")
    if spacing is not None and not (len(spacing) == 3 and np.all(np.isfinite(np.asarray(spacing, np.float64)))
                                    and min(spacing) > 0):
        raise ScanError(f"--spacing {' '.join(map(str, spacing))}: three voxel sizes in mm, each a positive number")
    if os.path.isdir(path):
        from .dicom import load_dicom_series

        vol = _canonical(*load_dicom_series(path, series, allow_non_ct, verbose), path)
    elif _is_nifti(path):
        vol = _load_nifti(path, spacing, ctrate_spacing=(ctrate_meta or {}).get("spacing"))
        if ctrate_meta is not None:
            from .ctrate import apply_metadata

            vol.hu, _ = apply_metadata(vol.hu, vol.spacing, ctrate_meta)
            vol.info["ctrate_metadata"] = True
    elif path.lower().endswith(".npy"):
        vol = _load_npy(path, spacing)
    else:
        raise ScanError(f"unsupported scan format: {os.path.basename(path)} "
                        "(expected .nii, .nii.gz, .npy or a DICOM folder)")
    if not (allow_non_ct and vol.info["format"] == "dicom"):  # a non-CT series is not in HU
        check_volume(vol, force)
    vol.info["load_s"] = time.perf_counter() - t0
    return vol


def _load_nifti(path: str, spacing=None, ctrate_spacing=None) -> Volume:
    """A NIfTI file, its header checked before its data is read: a 3-D real-valued volume of plausible
    spacing (or ``spacing`` given) within :func:`max_voxels`. A ``.nii.gz`` is decompressed once, whole, so
    gzip's checksum is read and a stream longer than the header declares (a gzip bomb) is refused.
    ``spacing`` (or ``ctrate_spacing``, from CT-RATE's metadata) replaces the file's voxel size, Z Y X in mm."""
    import logging

    import nibabel as nib  # lazy: keeps `import samf.runtime` light

    # nibabel reports header fix-ups and problems through loggers of its own (with their own handlers): we
    # check the header and say in one line what is wrong, so they stay silent.
    for name in ("nibabel", "nibabel.global"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        img = nib.load(path)  # the header only; data stays on disk
        shape = tuple(int(n) for n in img.shape)
        while len(shape) > 3 and shape[-1] == 1:  # a trailing time axis of length 1
            shape = shape[:-1]
        if len(shape) < 3:
            raise ScanError(f"{path}: a {len(shape)}-D image, not a CT volume")
        if len(shape) != 3:
            raise ScanError(f"{path}: expected a 3-D volume, got shape {shape}")
        dtype = img.header.get_data_dtype()
        if dtype.kind not in "iuf" or dtype.fields is not None:
            raise ScanError(f"{path}: voxels of type {dtype}, not real numbers")
        n = int(np.prod(shape, dtype=np.int64))
        if n > max_voxels():
            raise ScanError(f"{path}: declares {'×'.join(map(str, shape))} = {n:,} voxels, more than the "
                            f"{max_voxels():,} accepted (SAMF_MAX_VOXELS)")
        raw = _raw_header(img, path)
        if int(raw["sizeof_hdr"]) != raw.sizeof_hdr:
            raise ScanError(f"{path}: header size {int(raw['sizeof_hdr'])}, not a NIfTI header's {raw.sizeof_hdr}")
        magic = bytes(raw["magic"]).rstrip(b"\x00")
        if magic not in (b"n+1", b"n+2"):
            raise ScanError(f"{path}: not a single-file NIfTI (magic {magic!r})")
        slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
        if np.isinf(slope) or (np.isfinite(slope) and slope != 0 and not np.isfinite(inter)):
            raise ScanError(f"{path}: header scaling scl_slope {slope:g}, scl_inter {inter:g} is not finite")
        if spacing is None:
            _check_nifti_spacing(img, raw, path)
        end = int(img.dataobj.offset) + n * dtype.itemsize  # where nibabel reads the voxels from
        if path.lower().endswith(".gz"):
            img = type(img).from_bytes(_gunzip_whole(path, end))
        elif os.path.getsize(path) != end:  # a header that lost a dimension or a type reads the data wrong
            size = os.path.getsize(path)
            raise ScanError(f"{path}: holds {abs(size - end):,} bytes {'more' if size > end else 'fewer'} than "
                            f"its header declares ({end:,}); header and data do not match")
        img = nib.squeeze_image(img)
        if (spacing or ctrate_spacing) is not None:
            img = _respaced(img, spacing or ctrate_spacing)
        vol = _canonical(img, {"format": "nifti"}, path)
    except ScanError:
        raise
    except Exception as e:  # nibabel raises many types for truncated/corrupt files
        raise ScanError(f"cannot read NIfTI {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if (spacing or ctrate_spacing) is not None:
        vol.spacing = tuple(float(s) for s in spacing or ctrate_spacing)  # exactly as given
        if spacing is not None:
            vol.info["spacing_given"] = True
    return vol


def _respaced(img, spacing_zyx):
    """``img`` with voxel sizes ``spacing_zyx`` (the canonical Z, Y, X axes, mm) instead of its own: each file
    axis keeps its direction and the file's first voxel its place, so slice positions follow the new sizes."""
    import nibabel as nib

    zyx = np.asarray(spacing_zyx, dtype=np.float64)
    if zyx.shape != (3,) or not np.all(np.isfinite(zyx)) or not (zyx > 0).all():
        raise ScanError(f"voxel sizes {zyx.tolist()} mm: three positive numbers are needed")
    affine = np.array(img.affine, dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or not (norms > 0).all():  # no directions to keep: the file's axes as RAS
        affine = np.eye(4)
        norms = np.ones(3)
    ras_axis = nib.io_orientation(affine)[:, 0].astype(int)  # the RAS axis each file axis runs along
    affine[:3, :3] = affine[:3, :3] / norms * zyx[::-1][ras_axis]
    return type(img)(img.dataobj, affine, img.header)


def _raw_header(img, path: str):
    """The header as the file holds it, before nibabel's fix-ups (it quietly sets a zero pixdim to 1 mm)."""
    with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
        return type(img).header_class.from_fileobj(f, check=False)


def _check_nifti_spacing(img, raw, path: str) -> None:
    """The header's own pixdim and the affine's voxel sizes: positive, finite, a CT's."""
    lo, hi = PLAUSIBLE_SPACING_MM
    pixdim = [float(z) for z in raw["pixdim"][1:4]]
    voxel = np.sqrt((np.asarray(img.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    for what, sizes in (("pixdim", pixdim), ("affine voxel size", voxel)):
        if not all(np.isfinite(s) and lo <= s <= hi for s in sizes):
            raise ScanError(f"{path}: header {what} {[float(f'{s:.4g}') for s in sizes]} mm is not a CT's "
                            f"({lo}-{hi} mm); give the spacing with --spacing Z Y X")


def _gzip_module():
    """ISA-L's gzip (``isal``, a dependency) where it imports: it decompresses a CT twice as fast as zlib, which
    is half of a 512×512×300 volume's load. The standard library's otherwise; both check the CRC."""
    try:
        from isal import igzip, isal_zlib

        return igzip, (isal_zlib.error,)
    except ImportError:
        return gzip, ()


def _gunzip_whole(path: str, expected: int) -> bytes:
    """The whole decompressed stream of a gzip file, its CRC and length checked; refused when it holds more than
    the ``expected`` bytes (a gzip bomb, or a header that does not match its data) or is cut short. It is read
    into one buffer of the declared size (plus a byte, to notice more)."""
    out = bytearray(expected + 1)
    view, n = memoryview(out), 0
    module, errors = _gzip_module()
    try:
        with module.open(path, "rb") as f:
            while n <= expected:
                got = f.readinto(view[n: min(n + (1 << 22), expected + 1)])
                if not got:
                    break
                n += got
            if n > expected:
                raise ScanError(f"{path}: holds more data than its header declares ({expected:,} bytes)")
    except (OSError, EOFError, zlib.error, *errors) as e:
        raise ScanError(f"cannot read NIfTI {path}: corrupt gzip stream ({e})".splitlines()[0]) from None
    if n < expected:  # refused before nibabel allocates the volume the header declares
        raise ScanError(f"{path}: holds {expected - n:,} bytes fewer than its header declares ({expected:,})")
    del view
    del out[expected:]
    return out


def _canonical(img, info: dict, path: str) -> Volume:
    """A 3-D nibabel image in any orientation -> canonical :class:`Volume`."""
    import nibabel as nib

    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    # nibabel's canonical array is [X, Y, Z] (RAS); ours is [Z, Y, X].
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    return Volume(hu=hu, spacing=zooms[::-1], source=path, info=info, affine=np.asarray(img.affine, dtype=np.float64))


#: M3D's grid (depth, rows, columns) after its resize; the physical size is lost, so by default the grid is
#: taken to span a cube of this many mm (a chest-sized field of view). ``--spacing`` overrides it.
M3D_SHAPE = (32, 256, 256)
M3D_ASSUMED_FOV_MM = 336.0


def _load_npy(path: str, spacing) -> Volume:
    """A ``.npy`` volume: M3D's normalised ``[1, D, H, W]`` / ``[D, H, W]`` in [0, 1] (plane from the file
    name), or a plain ``[Z, Y, X]`` HU array in the canonical frame whose spacing the user gives."""
    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r")  # the header first: sizes before allocation
    except Exception as e:
        raise ScanError(f"cannot read .npy {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(data, np.ndarray):  # an .npz archive under an .npy name
        getattr(data, "close", lambda: None)()
        raise ScanError(f"{path}: an .npz archive, not a .npy array")
    if data.dtype.kind not in "iuf" or data.dtype.fields is not None:
        raise ScanError(f"{path}: a {data.dtype} array, not real-valued image data")
    if data.size > max_voxels():
        raise ScanError(f"{path}: {data.size:,} voxels, more than the {max_voxels():,} accepted (SAMF_MAX_VOXELS)")
    if data.ndim == 4 and data.shape[0] == 1:   # M3D keeps a leading channel axis
        data = data[0]
    if data.ndim != 3:
        raise ScanError(f"{path}: expected a 3-D [Z, Y, X] array, got shape {data.shape}")
    data = np.asarray(data, dtype=np.float32)
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


def check_volume(vol: Volume, force: bool = False) -> None:
    """Refuse what is not a CT volume: non-finite voxels, too few slices, impossible spacing; and, unless
    ``force``, values that do not look like a CT (see :func:`check_ct_values`)."""
    hu = vol.hu
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise ScanError(f"{vol.source}: shape {hu.shape} is a single slice, not a volume")
    if min(hu.shape) < MIN_VOXELS_PER_AXIS:
        raise ScanError(f"{vol.source}: shape {hu.shape} is too small for a CT volume (at least "
                        f"{MIN_VOXELS_PER_AXIS} voxels along every axis)")
    if any(not np.isfinite(s) or s <= 0 for s in vol.spacing):
        raise ScanError(f"{vol.source}: invalid voxel spacing {vol.spacing}")
    if not np.isfinite(hu).all():
        raise ScanError(f"{vol.source}: volume has NaN or infinite voxels")
    lo, hi = float(hu.min()), float(hu.max())
    if vol.intensity == "unit":
        if hi - lo < 1e-3:
            raise ScanError(f"{vol.source}: a constant volume (all voxels {lo:.3f})")
        if not force:
            check_unit_values(vol)
    elif not force:
        check_ct_values(vol, lo, hi)
    # Last: values in the wrong units (a raw CT-RATE volume, whose header says 1 mm) are the likelier fault.
    extent = np.asarray(hu.shape) * np.asarray(vol.spacing, dtype=np.float64)
    if (extent < MIN_EXTENT_MM).any():
        raise ScanError(f"{vol.source}: scan extent {np.round(extent).astype(int).tolist()} mm is too small for a "
                        f"CT volume (at least {MIN_EXTENT_MM:.0f} mm along every axis)")


#: What every chest CT shows (``check_ct_values``): air outside the body and in the lungs, soft tissue, and
#: anatomy that varies smoothly from voxel to voxel.
MIN_AIR_FRACTION = 0.05          # of voxels at or below -900 HU (air, or the scanner's padding)
MIN_TISSUE_FRACTION = 0.02       # of voxels within -200..200 HU
MIN_NEIGHBOUR_CORRELATION = 0.3  # between voxels one apart along X


def check_ct_values(vol: Volume, lo: float, hi: float) -> None:
    """Refuse values no CT in Hounsfield units has: outside CT's range, no air, no soft tissue (negated or
    non-HU data), or no spatial structure (noise). ``--force`` is the way past it."""
    hint = " (--force to use it anyway)"
    if lo > -500.0 or hi < 0.0 or lo < -3100.0 or hi > 40000.0:
        raise ScanError(f"{vol.source}: values {lo:.0f}..{hi:.0f} do not look like CT in Hounsfield units "
                        f"(no air near -1000 HU){hint}")
    sample = vol.hu[::max(1, vol.hu.shape[0] // 32)]  # every few slices: the test costs milliseconds
    air = float((sample <= -900.0).mean())
    tissue = float(((sample >= -200.0) & (sample <= 200.0)).mean())
    if air < MIN_AIR_FRACTION or tissue < MIN_TISSUE_FRACTION:
        raise ScanError(f"{vol.source}: {air:.0%} of voxels are air and {tissue:.0%} soft tissue; a CT in "
                        f"Hounsfield units has both (negated, rescaled or non-CT data?){hint}")
    _check_structure(vol, neighbour_correlation(vol.hu, 2))


def neighbour_correlation(data: np.ndarray, axis: int) -> float:
    """Pearson correlation of voxels with their next neighbour along ``axis`` (every few slices across the first
    other axis, about a million pairs: milliseconds). Anatomy is smooth (0.75-0.97 on the phantoms, in HU or in
    [0, 1]); noise is not (about 0). 0 for a volume constant along the pairs."""
    a = np.moveaxis(data, axis, -1)
    sample = a[::max(1, a.shape[0] // 32)]  # every few slices: the test costs milliseconds
    rows = sample[:, :: max(1, sample[:, :, 0].size // 4096)]  # about a million voxel pairs are plenty
    x, y = rows[:, :, :-1].ravel().astype(np.float64), rows[:, :, 1:].ravel().astype(np.float64)
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else 0.0


def _check_structure(vol: Volume, corr: float) -> None:
    if not corr >= MIN_NEIGHBOUR_CORRELATION:
        raise ScanError(f"{vol.source}: neighbouring voxels are unrelated (correlation {corr:.2f}); this looks "
                        f"like noise, not anatomy (--force to use it anyway)")


def check_unit_values(vol: Volume) -> None:
    """The anatomy check of :func:`check_ct_values` for a volume already in [0, 1] (M3D), which has no HU to
    check: neighbouring voxels must correlate along at least one axis. Along any, not only X: M3D resized each
    stack to 32 images, so the axis across its images (X for a sagittal stack) can be coarse; noise correlates
    along none. ``--force`` is the way past it."""
    _check_structure(vol, max(neighbour_correlation(vol.hu, axis) for axis in range(3)))


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
