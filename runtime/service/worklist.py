"""A worklist for ``samf report``: which scans it holds, which are done already, and where each result goes.

A worklist is given as scan files, DICOM series folders, folders of scans, and list files (``--worklist``: one
path per line, or a CSV with a ``path``, ``scan`` or ``image`` column; relative paths are relative to the list
file). List files are named as such, never guessed from a suffix: a stray ``notes.txt`` given as a scan gets
the scan's error, not read as paths. Each
scan's result is one JSON (report, timings, bundle identity, scan info) and one .txt in the output folder,
written atomically as the scan finishes, plus ``reports.jsonl`` for the whole worklist. A scan counts as done
when its JSON names the same path and content hash (sha256 of the file, or of a folder's files) and holds a
report, so a batch that was killed resumes where it stopped, and a scan whose file changed is reported again.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os

from samf.errors import ScanError

from ..atomic import atomic_file
from ..bundle.bundle import hash_fd
from ..outputs.slices_png import scan_folder_name
from ..scan.guards import open_regular

#: Files a folder of scans is made of (anything else in a folder makes it a DICOM series).
SCAN_SUFFIXES = (".nii.gz", ".nii", ".npy")
#: CSV columns that hold a scan's path, in order of preference.
PATH_COLUMNS = ("path", "scan", "image")
JSONL = "reports.jsonl"


def expand_worklist(args, lists=()) -> list:
    """The scans ``args`` (files and folders) and the list files ``lists`` name, in order, each once (by
    absolute path)."""
    out, seen = [], set()
    found_all = [_folder(a) if os.path.isdir(a) else [a] for a in args]  # a missing file: that scan's error
    for found in found_all + [_list_file(f) for f in lists]:
        for path in found:
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def _folder(path: str) -> list:
    """A folder of scans (NIfTI/.npy files, and subfolders taken as DICOM series) or one DICOM series."""
    entries = sorted((e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name)
    scans = [e.path for e in entries if e.is_file() and e.name.lower().endswith(SCAN_SUFFIXES)]
    folders = [e.path for e in entries if e.is_dir()]
    others = [e for e in entries if e.is_file() and not e.name.lower().endswith(SCAN_SUFFIXES)]
    if scans or (folders and not others):
        return scans + folders
    return [path]


def _list_file(path: str) -> list:
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                column = next((c for c in PATH_COLUMNS if c in (reader.fieldnames or [])), None)
                if column is None:
                    raise ScanError(f"{path}: a worklist CSV needs a column named {', '.join(PATH_COLUMNS)}")
                names = [row[column] for row in reader]
            else:
                names = f.read().splitlines()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ScanError(f"{path}: cannot read the worklist ({e})") from None
    names = [n.strip() for n in names if n.strip() and not n.strip().startswith("#")]
    return [n if os.path.isabs(n) else os.path.join(base, n) for n in names]


def content_sha256(path: str) -> str | None:
    """sha256 of a scan file, or of a folder's files (relative names and contents, in name order); None when
    it cannot be read (the scan's own error comes when it is loaded)."""
    try:
        if not os.path.isdir(path):
            return _regular_sha256(path)
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                digest = _regular_sha256(full)
                if digest is None:  # a FIFO or device in a series folder: skipped, as the loader skips it
                    continue
                h.update(os.path.relpath(full, path).encode("utf-8", "surrogateescape") + b"\0")
                h.update(digest.encode() + b"\n")
        return h.hexdigest()
    except OSError:
        return None


def _regular_sha256(path: str) -> str | None:
    """sha256 of a regular file; None for anything else (a FIFO, a device), which is never opened for reading:
    reading one would block or never end."""
    f = open_regular(path)
    if f is None:
        return None
    with f:
        return hash_fd(f.fileno())


def output_names(scans: list) -> dict:
    """``{absolute path: name}`` for a worklist's per-scan outputs: the scan's file or folder name; two scans with
    the same name get a short hash of their path added."""
    names = [scan_folder_name(s) for s in scans]
    clash = {n for n in names if names.count(n) > 1}
    paths = [os.path.abspath(s) for s in scans]
    return {p: n if n not in clash else f"{n}-{hashlib.sha1(p.encode()).hexdigest()[:8]}" for p, n in zip(paths, names)}


class BatchOutput:
    """The output folder of a worklist: one ``<name>.json`` (and ``<name>.txt`` when reported) per scan, and
    ``reports.jsonl``; names from :func:`output_names`."""

    def __init__(self, out_dir: str, scans: list):
        self.dir = out_dir
        self.names = output_names(scans)
        self.order = [os.path.abspath(s) for s in scans]
        self._jsonl = None  # the folder is made at the first result: a run refused before any leaves nothing

    def _path(self, scan: str, ext: str) -> str:
        return os.path.join(self.dir, self.names[os.path.abspath(scan)] + ext)

    def previous(self, scan: str) -> dict | None:
        try:
            with open(self._path(scan, ".json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def done(self, scan: str, sha256: str | None) -> bool:
        """Whether ``scan`` was reported already, from the same path and the same content."""
        row = self.previous(scan)
        return (sha256 is not None and isinstance(row, dict) and row.get("status") == "ok"
                and row.get("path") == os.path.abspath(scan) and row.get("sha256") == sha256)

    def write(self, row: dict) -> None:
        """One scan's result: its JSON and .txt (each replaced whole) and a line of ``reports.jsonl``."""
        scan = row["path"]
        if self._jsonl is None:
            os.makedirs(self.dir, exist_ok=True)
            self._jsonl = open(os.path.join(self.dir, JSONL), "a", encoding="utf-8")
        with atomic_file(self._path(scan, ".json")) as f:
            json.dump(row, f, indent=2)
        if row["status"] == "ok":
            with atomic_file(self._path(scan, ".txt")) as f:
                f.write(row["report"] + "\n")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(scan, ".txt"))  # a report of what the scan was before
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def finish(self) -> list:
        """Rewrite ``reports.jsonl`` as the worklist's rows in its order (earlier runs' included); returns them."""
        if self._jsonl is not None:
            self._jsonl.close()
        rows = [r for r in (self.previous(s) for s in self.order) if r is not None]
        if not rows and not os.path.isdir(self.dir):
            return rows
        with atomic_file(os.path.join(self.dir, JSONL)) as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return rows
