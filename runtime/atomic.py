"""Atomic writes: a reader sees the old file/folder or the complete new one, never half of either, and never
nothing where there was something.

A folder is replaced by swapping it with its finished temporary sibling in one step (Linux ``renameat2`` with
``RENAME_EXCHANGE``); where the filesystem cannot swap, by two renames, with a moment between them when the path
is missing. Temporaries are named ``<path>.tmp-<pid>`` / ``<path>.old-<pid>``; ones left by a process that no
longer runs (killed mid-write) are removed the next time the same path is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import re
import shutil

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - not Linux, or a glibc before 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the system or filesystem cannot."""
    if _RENAMEAT2 is None:  # pragma: no cover
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(path: str) -> list:
    """Remove ``path``'s ``.tmp-<pid>`` / ``.old-<pid>`` siblings whose process is gone; returns what went."""
    gone = []
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.(?:tmp|old)-(\d+)$")
    for p in glob.glob(glob.escape(path) + ".*-*"):
        m = pattern.match(os.path.basename(p))
        if m and not _alive(int(m.group(1))):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(p)
            gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Write through a temporary sibling, renamed over ``path`` only if the block finishes."""
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield an empty temporary folder; when the block finishes it replaces ``path`` (which may exist).
    On an error the temporary folder is removed and ``path`` is left as it was."""
    path = path.rstrip("/")
    remove_stale_temporaries(path)
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.lexists(path):
        os.replace(tmp, path)
    elif exchange(tmp, path):  # one step: the old folder is now at tmp
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
