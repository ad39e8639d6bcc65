"""Which bundle artifacts were hashed and found intact, so a start does not re-hash gigabytes every time.

One small JSON file per user (``$XDG_CACHE_HOME/samf/verified.json``, default ``~/.cache/samf/``) maps an
artifact's absolute path to its sha256 and the stat it had when hashed: size, mtime_ns, ctime_ns, inode and
device. A file whose stat is unchanged is taken to hold the bytes that were hashed. Any write changes mtime
and ctime (``os.utime`` can put mtime back but sets ctime to now), so an edit is caught at the next use.

Limits, as for make, ccache or git's index: a write in the same timestamp tick as the hashing, a system
clock set back, or bytes changed beneath the filesystem go unnoticed; ``samf-export verify`` re-hashes
everything. Where the cache cannot be read or written the runtime simply hashes.
"""

from __future__ import annotations

import contextlib
import json
import os

from ..atomic import atomic_file

CACHE_VERSION = 1


def cache_path() -> str | None:
    """Where the cache lives: ``$SAMF_VERIFY_CACHE`` (a file, or ``off`` for none: every start hashes what it
    loads and nothing is written outside the bundle and ``--out``), else ``$XDG_CACHE_HOME/samf/verified.json``."""
    chosen = os.environ.get("SAMF_VERIFY_CACHE")
    if chosen:
        return None if chosen.lower() in ("off", "0", "no", "none") else chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "samf", "verified.json")


def stamp_of(st: os.stat_result) -> list:
    """What the cache keys a file's content on: size, mtime, ctime, inode and device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _stamp(path: str) -> list:
    return stamp_of(os.stat(path))


class VerifiedCache:
    """Load once, ask :meth:`known`, :meth:`add` after hashing, :meth:`save` at the end (atomic, best effort)."""

    def __init__(self, path: str | None = None):
        self.path = path or cache_path()  # None: no cache (every check hashes, nothing is saved)
        self.entries: dict = {}
        self.forgotten: set = set()
        self.changed = False
        if self.path is None:
            return
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            with open(self.path) as f:
                data = json.load(f)
            if data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
                self.entries = data["files"]

    def stamp(self, path: str) -> list:
        """The stat to record for ``path``; take it *before* hashing, so a write during hashing is not cached."""
        return _stamp(path)

    def known(self, path: str, sha256: str, stamp: list | None = None) -> bool:
        """Whether ``path`` was hashed to ``sha256`` and its stat (``stamp``: of the file as opened; default:
        as the path now names it) has not changed since."""
        e = self.entries.get(os.path.abspath(path))
        try:
            return isinstance(e, dict) and e.get("sha256") == sha256 and e.get("stat") == (stamp or _stamp(path))
        except OSError:
            return False

    def add(self, path: str, sha256: str, stamp: list, now: list | None = None) -> None:
        """Remember a good hash, unless the file changed while it was being hashed (``now``: its stat after
        hashing, when the caller holds it open; default: the path's)."""
        with contextlib.suppress(OSError):
            if (now or _stamp(path)) == stamp:
                self.entries[os.path.abspath(path)] = dict(sha256=sha256, stat=stamp)
                self.changed = True

    def forget(self, path: str) -> None:
        self.entries.pop(os.path.abspath(path), None)
        self.forgotten.add(os.path.abspath(path))
        self.changed = True

    def save(self) -> None:
        """Merge with what other processes wrote meanwhile, drop entries of deleted files, write atomically."""
        if not self.changed or self.path is None:
            return
        merged = {**VerifiedCache(self.path).entries, **self.entries}
        merged = {p: e for p, e in merged.items() if p not in self.forgotten and os.path.exists(p)}
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_file(self.path) as f:
                json.dump(dict(version=CACHE_VERSION, files=merged), f)
        self.changed = False
