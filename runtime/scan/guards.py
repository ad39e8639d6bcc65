"""What every scan reader checks before it reads: a file is opened only if it is a regular one (never a FIFO or a
device, which would block or never end), and a volume's size and spacing must lie within a CT's.

Shared by :mod:`~samf.runtime.scan.ct` (NIfTI, .npy), :mod:`~samf.runtime.scan.dicom` (series folders) and the
worklist's content hashes; it imports neither, so neither imports the other for it.
"""

from __future__ import annotations

import os
import stat

from samf.errors import ScanError

#: The largest scan accepted, in voxels, checked against the file's header before anything is read
#: (2 GiB as float32: a 512×512×2048 CT fits). ``SAMF_MAX_VOXELS`` in the environment overrides it.
MAX_VOXELS = 1 << 29
#: Voxel sizes a CT may have, in mm: a NIfTI header's outside them is refused (``--spacing`` overrides it), and
#: so are a DICOM series' pixel and slice spacings.
PLAUSIBLE_SPACING_MM = (0.05, 30.0)
#: Fewer voxels than this along any axis is not a volume the model can read.
MIN_VOXELS_PER_AXIS = 8
#: The smallest extent along any axis, in mm, that the preprocessing can place its slices in.
MIN_EXTENT_MM = 40.0


def max_voxels() -> int:
    value = os.environ.get("SAMF_MAX_VOXELS")
    if not value:
        return MAX_VOXELS
    try:
        return int(value)
    except ValueError:
        raise ScanError(f"SAMF_MAX_VOXELS={value!r} is not a whole number") from None


def open_regular(path: str):
    """``path`` opened for binary reading if it is a regular file (or a link to one), else None; never blocks.

    A FIFO would block a plain ``open`` until a writer comes, and a device (``/dev/zero``) would be read without
    end. So: ``stat`` first, which never opens anything; then ``open`` with ``O_NONBLOCK`` (a FIFO opens at once,
    with no writer) and ``fstat`` on that descriptor, so a file swapped for a FIFO between the two is caught too.
    An ``OSError`` of the ``open`` itself (permissions, a link loop) propagates."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except (OSError, ValueError):  # gone, a dangling link, a NUL in the name
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
