"""Helpers for the native libraries the engines wrap: how many cores to give them, and keeping their C-level
logging off the user's terminal. Used by the engines, the export and the CLI alike."""

from __future__ import annotations

import contextlib
import os
import sys


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence llama.cpp's C-level logging (it writes to fd 2, which Python's redirects do not catch)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved = os.dup(fd)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
