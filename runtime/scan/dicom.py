"""DICOM series folders: find the series, pick one, sort slices by position, rescale to HU, orient.

Slices are ordered by ImagePositionPatient projected on the slice normal (not by file name or
InstanceNumber); RescaleSlope/Intercept give HU; PixelSpacing and the positions give the spacing. A series
may be classic single-frame images or Enhanced CT multi-frame files, whose per-frame position, orientation,
spacing and rescale live in functional groups; both become the same list of frames. The volume is handed to
nibabel with its patient-space affine so it lands in the same canonical frame as a NIfTI file.
numpy + pydicom (+ nibabel) only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from samf.errors import ScanError

from .guards import PLAUSIBLE_SPACING_MM, open_regular

#: What to install for compressed transfer syntaxes pydicom cannot decode by itself.
_DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


@dataclass
class Frame:
    """One 2-D image of a series: a single-frame file (``index`` None) or one frame of a multi-frame file."""

    path: str
    index: int | None
    position: np.ndarray            # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray         # ImageOrientationPatient: row direction, column direction
    pixel_spacing: tuple            # (row spacing, column spacing) mm
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class Series:
    uid: str
    modality: str
    description: str
    frames: list = field(default_factory=list)
    n_files: int = 0
    unplaced: int = 0               # images without a position, orientation or pixel spacing

    def __len__(self) -> int:
        return len(self.frames)

    def summary(self, verbose: bool = False) -> str:
        """How messages name the series: its modality and size; its UID and description (identifiers under
        DICOM's de-identification rules, PS3.15) only when ``verbose``."""
        if not verbose:
            return f"the {self.modality or 'unknown-modality'} series of {len(self)} images"
        return f"{self.uid} ({self.modality}, {len(self)} images{', ' + self.description if self.description else ''})"


def _numbers(path: str, name: str, value, n: int) -> np.ndarray:
    """A header value as exactly ``n`` finite numbers, or a one-line refusal naming the tag."""
    items = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else value
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ScanError(f"{path}: {name} is not numeric") from None
    if len(values) != n:
        raise ScanError(f"{path}: {name} has {len(values)} values, not {n}")
    if not all(np.isfinite(values)):
        raise ScanError(f"{path}: {name} is not finite")
    return np.asarray(values, dtype=float)


def _value_or(value, default):
    """A tag's value, or ``default`` where the tag is absent or empty (but not where it holds 0)."""
    return default if value is None or (isinstance(value, (str, bytes)) and not value.strip()) else value


def _rescale(path: str, item) -> tuple:
    slope = _numbers(path, "RescaleSlope", _value_or(item.get("RescaleSlope"), 1), 1)[0]
    intercept = _numbers(path, "RescaleIntercept", _value_or(item.get("RescaleIntercept"), 0), 1)[0]
    if slope <= 0:  # a CT's stored values grow with HU; a zero or negative slope is a broken header
        raise ScanError(f"{path}: RescaleSlope is {slope:g}, not positive")
    return float(slope), float(intercept)


def _frame(path: str, index, position, orientation, spacing, rescale) -> Frame:
    pos = _numbers(path, "ImagePositionPatient", position, 3)
    ori = _numbers(path, "ImageOrientationPatient", orientation, 6)
    row, col = ori[:3], ori[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(np.dot(row, col)) > 1e-3:
        raise ScanError(f"{path}: ImageOrientationPatient {ori.round(4).tolist()} is not two orthogonal unit vectors")
    sp = _numbers(path, "PixelSpacing", spacing, 2)
    lo, hi = PLAUSIBLE_SPACING_MM
    if not all(lo <= v <= hi for v in sp):
        raise ScanError(f"{path}: PixelSpacing {sp.tolist()} mm is not a CT's ({lo}-{hi} mm)")
    return Frame(path, index, pos, ori, (float(sp[0]), float(sp[1])), *_rescale(path, rescale))


def _frames_of(path: str, ds) -> list:
    """The frames a header describes: one for a classic image, NumberOfFrames for an enhanced one."""
    try:
        n = int(_value_or(ds.get("NumberOfFrames"), 1))
    except (TypeError, ValueError):
        raise ScanError(f"{path}: NumberOfFrames is not a number") from None
    if n < 1:
        raise ScanError(f"{path}: NumberOfFrames is {n}")
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None

        def group(item, name):  # a functional group: per-frame first, then shared
            for src in (item, shared):
                if src is not None and name in src:
                    return src[name].value[0]
            raise ScanError(f"{path}: enhanced DICOM without {name}")

        frames = []
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence[:n]):
            try:
                rescale = group(item, "PixelValueTransformationSequence")
            except ScanError:
                rescale = ds                   # some writers keep rescale at the top level
            frames.append(_frame(path, i, group(item, "PlanePositionSequence").get("ImagePositionPatient"),
                                 group(item, "PlaneOrientationSequence").get("ImageOrientationPatient"),
                                 group(item, "PixelMeasuresSequence").get("PixelSpacing"), rescale))
        return frames
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        return []
    if n > 1:
        raise ScanError(f"{path}: a {n}-frame image without per-frame positions cannot be placed in space")
    return [_frame(path, None, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds)]


def find_series(folder: str) -> dict:
    """``{SeriesInstanceUID: Series}`` for every DICOM image below ``folder`` (headers only). Files that are not
    regular files (FIFOs, devices, sockets, links to them) are skipped without being opened for reading, as
    are files that are not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                f = open_regular(path)
                if f is None:
                    continue
                with f:
                    ds = pydicom.dcmread(f, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, TypeError):
                continue  # TypeError: pydicom on a "DICM" preamble followed by junk, read from a file object
            if "SeriesInstanceUID" not in ds:
                continue
            frames = _frames_of(path, ds)
            uid = str(ds.SeriesInstanceUID)
            s = series.setdefault(uid, Series(uid, str(ds.get("Modality", "")), str(ds.get("SeriesDescription", ""))))
            s.frames += frames
            s.n_files += 1
            s.unplaced += not frames
    return series


def choose_series(series: dict, uid: str | None = None, verbose: bool = False) -> tuple:
    """The requested series, or the CT series with the most images; returns (series, a line saying why)."""
    if not series:
        raise ScanError("no DICOM images found")
    if uid is not None:
        if uid not in series:
            found = "; ".join(s.summary(verbose) for s in series.values())
            raise ScanError(f"no series with that UID; found {found}" + ("" if verbose else " (--verbose lists UIDs)"))
        return series[uid], series[uid].summary(verbose)
    ct = [s for s in series.values() if s.modality == "CT"] or list(series.values())
    best = max(ct, key=len)
    why = best.summary(verbose)
    if len(series) > 1:
        why += (f"; {len(series)} series in the folder, the CT one with most images was chosen (pick with --series"
                + ("" if verbose else "; --verbose lists their UIDs") + ")")
    return best, why


def load_dicom_series(folder: str, uid: str | None = None, allow_non_ct: bool = False, verbose: bool = False):
    """Read one series of ``folder`` into a nibabel image in patient RAS space, plus a description (naming
    the series by UID and description only when ``verbose``)."""
    import nibabel as nib

    if not any(files for _, _, files in os.walk(folder)):
        raise ScanError(f"{folder} is an empty folder")
    series = find_series(folder)
    if not series:
        raise ScanError(f"{folder} holds no DICOM images")
    s, why = choose_series(series, uid, verbose)
    name = s.summary(verbose)
    if s.modality != "CT" and not allow_non_ct:
        raise ScanError(f"{name} is not CT (use --allow-non-ct)")
    if s.unplaced:
        raise ScanError(f"{name}: {s.unplaced} of {s.n_files} images have no position, orientation or "
                        "pixel spacing, so the volume cannot be assembled")
    if len(s) < 2:
        raise ScanError(f"{name} has a single image: a slice, not a volume")
    f0 = s.frames[0]
    if any(not np.allclose(f.orientation, f0.orientation, atol=1e-3) for f in s.frames):
        raise ScanError(f"{name}: images with different orientations (a localizer or a reformat mixed in)")
    if any(not np.allclose(f.pixel_spacing, f0.pixel_spacing, rtol=1e-3) for f in s.frames):
        raise ScanError(f"{name}: images with different pixel spacings")
    row_dir, col_dir = f0.orientation[:3], f0.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([np.dot(f.position, normal) for f in s.frames])
    order = np.argsort(pos)
    frames = [s.frames[i] for i in order]
    pos = pos[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise ScanError(f"{name}: several images share one position (a multi-phase or duplicated series)")
    dz = float(np.median(gaps))
    lo, hi = PLAUSIBLE_SPACING_MM
    if not lo <= dz <= hi:
        raise ScanError(f"{name}: slices {dz:.4g} mm apart, not a CT's ({lo}-{hi} mm)")
    if np.ptp(gaps) > 0.1 * dz:
        raise ScanError(f"{name}: slices {gaps.min():.3g} to {gaps.max():.3g} mm apart (missing slices?); "
                        "the spacing must be even")
    steps = np.diff(np.stack([f.position for f in frames]), axis=0)
    off_normal = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if np.any(off_normal > 0.01 * np.linalg.norm(steps, axis=1) + 1e-3):
        raise ScanError(f"{name}: slice positions do not follow the slice normal (gantry tilt?); "
                        "resample it to an orthogonal grid first")
    dr, dc = f0.pixel_spacing
    slices = _pixels_hu(frames)
    shapes = {a.shape for a in slices}
    if len(shapes) != 1:
        raise ScanError(f"{name}: images of different sizes {sorted(shapes)}")
    vol = np.stack(slices, axis=0)                    # [k, row j, col i]
    # Voxel (i, j, k) -> LPS: IPP_0 + i*dc*row_dir + j*dr*col_dir + k*dz*normal; LPS -> RAS flips x, y.
    affine = np.eye(4)
    affine[:3, 0] = row_dir * dc
    affine[:3, 1] = col_dir * dr
    affine[:3, 2] = normal * dz
    affine[:3, 3] = frames[0].position
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), affine)
    info = dict(format="dicom", series=s.uid if verbose else None, modality=s.modality, images=len(frames),
                files=s.n_files, choice=why, n_series=len(series))
    return img, info


def _read_pixels(path: str) -> np.ndarray:
    import pydicom

    ds = None
    try:
        f = open_regular(path)
    except OSError as e:
        raise ScanError(f"{path}: cannot open ({e.strerror})") from None
    if f is None:  # a file replaced since its header was read
        raise ScanError(f"{path!r} is not a regular file")
    try:
        with f:
            ds = pydicom.dcmread(f)
            return ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:  # no decoder for this transfer syntax
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise ScanError(f"{path}: cannot decode {name} pixel data ({str(e).splitlines()[0][:80]}); "
                        f"{_DECODER_HINT}") from None
    except Exception as e:
        raise ScanError(f"{path}: unreadable DICOM image ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None


def _pixels_hu(frames: list) -> list:
    """HU arrays of ``frames`` in their order; each file is decoded once however many frames it holds."""
    multi: dict = {}   # multi-frame files, decoded once; single-frame files are read and dropped one by one
    out = []
    for f in frames:
        if f.index is None:
            arr = _read_pixels(f.path)
        else:
            if f.path not in multi:
                multi[f.path] = _read_pixels(f.path)
            arr = multi[f.path]
        if f.index is not None:
            if arr.ndim != 3 or f.index >= arr.shape[0]:
                raise ScanError(f"{f.path}: pixel data holds fewer frames than its header describes")
            arr = arr[f.index]
        elif arr.ndim != 2:
            raise ScanError(f"{f.path}: a {arr.ndim}-D image where one slice was expected")
        out.append(arr.astype(np.float32) * f.slope + f.intercept)
    return out
