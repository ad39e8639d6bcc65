"""Atomic writes: a reader sees the old file/folder or the complete new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import shutil


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Write through a temporary sibling, renamed over ``path`` only if the block finishes."""
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
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
