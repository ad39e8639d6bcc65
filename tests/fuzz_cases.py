"""A seeded generator of hostile (and valid) inputs for the workstation CLI, by family.

Each :class:`Case` writes its inputs into a folder and returns the command line to run. ``expect`` says what a
correct program does with it:

- ``refuse``: exit 2 with exactly one ``error:`` line (and, when ``words`` are given, a line holding them);
- ``accept``: exit 0;
- ``either``: one of the two, cleanly; for changes no format can detect (a flipped bit in an uncompressed
  NIfTI's voxels, or an edit to a header field the reader does not use).

Families: ``nifti-header`` (fields of a NIfTI header), ``nifti-bytes`` (truncation, corruption, bombs, files that
are not files), ``npy``, ``dicom`` (header values, missing and broken images, valid variants), ``values`` (well-
formed files whose values no CT has), ``cli`` (option values), ``bundle`` (artifact and manifest tampering,
signatures). The same seed gives the same cases.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SEED = 20261129


@dataclass
class Context:
    """What cases share: a bundle (read-only), a copy signed by ``key``, and a valid scan."""

    bundle: str
    signed_bundle: str
    trusted_key: str
    other_key: str
    scan: str


@dataclass
class Case:
    family: str
    name: str
    expect: str
    build: Callable  # (folder, Context) -> argv: [tool, args...]
    words: tuple = ()
    env: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}"

    def make(self, folder: str, ctx: Context) -> list:
        """Write this case's inputs into ``folder``; the command line. Its random draws depend on its id
        only, so a case is the same whether it runs alone or among all."""
        _STATE["rng"] = np.random.default_rng(zlib.crc32(self.id.encode()))
        return self.build(folder, ctx)


_STATE: dict = {}


def rnd() -> np.random.Generator:
    """The random generator of the case being built."""
    return _STATE["rng"]


def seed() -> int:
    return int(rnd().integers(100))


# ----------------------------------------------------------------------------- volumes

def phantom(seed: int = 5, shape=(40, 64, 64), spacing=(6.0, 5.0, 5.0)) -> np.ndarray:
    from samf.runtime.tools.phantom import make_phantom

    return make_phantom(seed, shape=shape, spacing=spacing).volume, spacing


def nifti_bytes(hu: np.ndarray, spacing, dtype=np.int16, affine=None, slope=None) -> bytes:
    """A single-file NIfTI-1 of a canonical [Z, Y, X] volume, as nibabel writes it."""
    import nibabel as nib

    sz, sy, sx = spacing
    data = hu.transpose(2, 1, 0)
    data = np.round(data).astype(dtype) if np.dtype(dtype).kind in "iu" else data.astype(dtype)
    img = nib.Nifti1Image(data, np.diag([sx, sy, sz, 1.0]) if affine is None else affine)
    img.header.set_xyzt_units("mm")
    if slope is not None:
        img.header.set_slope_inter(*slope)
    return img.to_bytes()


def patch(raw: bytes, offset: int, fmt: str, *values) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, *values)
    return bytes(b)


def write(folder, name: str, data: bytes) -> str:
    p = os.path.join(folder, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


# NIfTI-1 header offsets
DIM, DATATYPE, BITPIX, PIXDIM, VOX_OFFSET, SCL_SLOPE, SCL_INTER = 40, 70, 72, 76, 108, 112, 116
QFORM_CODE, SFORM_CODE, SROW_X, MAGIC = 252, 254, 280, 344


def _info(path):
    return ["samf", "info", path]


# ----------------------------------------------------------------------------- families

def nifti_header_cases(rng) -> list:
    cases = []

    def case(name, expect, mutate, gz=False, words=()):
        def build(folder, ctx, mutate=mutate, gz=gz):
            hu, sp = phantom(seed())
            raw = mutate(nifti_bytes(hu, sp))
            return _info(write(folder, "scan.nii.gz" if gz else "scan.nii", gzip.compress(raw) if gz else raw))
        cases.append(Case("nifti-header", name, expect, build, words))

    for gz in (False, True):
        ext = "gz" if gz else "nii"
        for d0 in (0, 1, 2, -1, 8):
            case(f"dim0={d0}-{ext}", "refuse", lambda r, d0=d0: patch(r, DIM, "<h", d0), gz)
        case(f"dim0=4-t1-{ext}", "accept", lambda r: patch(r, DIM, "<5h", 4, 64, 64, 40, 1), gz)
        case(f"dim0=4-t3-{ext}", "refuse", lambda r: patch(r, DIM, "<5h", 4, 64, 64, 40, 3), gz)
        for axis in (1, 2, 3):
            for v in (0, -7, 1, 63, 65, 32000):
                case(f"dim{axis}={v}-{ext}", "refuse", lambda r, a=axis, v=v: patch(r, DIM + 2 * a, "<h", v), gz)
        for code, bits in ((16, 32), (32, 64), (128, 24), (1, 1), (2, 8), (768, 32), (1536, 128), (2304, 32),
                           (0, 16), (9999, 16), (1792, 128), (512, 16)):
            case(f"datatype={code}-{ext}", "refuse",
                 lambda r, c=code, b=bits: patch(patch(r, DATATYPE, "<h", c), BITPIX, "<h", b), gz)
        for axis in (1, 2, 3):
            for v in (0.0, -5.0, float("nan"), float("inf"), 1e38, 1e-6, 500.0):
                case(f"pixdim{axis}={v}-{ext}", "refuse", lambda r, a=axis, v=v: patch(r, PIXDIM + 4 * a, "<f", v),
                     gz, ("--spacing",))
        case(f"pixdim0=-1-{ext}", "either", lambda r: patch(r, PIXDIM, "<f", -1.0), gz)
        for v in (1e9, -352.0, 100.0, 400.0):
            case(f"vox_offset={v}-{ext}", "refuse", lambda r, v=v: patch(r, VOX_OFFSET, "<f", v), gz)
        for v in (float("inf"), 1e30, -1.0, 1e-3):
            case(f"scl_slope={v}-{ext}", "refuse", lambda r, v=v: patch(r, SCL_SLOPE, "<ff", v, 0.0), gz)
        case(f"scl_slope=nan-{ext}", "accept", lambda r: patch(r, SCL_SLOPE, "<ff", float("nan"), 0.0), gz)
        for v in (1e6, -5000.0, float("inf")):
            case(f"scl_inter={v}-{ext}", "refuse", lambda r, v=v: patch(r, SCL_SLOPE, "<ff", 1.0, v), gz)
        for magic in (b"xx1\x00", b"ni1\x00", b"\x00\x00\x00\x00"):
            case(f"magic={magic[:3].decode(errors='replace')}-{ext}", "refuse",
                 lambda r, m=magic: patch(r, MAGIC, "4s", m), gz)
        for v in (0, 540, 1000000):
            case(f"sizeof_hdr={v}-{ext}", "refuse", lambda r, v=v: patch(r, 0, "<i", v), gz)
        case(f"no-qform-no-sform-{ext}", "accept", lambda r: patch(r, QFORM_CODE, "<hh", 0, 0), gz)
        case(f"sform-singular-{ext}", "refuse",
             lambda r: patch(patch(r, QFORM_CODE, "<hh", 0, 2), SROW_X, "<4f", 0, 0, 0, 0), gz)
        case(f"sform-nan-{ext}", "refuse",
             lambda r: patch(patch(r, QFORM_CODE, "<hh", 0, 2), SROW_X, "<4f", *[float("nan")] * 4), gz)
    return cases


def nifti_bytes_cases(rng) -> list:
    cases = []

    def good(gz: bool) -> bytes:
        hu, sp = phantom(seed())
        raw = nifti_bytes(hu, sp)
        return gzip.compress(raw) if gz else raw

    def case(name, expect, build, words=()):
        cases.append(Case("nifti-bytes", name, expect, build, words))

    for gz in (False, True):
        ext, name = ("gz", "scan.nii.gz") if gz else ("nii", "scan.nii")
        case(f"valid-{ext}", "accept", lambda f, c, gz=gz, name=name: _info(write(f, name, good(gz))))
        for frac in (0.0, 0.001, 0.2, 0.5, 0.9):
            case(f"truncated-{frac}-{ext}", "refuse",
                 lambda f, c, frac=frac, gz=gz, name=name: _info(write(f, name, (lambda r: r[:int(len(r) * frac)])(
                     good(gz)))))
        case(f"one-byte-short-{ext}", "refuse", lambda f, c, gz=gz, name=name: _info(write(f, name, good(gz)[:-1])))
        # gzip(1) itself ignores zero padding after a stream (tape blocks): the data is whole and checked
        case(f"trailing-zeros-{ext}", "accept" if gz else "refuse",
             lambda f, c, gz=gz, name=name: _info(write(f, name, good(gz) + b"\x00" * 4096)))
    for i in range(12):  # a flipped bit anywhere gzip's CRC covers: the deflate stream, the CRC, the length
        def flip(f, c, i=i):
            raw = bytearray(good(True))
            pos = 10 + int(np.random.default_rng(i).integers(len(raw) - 10))
            raw[pos] ^= 1 << int(np.random.default_rng(i + 100).integers(8))
            return _info(write(f, "scan.nii.gz", bytes(raw)))
        case(f"bitflip-gz-{i}", "refuse", flip)
    for i in range(6):  # the same in an uncompressed file's voxels: no checksum can see it, a voxel changes
        def flip_voxel(f, c, i=i):
            raw = bytearray(good(False))
            pos = 352 + int(np.random.default_rng(i).integers(len(raw) - 352))
            raw[pos] ^= 1
            return _info(write(f, "scan.nii", bytes(raw)))
        case(f"bitflip-voxel-nii-{i}", "either", flip_voxel)
    case("gzip-header-mtime-changed", "accept",  # outside what gzip's CRC covers, and harmless
         lambda f, c: _info(write(f, "scan.nii.gz", patch(good(True), 4, "<I", 123456789))))
    case("second-gzip-member", "refuse",
         lambda f, c: _info(write(f, "scan.nii.gz", good(True) + gzip.compress(b"\x01" * 100000))), ("more data",))
    for mb in (64, 1024):
        def bomb(f, c, mb=mb):
            hu, sp = phantom(3)
            p = os.path.join(f, "bomb.nii.gz")
            with gzip.open(p, "wb", compresslevel=9) as g:
                g.write(nifti_bytes(hu, sp))
                zeros = b"\x00" * (1 << 20)
                for _ in range(mb):
                    g.write(zeros)
            return _info(p)
        case(f"gzip-bomb-{mb}MB", "refuse", bomb, ("more data",))
    case("gzip-named-nii", "refuse", lambda f, c: _info(write(f, "scan.nii", good(True))))
    case("plain-named-nii-gz", "refuse", lambda f, c: _info(write(f, "scan.nii.gz", good(False))))
    case("empty-file", "refuse", lambda f, c: _info(write(f, "scan.nii.gz", b"")))
    case("random-bytes", "refuse",
         lambda f, c: _info(write(f, "scan.nii", np.random.default_rng(1).bytes(400000))))
    case("random-gzip", "refuse",
         lambda f, c: _info(write(f, "scan.nii.gz", gzip.compress(np.random.default_rng(2).bytes(400000)))))

    def special(kind):
        def build(f, c):
            p = os.path.join(f, "scan.nii.gz")
            if kind == "fifo":
                os.mkfifo(p)
            elif kind == "dev-zero":
                os.symlink("/dev/zero", p)
            elif kind == "loop":
                os.symlink(p, p)
            elif kind == "dangling":
                os.symlink(os.path.join(f, "gone.nii.gz"), p)
            elif kind == "directory":
                os.mkdir(p)
            return _info(p)
        return build

    for kind in ("fifo", "dev-zero", "loop", "dangling", "directory"):
        case(kind, "refuse", special(kind))
    case("unsupported-extension", "refuse", lambda f, c: _info(write(f, "scan.mha", good(False))), ("unsupported",))
    return cases


def _npy(folder, name, array) -> str:
    p = os.path.join(folder, name)
    np.save(p, array, allow_pickle=True)
    return p


def npy_cases(rng) -> list:
    cases = []
    sp = ["--spacing", "6", "5", "5"]

    def case(name, expect, make, args=sp, words=()):
        cases.append(Case("npy", name, expect, lambda f, c: ["samf", "info", _npy(f, "vol.npy", make()), *args],
                          words))

    hu = lambda: phantom(seed())[0]  # noqa: E731
    case("int16", "accept", lambda: hu().astype(np.int16))
    case("float32", "accept", lambda: hu().astype(np.float32))
    case("float64", "accept", lambda: hu().astype(np.float64))
    case("float16", "accept", lambda: hu().astype(np.float16))
    case("big-endian", "accept", lambda: hu().astype(">i2"))
    case("fortran-order", "accept", lambda: np.asfortranarray(hu().astype(np.int16)))
    case("m3d-unit-volume", "accept", lambda: np.clip((hu()[None] + 1024) / 4000, 0, 1).astype(np.float32), [])
    # issue 30: uniform noise in [0, 1] was reported as an M3D volume; the anatomy check now applies to it too
    case("m3d-uniform-noise", "refuse", lambda: rnd().random((1, 32, 256, 256), dtype=np.float32), [],
         ("noise", "--force"))
    case("m3d-uniform-noise-forced", "accept", lambda: rnd().random((1, 32, 64, 64), dtype=np.float32), ["--force"])
    case("m3d-gaussian-noise", "refuse", lambda: np.clip(rnd().normal(0.5, 0.2, (32, 64, 64)), 0, 1), [],
         ("--force",))
    case("m3d-lung-window", "accept", lambda: np.clip((hu() + 1350) / 1500, 0, 1).astype(np.float32), [])
    case("m3d-bone-window", "accept", lambda: np.clip((hu() + 450) / 1500, 0, 1), [])

    def m3d_plane(plane):  # a phantom stacked in ``plane`` as M3D stacks display images, named after it
        def build(f, c):
            d = np.clip((phantom(seed())[0] + 1000) / 2000, 0, 1).astype(np.float32)[::-1, ::-1, ::-1]
            stack = {"Coronal": d.transpose(1, 0, 2), "Sagittal": d.transpose(2, 0, 1)}[plane]
            return ["samf", "info", _npy(f, f"{plane}_C__portal_venous_phase.npy", stack[None])]
        return build
    for plane in ("Coronal", "Sagittal"):
        cases.append(Case("npy", f"m3d-{plane.lower()}-unit-volume", "accept", m3d_plane(plane)))
    case("no-spacing", "refuse", lambda: hu().astype(np.int16), [], ("--spacing",))
    case("int8", "refuse", lambda: np.clip(hu(), -128, 127).astype(np.int8))
    case("uint8", "refuse", lambda: np.clip(hu() / 16 + 64, 0, 255).astype(np.uint8))
    case("bool", "refuse", lambda: hu() > 0)
    case("complex", "refuse", lambda: hu().astype(np.complex64))
    case("strings", "refuse", lambda: np.array([["a", "b"], ["c", "d"]]))
    case("structured", "refuse", lambda: np.zeros((8, 8, 8), dtype=[("a", "<i2"), ("b", "<f4")]))
    case("object-pickle", "refuse", lambda: np.array([{"x": 1}, None], dtype=object))
    case("2d", "refuse", lambda: hu()[0])
    case("5d", "refuse", lambda: hu()[None, None])
    case("nan", "refuse", lambda: np.where(np.arange(hu().size).reshape(40, 64, 64) == 5000, np.nan, hu()))
    case("inf", "refuse", lambda: np.where(np.arange(hu().size).reshape(40, 64, 64) == 5000, np.inf, hu()))
    case("empty", "refuse", lambda: np.zeros((0, 0, 0), np.int16))
    case("thin", "refuse", lambda: hu()[:3].astype(np.int16))

    def raw_case(name, make_bytes, args=sp):
        cases.append(Case("npy", name, "refuse", lambda f, c: ["samf", "info", write(f, "vol.npy", make_bytes()),
                                                                 *args]))

    def npy_header(shape, descr="<i2"):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
        return buf.getvalue()

    raw_case("declares-huge", lambda: npy_header((2000, 2000, 2000)) + b"\x00" * 1000)
    raw_case("declares-more-than-it-has", lambda: npy_header((40, 64, 64)) + b"\x00" * 1000)
    raw_case("negative-shape", lambda: npy_header((-1, 64, 64)) + b"\x00" * 1000)
    raw_case("bad-magic", lambda: b"\x93NUMPX" + npy_header((8, 8, 8))[6:] + b"\x00" * 1024)
    raw_case("header-garbage", lambda: b"\x93NUMPY\x01\x00\x20\x00" + b"{'descr': lambda: 0}".ljust(32) + b"\x00" * 64)

    def npz(f, c):
        p = os.path.join(f, "vol.npy")
        with open(p, "wb") as fh:
            np.savez(fh, hu=hu())
        return ["samf", "info", p, *sp]
    cases.append(Case("npy", "npz-renamed", "refuse", npz, ("npz",)))
    return cases


def _series(folder, hu, spacing, **kw) -> str:
    from dicom_writer import write_series

    write_series(folder, hu, spacing, shuffle_instance=False, **kw)
    return folder


def _edit_series(folder, edit) -> None:
    """``edit(i, dataset)`` on each image of a series in position order; returning "drop" deletes the file."""
    import pydicom
    from pydicom import config

    names = sorted(os.listdir(folder), key=lambda n: float(pydicom.dcmread(os.path.join(folder, n))
                                                           .ImagePositionPatient[2]))
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE  # write values no valid writer would
    try:
        for i, n in enumerate(names):
            p = os.path.join(folder, n)
            ds = pydicom.dcmread(p)
            if edit(i, ds) == "drop":
                os.remove(p)
            else:
                ds.save_as(p)
    finally:
        config.settings.writing_validation_mode = old


def _is_text(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and any(isinstance(x, str) for x in v))


def dicom_cases(rng) -> list:
    cases = []
    shape, spacing = (24, 40, 40), (8.0, 9.0, 9.0)

    def case(name, expect, edit=None, extra=None, args=(), words=(), hu_fn=None, **series_kw):
        def build(f, c):
            hu, _ = phantom(seed(), shape, spacing)
            folder = _series(os.path.join(f, "dcm"), hu_fn(hu) if hu_fn else hu, spacing, **series_kw)
            if edit is not None:
                _edit_series(folder, edit)
            if extra is not None:
                extra(folder)
            return ["samf", "info", folder, *args]
        cases.append(Case("dicom", name, expect, build, words))

    def on(indices, **tags):
        def edit(i, ds):
            if i in indices:
                for k, v in tags.items():
                    if v is None:
                        delattr(ds, k)
                    elif _is_text(v) and k != "PixelData":  # text in a numeric tag, as a broken writer leaves it
                        from pydicom.datadict import tag_for_keyword
                        from pydicom.dataelem import DataElement

                        ds.add(DataElement(tag_for_keyword(k), "LO", v))
                    else:
                        setattr(ds, k, v)
        return edit

    case("valid", "accept")
    case("valid-slope2", "accept", slope=2.0, intercept=-2048.0)
    case("valid-junk-files-beside", "accept",
         extra=lambda d: [write(d, n, b) for n, b in (("README.txt", b"hi"), (".DS_Store", b"\x00\x01" * 50))])
    # issue 30: a FIFO in a series folder hung `samf info` and `samf slices`; what is not a regular file is skipped
    # unopened (FIFOs, links to them, devices)
    case("valid-fifo-beside", "accept", extra=lambda d: os.mkfifo(os.path.join(d, "fifo")))
    case("valid-link-to-fifo-beside", "accept",
         extra=lambda d: (os.mkfifo(os.path.join(d, ".fifo")), os.symlink(".fifo", os.path.join(d, "IMG"))))
    case("valid-dev-zero-beside", "accept", extra=lambda d: os.symlink("/dev/zero", os.path.join(d, "IMGZERO")))

    def slices_beside_fifo(f, c):
        hu, _ = phantom(seed(), shape, spacing)
        folder = _series(os.path.join(f, "dcm"), hu, spacing)
        os.mkfifo(os.path.join(folder, "fifo"))
        return ["samf", "slices", folder, "--out", os.path.join(f, "out")]
    cases.append(Case("dicom", "valid-fifo-beside-slices", "accept", slices_beside_fifo))
    case("valid-nested-folder", "accept", extra=lambda d: os.rename(d, d + "-x") or os.makedirs(d) or
         os.rename(d + "-x", os.path.join(d, "sub")))
    case("valid-position-jitter", "accept",
         edit=lambda i, ds: setattr(ds, "ImagePositionPatient", [-100.0, -120.0, 50.0 + 8.0 * i + 1e-4 * (i % 3)]))
    case("mr-modality", "refuse", modality="MR", words=("not CT",))
    case("mr-modality-allowed", "accept", modality="MR", args=("--allow-non-ct",))
    n = shape[0]
    for k in range(6):
        i = int(rng.integers(n))
        case(f"ipp-2-values-{k}", "refuse", on({i}, ImagePositionPatient=[1.0, 2.0]))
        case(f"ipp-nan-{k}", "refuse", on({i}, ImagePositionPatient=[1.0, float("nan"), 3.0]))
        case(f"iop-5-values-{k}", "refuse", on({i}, ImageOrientationPatient=[1, 0, 0, 0, 1]))
        case(f"spacing-1-value-{k}", "refuse", on({i}, PixelSpacing=[9.0]))
        case(f"spacing-{['zero', 'negative', 'nan', 'huge', 'tiny', 'text'][k]}", "refuse",
             on({i}, PixelSpacing=[[0.0, 9.0], [-9.0, 9.0], [float("nan"), 9.0], [1e6, 9.0], [1e-9, 9.0],
                                   ["abc", "9"]][k]))
        case(f"ipp-missing-{k}", "refuse", on(set(rng.choice(n, size=k + 1, replace=False).tolist()),
                                                ImagePositionPatient=None))
        case(f"slope-{['zero', 'nan', 'text', 'inf', 'negative', 'negative-all'][k]}", "refuse",
             on({i}, RescaleSlope=[0.0, float("nan"), "abc", float("inf"), -1.0, None][k]) if k < 5
             else on(set(range(n)), RescaleSlope=-1.0))
        case(f"dropped-middle-image-{k}", "refuse",
             edit=lambda j, ds, i=int(rng.integers(1, n - 1)): "drop" if j == i else None, words=("missing slices",))
    for name, iop in (("non-unit", [2, 0, 0, 0, 1, 0]), ("non-orthogonal", [1, 0, 0, 0.5, 0.866, 0]),
                      ("zero", [0, 0, 0, 0, 0, 0]), ("text", ["a", "b", "c", "d", "e", "f"])):
        case(f"iop-{name}", "refuse", on(set(range(n)), ImageOrientationPatient=iop))
    case("iop-one-differs", "refuse", on({3}, ImageOrientationPatient=[0, 1, 0, 1, 0, 0]))
    case("spacing-varies", "refuse", on({7}, PixelSpacing=[8.5, 9.0]))
    case("duplicate-position", "refuse",
         edit=lambda i, ds: setattr(ds, "ImagePositionPatient", [-100.0, -120.0, 50.0 + 8.0 * (i - (i == 5))]))
    case("gantry-tilt", "refuse",
         edit=lambda i, ds: setattr(ds, "ImagePositionPatient", [-100.0 + 3.0 * i, -120.0, 50.0 + 8.0 * i]))
    case("10-km-gap", "refuse",
         edit=lambda i, ds: setattr(ds, "ImagePositionPatient", [-100.0, -120.0, 50.0 + 8.0 * i + 1e7 * (i > 11)]))
    case("10-km-apart", "refuse",
         edit=lambda i, ds: setattr(ds, "ImagePositionPatient", [-100.0, -120.0, 50.0 + 1e7 * i]))
    case("frames-text", "refuse", on({2}, NumberOfFrames="many"))
    case("frames-zero", "refuse", on({2}, NumberOfFrames=0))
    case("frames-two-on-classic", "refuse", on({2}, NumberOfFrames=2))
    case("rows-differ-from-pixels", "refuse", on({4}, Rows=41))
    case("columns-differ-from-pixels", "refuse", on({4}, Columns=20))
    case("bits-allocated-8", "refuse", on({4}, BitsAllocated=8, BitsStored=8, HighBit=7))
    case("pixel-data-missing", "refuse", on({4}, PixelData=None))
    case("pixel-data-short", "refuse", edit=lambda i, ds: setattr(ds, "PixelData", ds.PixelData[:100]) if i == 4
         else None)
    case("one-image-smaller", "refuse",
         edit=lambda i, ds: (setattr(ds, "Rows", 20), setattr(ds, "PixelData", ds.PixelData[:20 * 40 * 2]))
         if i == 6 else None)

    def truncate_one(folder, keep):
        name = sorted(os.listdir(folder))[3]
        p = os.path.join(folder, name)
        data = open(p, "rb").read()
        write(folder, name, data[:keep if keep > 0 else len(data) + keep])

    case("one-file-truncated-in-pixels", "refuse", extra=lambda d: truncate_one(d, -500))
    case("one-file-truncated-in-header", "refuse", extra=lambda d: truncate_one(d, 300))
    case("single-image", "refuse", edit=lambda i, ds: "drop" if i else None)
    case("three-images", "refuse", edit=lambda i, ds: "drop" if i > 2 else None, words=("too small",))
    case("noise-values", "refuse", hu_fn=lambda h: np.random.default_rng(3).uniform(-1000, 1500, h.shape),
         words=("--force",))

    def empty(f, c):
        os.makedirs(os.path.join(f, "dcm"))
        return ["samf", "info", os.path.join(f, "dcm")]
    cases.append(Case("dicom", "empty-folder", "refuse", empty, ("empty",)))

    def texts(f, c):
        d = os.path.join(f, "dcm")
        os.makedirs(d)
        for k in range(5):
            write(d, f"IMG{k}", b"not dicom at all" * 10)
        write(d, "DICM", b"\x00" * 128 + b"DICM" + b"\xff" * 64)
        return ["samf", "info", d]
    cases.append(Case("dicom", "folder-without-dicom", "refuse", texts, ("no DICOM",)))

    def only_special(f, c):
        d = os.path.join(f, "dcm")
        os.makedirs(d)
        os.mkfifo(os.path.join(d, "IMG0"))
        os.symlink("/dev/zero", os.path.join(d, "IMG1"))
        return ["samf", "info", d]
    cases.append(Case("dicom", "folder-of-fifos-and-devices", "refuse", only_special, ("no DICOM",)))
    return cases


def value_cases(rng) -> list:
    cases = []

    def case(name, expect, make, spacing=(6.0, 5.0, 5.0), dtype=np.int16, args=(), words=()):
        def build(f, c):
            return ["samf", "info", write(f, "scan.nii.gz", gzip.compress(nifti_bytes(make(), spacing, dtype))),
                    *args]
        cases.append(Case("values", name, expect, build, words))

    hu = lambda: phantom(seed())[0]  # noqa: E731
    shape = (40, 64, 64)
    for k in range(6):
        case(f"phantom-{k}", "accept", lambda k=k: phantom(k)[0])
    case("phantom-float32", "accept", hu, dtype=np.float32)
    case("phantom-fine-spacing", "accept", hu, spacing=(1.25, 0.7, 0.7))
    case("phantom-thick-slices", "accept", hu, spacing=(10.0, 5.0, 5.0))
    case("phantom-forced-negated", "accept", lambda: -hu(), args=("--force",))
    case("uniform-noise", "refuse", lambda: rnd().uniform(-1024, 1500, shape), words=("--force",))
    case("gaussian-noise", "refuse", lambda: rnd().normal(0, 500, shape), words=("--force",))
    case("negated", "refuse", lambda: -hu(), words=("--force",))
    case("constant-0", "refuse", lambda: np.zeros(shape), words=("--force",))
    case("constant-air", "refuse", lambda: np.full(shape, -1024.0), words=("--force",))
    case("mri-like", "refuse", lambda: np.clip(hu() + 1024, 0, 800) / 2, words=("--force",))
    case("times-1000", "refuse", lambda: hu() * 1000, dtype=np.float32, words=("--force",))
    case("plus-3000", "refuse", lambda: hu() + 3000, words=("--force",))
    case("unit-range", "refuse", lambda: (hu() + 1024) / 4096, dtype=np.float32, words=("--force",))
    case("shuffled-voxels", "refuse", lambda: rnd().permutation(hu().ravel()).reshape(shape), words=("--force",))
    for n in (1, 2, 3, 5, 7):
        case(f"{n}-voxels-along-z", "refuse", lambda n=n: hu()[:n], words=("too small",) if n > 1 else ())
    case("thin-extent", "refuse", lambda: hu()[:12], spacing=(1.0, 5.0, 5.0), words=("too small",))
    case("nan-voxel", "refuse", lambda: np.where(np.arange(np.prod(shape)).reshape(shape) == 77, np.nan, hu()),
         dtype=np.float32, words=("NaN",))
    case("inf-voxel", "refuse", lambda: np.where(np.arange(np.prod(shape)).reshape(shape) == 77, np.inf, hu()),
         dtype=np.float32)
    case("too-many-voxels", "refuse", hu, words=("SAMF_MAX_VOXELS",))
    cases[-1].env = {"SAMF_MAX_VOXELS": "1000"}
    return cases


def cli_cases(rng) -> list:
    cases = []

    def case(name, expect, args_fn, words=()):
        cases.append(Case("cli", name, expect, args_fn, words))

    def report(*args):
        return lambda f, c: ["samf", "report", c.scan, "--bundle", c.bundle, *args]

    for v in ("0", "-1", "3073", "abc", "1.5", "99999999999999999999"):
        case(f"max-tokens={v}", "refuse", report("--max-tokens", v))
    case("max-tokens=1", "accept", report("--max-tokens", "1"))
    for v in ("0", "-1", "abc", "100000"):
        case(f"threads={v}", "refuse", report("--threads", v))
    case("threads=1", "accept", report("--threads", "1", "--max-tokens", "4"))
    # issue 30: more threads than cores hung a report under load; they are capped to the cores, with a note
    case("threads=512", "accept", report("--threads", "512", "--max-tokens", "4"))
    case("threads=1024", "accept", report("--threads", "1024", "--max-tokens", "4"))
    for v in ("-2", "abc"):
        case(f"gpu-layers={v}", "refuse", report("--gpu-layers", v))
    for v in ("Q2_K", "../llm-F32.gguf", ""):
        case(f"quant={v or 'empty'}", "refuse", report("--quant", v))
    for vals in (("0", "1", "1"), ("-1", "1", "1"), ("nan", "nan", "nan"), ("inf", "1", "1"), ("1", "1"),
                 ("a", "b", "c"), ("1e9", "1", "1")):
        case(f"spacing={'x'.join(vals)}", "refuse",
             lambda f, c, v=vals: ["samf", "info", c.scan, "--spacing", *v])
    case("series-on-nifti", "refuse", lambda f, c: ["samf", "info", c.scan, "--series", "1.2.3"])
    case("bundle-missing", "refuse", lambda f, c: ["samf", "report", c.scan, "--bundle", os.path.join(f, "nope")])
    case("bundle-is-a-file", "refuse", lambda f, c: ["samf", "report", c.scan, "--bundle", c.scan])
    case("bundle-is-dev-null", "refuse", lambda f, c: ["samf", "report", c.scan, "--bundle", "/dev/null"])
    case("no-bundle-option", "refuse", lambda f, c: ["samf", "report", c.scan])
    case("unknown-option", "refuse", report("--fast"))
    case("unknown-command", "refuse", lambda f, c: ["samf", "reprot", c.scan])
    case("no-arguments-to-report", "refuse", lambda f, c: ["samf", "report"])
    case("newline-in-name", "refuse", lambda f, c: ["samf", "info", os.path.join(f, "a\nerror: forged.nii.gz")])
    case("non-utf8-name", "refuse", lambda f, c: ["samf", "info", os.path.join(f, "scan-\udcff.nii.gz")])
    case("request-too-long", "refuse", report("--request", "describe the lungs " * 3000, "--max-tokens", "4"))
    case("empty-request", "refuse", report("--request", "", "--max-tokens", "4"))

    def vqa(*choices, question="Where is the nodule?"):
        return lambda f, c: ["samf", "vqa", c.scan, "--bundle", c.bundle, "--question", question,
                             *[a for ch in choices for a in ("--choice", ch)]]
    case("vqa-3-choices", "refuse", vqa("a", "b", "c"))
    case("vqa-5-choices", "refuse", vqa("a", "b", "c", "d", "e"))
    case("vqa-empty-question", "refuse", vqa("a", "b", "c", "d", question=""))
    case("vqa-valid", "accept", vqa("right lung", "left lung", "liver", "heart"))

    def ctrate_meta(content):
        def build(f, c):
            p = write(f, "meta.csv", content)
            return ["samf", "info", c.scan, "--ctrate-metadata", p]
        return build
    case("ctrate-meta-not-listed", "refuse", ctrate_meta(b"VolumeName,XYSpacing,ZSpacing,RescaleSlope,"
                                                         b"RescaleIntercept\nother.nii.gz,\"[1, 1]\",1,1,0\n"))
    case("ctrate-meta-garbage", "refuse", ctrate_meta(b"\x00\xff\xfe garbage"))
    case("ctrate-meta-missing", "refuse", lambda f, c: ["samf", "info", c.scan, "--ctrate-metadata",
                                                       os.path.join(f, "none.csv")])
    case("slices-out-is-a-file", "refuse", lambda f, c: ["samf", "slices", c.scan, "--out", c.scan])
    # issue 30: each of these gave a traceback
    for name, out in (("dev-null", "/dev/null"), ("under-dev-null", "/dev/null/slices"), ("name-300", "a" * 300),
                      ("name-300-then-more", "b" * 300 + "/c"), ("name-256", "c" * 256)):
        case(f"slices-out-{name}", "refuse",
             lambda f, c, out=out: ["samf", "slices", c.scan, "--out", os.path.join(f, out)], ("--out",))
    case("slices-out-name-255", "accept", lambda f, c: ["samf", "slices", c.scan, "--out", os.path.join(f, "d" * 255)])
    case("report-out-dev-null", "refuse", report("--out", "/dev/null"), ("--out",))
    case("report-evidence-dev-null", "refuse", report("--evidence", "/dev/null"), ("--evidence",))
    for v in ("BOGUS", "Q2_K", "", "q8_0x"):  # refused before the ONNX export and the base GGUF, not after
        case(f"export-bundle-quant={v or 'empty'}", "refuse",
             lambda f, c, v=v: ["samf-export", "bundle", f, "--out", os.path.join(f, "b"), "--quant", v], ("--quant",))
    case("export-synthetic-quant=BOGUS", "refuse",
         lambda f, c: ["samf-export", "synthetic-bundle", "--out", os.path.join(f, "b"), "--quant", "BOGUS"],
         ("--quant",))
    case("export-quantize-type=BOGUS", "refuse",
         lambda f, c: ["samf-export", "quantize", c.scan, os.path.join(f, "q.gguf"), "--type", "BOGUS"], ("--type",))
    case("bench-zero-scans", "refuse", lambda f, c: ["samf", "bench", "--bundle", c.bundle, "--scans", "0"])
    case("bench-zero-new-tokens", "refuse", lambda f, c: ["samf", "bench", "--bundle", c.bundle, "--new-tokens", "0"])
    case("export-verify-not-a-bundle", "refuse", lambda f, c: ["samf-export", "verify", f])
    case("export-sign-missing-key", "refuse",
         lambda f, c: ["samf-export", "sign", c.bundle, "--key", os.path.join(f, "no.key")])
    return cases


# ----------------------------------------------------------------------------- bundles

def copy_bundle(src: str, dst: str) -> str:
    """A copy whose files are hard links to ``src``'s: cheap; edit a file only after :func:`own`."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def own(path: str) -> str:
    """Replace a hard link by a private copy, so that editing it leaves the original alone."""
    tmp = path + ".own"
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)
    return path


def loaded_file(manifest: dict, fn: str) -> str:
    """The encoder file a CPU report (``--encoders auto``) loads in place of ``fn`` (vit.onnx, aggregator.onnx,
    fusion.onnx): the int8 variant's where the bundle kept one, else ``fn``."""
    return manifest["encoders"].get("int8", {}).get("files", {}).get(fn.split(".")[0], fn)

def _manifest(b):
    with open(os.path.join(b, "manifest.json")) as f:
        return json.load(f)


def _put_manifest(b, m, reseal: bool):
    from samf.runtime.bundle.manifest import seal

    os.remove(os.path.join(b, "manifest.json"))
    with open(os.path.join(b, "manifest.json"), "w") as f:
        json.dump(seal(m) if reseal else m, f, indent=2)


def schema_paths(schema=None, path=()) -> list:
    """Every key path the manifest schema names (leaves: values, arrays, open maps), plus an artifact's hash."""
    from samf.runtime.bundle.manifest import SCHEMA

    schema = SCHEMA if schema is None else schema
    props = schema.get("properties")
    if not props:
        return [path] if path else []
    out = [p for k, sub in props.items() for p in schema_paths(sub, path + (k,))]
    return out + ([("files", "vit.onnx", "sha256"), ("files", "fusion.onnx", "size")] if not path else [])


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _set_path(obj, path, value):
    """Set (or with :data:`_DELETE` remove) ``path``; where a key on the way is absent, add it instead."""
    for k in path[:-1]:
        if k not in obj:
            obj[k] = "x"
            return
        obj = obj[k]
    if value is _DELETE:
        obj.pop(path[-1], None)
    else:
        obj[path[-1]] = value


_DELETE = object()


def bundle_cases(rng) -> list:
    cases = []

    def case(name, expect, tamper, words=(), trusted=False, signed=False):
        def build(f, c):
            b = copy_bundle(c.signed_bundle if signed else c.bundle, os.path.join(f, "bundle"))
            tamper(b, c)
            args = ["--trusted-key", c.trusted_key] if trusted else []
            return ["samf", "report", c.scan, "--bundle", b, "--max-tokens", "8", *args]
        cases.append(Case("bundle", name, expect, build, words))

    def default_llm(b):
        m = _manifest(b)
        return m["llm"]["files"][m["llm"]["default"]]

    def other_llm(b):
        m = _manifest(b)
        return next(v for k, v in m["llm"]["files"].items() if k != m["llm"]["default"])

    def flip(name_fn, k):
        def tamper(b, c):
            p = own(os.path.join(b, name_fn(b)))
            size = os.path.getsize(p)
            with open(p, "r+b") as fh:
                pos = int(np.random.default_rng(k).integers(size))
                fh.seek(pos)
                byte = fh.read(1)
                fh.seek(pos)
                fh.write(bytes([byte[0] ^ 0x10]))
        return tamper

    case("untouched", "accept", lambda b, c: None)
    case("signed-and-trusted", "accept", lambda b, c: None, signed=True, trusted=True)
    case("extra-file", "accept", lambda b, c: write(b, "notes.txt", b"hello"))
    case("manifest-reformatted", "accept",
         lambda b, c: (lambda m: (os.remove(os.path.join(b, "manifest.json")),
                                  write(b, "manifest.json", json.dumps(m, sort_keys=True).encode())))(_manifest(b)))
    def loaded(fn):
        return lambda b: loaded_file(_manifest(b), fn)

    for k in range(4):
        for fn in ("vit.onnx", "aggregator.onnx", "fusion.onnx"):
            case(f"flip-{fn}-{k}", "refuse", flip(loaded(fn), k), (fn.split(".")[0],))
        case(f"flip-default-llm-{k}", "refuse", flip(default_llm, k), ("sha256",))
        case(f"flip-unused-llm-{k}", "accept", flip(other_llm, k))
    for fn in ("vit.onnx", "fusion.onnx", "llm"):
        def trunc(b, c, fn=fn):
            p = own(os.path.join(b, default_llm(b) if fn == "llm" else fn))
            os.truncate(p, os.path.getsize(p) // 2)
        case(f"truncate-{fn}", "refuse", trunc, ("bytes",))
        case(f"delete-{fn}", "refuse",
             lambda b, c, fn=fn: os.remove(os.path.join(b, default_llm(b) if fn == "llm" else fn)), ("missing",))

        def as_link(b, c, fn=fn):
            p = os.path.join(b, default_llm(b) if fn == "llm" else fn)
            shutil.copyfile(p, p + ".real")
            os.remove(p)
            os.symlink(p + ".real", p)
        case(f"symlink-{fn}", "refuse", as_link, ("regular file",))

        def as_dir(b, c, fn=fn):
            p = os.path.join(b, default_llm(b) if fn == "llm" else fn)
            os.remove(p)
            os.mkdir(p)
        case(f"directory-{fn}", "refuse", as_dir)

    paths = schema_paths()
    picks = sorted(rng.choice(len(paths), size=min(24, len(paths)), replace=False).tolist())
    for i in picks:
        path = paths[i]
        label = ".".join(map(str, path))

        def edit(b, c, path=path):
            m = _manifest(b)
            try:
                old = _get(m, path)
            except (KeyError, TypeError):
                old = None
            new = ((old + 1) if isinstance(old, (int, float)) and not isinstance(old, bool) else
                   [*old, 1] if isinstance(old, list) else {**old, "x": 1} if isinstance(old, dict) else f"{old}x")
            _set_path(m, path, new)
            _put_manifest(b, m, reseal=False)
        case(f"edit-unsealed-{label}", "refuse", edit, ("manifest",))

        def delete(b, c, path=path):
            m = _manifest(b)
            _set_path(m, path, _DELETE)
            _put_manifest(b, m, reseal=True)
        case(f"delete-resealed-{label}", "either", delete)

    def resealed(name, fn, expect="refuse", words=(), **kw):
        def tamper(b, c):
            m = _manifest(b)
            fn(m)
            _put_manifest(b, m, reseal=True)
        case(f"resealed-{name}", expect, tamper, words, **kw)

    resealed("image-size", lambda m: m["preprocess"].__setitem__("image_size", m["preprocess"]["image_size"] * 2),
             words=("does not fit",))
    resealed("slices-per-plane", lambda m: m["preprocess"].__setitem__("slices_per_plane", 1), words=("fit",))
    resealed("one-window-less", lambda m: m["preprocess"]["windows"].pop(), words=("fit",))
    resealed("llm-width", lambda m: m["model"]["llm"].__setitem__("hidden_size", 7), words=("wide",))
    resealed("dotdot-file", lambda m: m["files"].__setitem__("../secret", {"sha256": "0" * 64, "size": 1}))
    resealed("absolute-llm", lambda m: m["llm"]["files"].__setitem__(m["llm"]["default"], "/etc/passwd"))
    resealed("unknown-preprocess-key", lambda m: m["preprocess"].__setitem__("sharpen", True))
    resealed("schema-99", lambda m: m.__setitem__("schema", 99), words=("schema",))
    resealed("default-llm-absent", lambda m: m["llm"].__setitem__("default", "Q3_K"))
    resealed("vit-hash-changed", lambda m: m["files"][loaded_file(m, "vit.onnx")].__setitem__("sha256", "ab" * 32),
             words=("sha256",))
    resealed("encoders-unknown-precision", lambda m: m["encoders"].__setitem__("fp8", m["encoders"]["fp32"]))
    resealed("encoders-without-fp32", lambda m: m["encoders"].pop("fp32"))
    resealed("encoders-unlisted-file", lambda m: m["encoders"]["fp32"]["files"].__setitem__("vit", "vit-x.onnx"),
             words=("does not list",))
    resealed("encoders-dotdot-file", lambda m: m["encoders"]["fp32"]["files"].__setitem__("vit", "../vit.onnx"))
    resealed("encoders-extra-module", lambda m: m["encoders"]["fp32"]["files"].__setitem__("head", "vit.onnx"))
    resealed("windows-string", lambda m: m["preprocess"].__setitem__("windows", "lung"))
    resealed("negative-spacing", lambda m: m["preprocess"].__setitem__("pixel_spacing_mm", -1.0))
    # Edits a re-sealing forger can make unnoticed, unless the site requires a signature:
    resealed("other-spacing", lambda m: m["preprocess"].__setitem__("pixel_spacing_mm", 2.0), expect="accept")
    resealed("other-spacing-trusted", lambda m: m["preprocess"].__setitem__("pixel_spacing_mm", 2.0),
             words=("signature",), signed=True, trusted=True)
    resealed("other-window-trusted", lambda m: m["preprocess"]["windows"][0].__setitem__(0, 0.0),
             words=("signature",), signed=True, trusted=True)

    for name, content in (("list", b"[]"), ("null", b"null"), ("number", b"42"), ("string", b'"bundle"'),
                          ("empty", b""), ("binary", bytes(range(256)) * 4), ("deep", b"[" * 100000 + b"]" * 100000),
                          ("bad-utf8", b'{"schema": "\xff\xfe"}'), ("truncated", None), ("huge", b" " * (17 << 20))):
        def replace(b, c, content=content):
            p = os.path.join(b, "manifest.json")
            data = open(p, "rb").read()[:500] if content is None else content
            os.remove(p)
            write(b, "manifest.json", data)
        case(f"manifest-{name}", "refuse", replace)

    def manifest_special(kind):
        def tamper(b, c):
            p = os.path.join(b, "manifest.json")
            os.remove(p)
            if kind == "fifo":
                os.mkfifo(p)
            elif kind == "dev-zero":
                os.symlink("/dev/zero", p)
            elif kind == "directory":
                os.mkdir(p)
        return tamper

    for kind in ("fifo", "dev-zero", "directory", "missing"):
        case(f"manifest-{kind}", "refuse", manifest_special(kind))

    def sig(kind):
        def tamper(b, c):
            p = os.path.join(b, "manifest.sig")
            if kind == "missing":
                os.remove(p)
                return
            rec = json.load(open(p))
            if kind == "flipped":
                import base64

                raw = bytearray(base64.b64decode(rec["signature"]))
                raw[7] ^= 1
                rec["signature"] = base64.b64encode(bytes(raw)).decode()
            elif kind == "junk":
                rec = {"algorithm": "rsa", "signature": "!!"}
            os.remove(p)
            write(b, "manifest.sig", json.dumps(rec).encode())
        return tamper

    for kind in ("missing", "flipped", "junk"):
        case(f"signature-{kind}", "refuse", sig(kind), signed=True, trusted=True)
    case("unsigned-but-trusted-key-required", "refuse", lambda b, c: None, ("not signed",), trusted=True)

    def other_key(f, c):
        b = copy_bundle(c.signed_bundle, os.path.join(f, "bundle"))
        return ["samf", "report", c.scan, "--bundle", b, "--trusted-key", c.other_key]
    cases.append(Case("bundle", "signed-by-another-key", "refuse", other_key, ("does not verify",)))
    return cases


# ----------------------------------------------------------------------------- all

FAMILIES = (nifti_header_cases, nifti_bytes_cases, npy_cases, dicom_cases, value_cases, cli_cases, bundle_cases)


def generate(seed: int = SEED) -> list:
    """Every case, in a fixed order."""
    out = []
    for i, family in enumerate(FAMILIES):
        out += family(np.random.default_rng([seed, i]))
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), "case names must be unique"
    return out
