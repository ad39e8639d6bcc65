"""The report service's jobs: a queue kept in SQLite, so a restart loses none, and one worker thread that runs
them through the loaded pipeline (:meth:`ReportPipeline.report_many` for reports, several decoded together).

A job moves queued -> running -> done | failed. A job found ``running`` when the service starts was cut short
(a crash, kill -9): it is queued again and runs from the start. A job's scan is copied into the service's work
folder when it is submitted (an upload, or a zip of a DICOM series unpacked) and removed when the job ends;
a path input stays where it is. Nothing here logs a file name, a path or a report: only job ids, states and
timings (file names and paths can carry patient identifiers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
import zipfile
from collections import deque
from dataclasses import dataclass

from samf.errors import SamfError, one_line

log = logging.getLogger("samf.service")

STATES = ("queued", "running", "done", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- report | vqa
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    scan TEXT NOT NULL,            -- the path the job reads
    owned INTEGER NOT NULL,        -- 1: the scan is the service's copy, removed when the job ends
    params TEXT NOT NULL,          -- JSON: the request, max tokens, the question and choices
    result TEXT,                   -- JSON, when done
    error TEXT                     -- one line, when failed
)
"""


@dataclass
class Job:
    """A job as the worker gets it (:meth:`JobStore.claim`, :meth:`JobStore.recover`)."""

    id: str
    kind: str        # report | vqa
    scan: str        # the path the job reads
    params: dict     # the request and max tokens, or the question and choices; who, sha256, dicom


class UploadError(SamfError):
    """An upload the service cannot take (what it is, or its size); the HTTP layer answers 4xx with it."""


class UploadTooLarge(UploadError):
    """An upload over the service's size limit (the HTTP layer answers 413)."""


class JobStore:
    """Jobs in ``WORK/jobs.sqlite3``; uploaded scans under ``WORK/inputs/<id>/``. Safe to use from several
    threads (one connection, one lock: the service writes a few rows a second)."""

    def __init__(self, work: str):
        self.work = work
        self.inputs = os.path.join(work, "inputs")
        self.results = os.path.join(work, "results")  # <id>/sr.dcm, report_pdf.dcm: a DICOM series' HTTP job
        os.makedirs(self.inputs, exist_ok=True)
        self._db = sqlite3.connect(os.path.join(work, "jobs.sqlite3"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()

    def _q(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def recover(self) -> list:
        """Queue again every job a previous run left running; those :class:`Job`."""
        with self._lock:
            rows = self._db.execute("SELECT id, kind, scan, params FROM jobs WHERE status='running'").fetchall()
            self._db.execute("UPDATE jobs SET status='queued', started=NULL WHERE status='running'")
        for (job_id,) in self._q("SELECT id FROM jobs WHERE status IN ('done','failed') AND owned=1"):
            shutil.rmtree(os.path.join(self.inputs, job_id), ignore_errors=True)  # ended jobs' leftovers
        return [Job(i, k, s, json.loads(p)) for i, k, s, p in rows]

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def input_dir(self, job_id: str) -> str:
        path = os.path.join(self.inputs, job_id)
        os.makedirs(path, exist_ok=True)
        return path

    def add(self, job_id: str, kind: str, scan: str, owned: bool, params: dict) -> None:
        self._q("INSERT INTO jobs (id, kind, status, created, scan, owned, params) VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, kind, time.time(), scan, int(owned), json.dumps(params)))

    def get(self, job_id: str) -> dict | None:
        rows = self._q("SELECT id, kind, status, created, started, finished, result, error FROM jobs WHERE id=?",
                       (job_id,))
        if not rows:
            return None
        job_id, kind, status, created, started, finished, result, error = rows[0]
        out = dict(id=job_id, kind=kind, status=status, created=created, started=started, finished=finished)
        if result is not None:
            out["result"] = json.loads(result)
        if error is not None:
            out["error"] = error
        return out

    def claim(self, limit: int) -> list:
        """Up to ``limit`` queued jobs, oldest first, marked running: a list of :class:`Job`."""
        with self._lock:
            rows = self._db.execute("SELECT id, kind, scan, params FROM jobs WHERE status='queued' ORDER BY created "
                                    "LIMIT ?", (limit,)).fetchall()
            now = time.time()
            for row in rows:
                self._db.execute("UPDATE jobs SET status='running', started=? WHERE id=?", (now, row[0]))
        return [Job(i, k, s, json.loads(p)) for i, k, s, p in rows]

    def _end(self, job_id: str, status: str, result: dict | None, error: str | None) -> None:
        self._q("UPDATE jobs SET status=?, finished=?, result=?, error=? WHERE id=?",
                (status, time.time(), None if result is None else json.dumps(result), error, job_id))
        owned = self._q("SELECT owned FROM jobs WHERE id=?", (job_id,))
        if owned and owned[0][0]:
            shutil.rmtree(os.path.join(self.inputs, job_id), ignore_errors=True)

    def requeue(self, job_ids) -> None:
        """Put claimed jobs back in the queue (the worker stopped before it began them)."""
        with self._lock:
            for job_id in job_ids:
                self._db.execute("UPDATE jobs SET status='queued', started=NULL WHERE id=? AND status='running'",
                                 (job_id,))

    def finish(self, job_id: str, result: dict) -> None:
        self._end(job_id, "done", result, None)

    def fail(self, job_id: str, error: str) -> None:
        self._end(job_id, "failed", None, error)

    def counts(self) -> dict:
        out = dict.fromkeys(STATES, 0)
        out.update(dict(self._q("SELECT status, COUNT(*) FROM jobs GROUP BY status")))
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ------------------------------------------------------------------------------------------ inputs

NIFTI_GZ_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


def kind_of_upload(head: bytes) -> str:
    """``nifti.gz``, ``nifti`` or ``zip`` from an upload's first bytes; :class:`UploadError` otherwise."""
    if head.startswith(NIFTI_GZ_MAGIC):
        return "nifti.gz"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if len(head) >= 348 and head[344:347] in (b"n+1", b"n+2"):
        return "nifti"
    raise UploadError("the upload is neither a NIfTI file (.nii, .nii.gz) nor a zip of a DICOM series")


def copy_at_most(src, dst, max_bytes: int, too_much: Exception, done: int = 0) -> int:
    """Copy ``src`` to ``dst`` a MB at a time; ``too_much`` is raised once ``done`` plus what was copied passes
    ``max_bytes`` (the declared size of an upload or a zip member is not trusted). The new total."""
    while block := src.read(1 << 20):
        done += len(block)
        if done > max_bytes:
            raise too_much
        dst.write(block)
    return done


def save_upload(folder: str, upload, max_bytes: int) -> str:
    """An uploaded scan (``upload``: a binary file object) copied into a job's input ``folder``: a NIfTI file
    (``scan.nii`` or ``scan.nii.gz``), or a zip of a DICOM series unpacked into ``series/``; its path.
    :class:`UploadTooLarge` past ``max_bytes`` (the zip unpacked: four times that), :class:`UploadError` for
    anything else it cannot take. What was written stays in ``folder`` for the caller to remove."""
    raw = os.path.join(folder, "upload")
    with open(raw, "wb") as out:
        copy_at_most(upload, out, max_bytes, UploadTooLarge(f"upload larger than the {max_bytes >> 20} MB accepted"))
    with open(raw, "rb") as f:
        kind = kind_of_upload(f.read(512))
    if kind == "zip":
        path = unpack_dicom_zip(raw, os.path.join(folder, "series"), max_bytes * 4)
        os.remove(raw)
        return path
    path = os.path.join(folder, "scan.nii.gz" if kind == "nifti.gz" else "scan.nii")
    os.replace(raw, path)
    return path


def unpack_dicom_zip(zip_path: str, out_dir: str, max_bytes: int) -> str:
    """A zip of one DICOM series unpacked into ``out_dir`` (a folder the runtime reads as a series). Members
    are written under flat names (no path from the archive is used), and the unpacked size is capped at
    ``max_bytes`` (a zip bomb is refused before it fills the disk)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if not members:
                raise UploadError("the zip holds no files")
            if sum(m.file_size for m in members) > max_bytes:
                raise UploadError(f"the zip unpacks to more than the {max_bytes // (1 << 20)} MB accepted")
            os.makedirs(out_dir, exist_ok=True)
            written = 0
            too_much = UploadError(f"the zip unpacks to more than the {max_bytes // (1 << 20)} MB accepted")
            for i, m in enumerate(members):
                with zf.open(m) as src, open(os.path.join(out_dir, f"{i:06d}.dcm"), "wb") as dst:
                    written = copy_at_most(src, dst, max_bytes, too_much, written)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as e:
        raise UploadError(f"not a readable zip ({type(e).__name__})") from None
    return out_dir


def path_within(path: str, folders: list) -> str:
    """``path`` resolved (symbolic links followed), refused unless it lies in one of ``folders``."""
    real = os.path.realpath(path)
    for folder in folders:
        root = os.path.realpath(folder)
        if real == root or real.startswith(root + os.sep):
            return real
    raise UploadError("the path is not under the service's input folders (--input-dir)")


# ------------------------------------------------------------------------------------------ running

class TextStream:
    """A running report's text as it is decoded, for the stream endpoint; ``wait(n)`` blocks until the text is
    longer than ``n`` characters or the report ended."""

    def __init__(self):
        self.text, self.ended = "", False
        self._cond = threading.Condition()

    def update(self, text: str) -> None:
        with self._cond:
            self.text = text
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> tuple:
        with self._cond:
            self._cond.wait_for(lambda: len(self.text) > seen or self.ended, timeout)
            return self.text, self.ended


class JobRunner(threading.Thread):
    """The worker: claims queued jobs and runs them on ``pipeline``; reports go through ``report_many`` up to
    ``batch`` at a time (decoded ``pipeline.config.parallel`` together), questions one by one. A job that
    fails takes only itself down, with its one-line reason.

    :meth:`stop` (SIGTERM): no job is begun after it; the reports already handed to the engines finish (at most
    ``parallel + prefetch``), and jobs claimed but not begun go back to the queue. Each job event goes to
    ``audit`` (:class:`samf.runtime.service.audit.AuditTrail`)."""

    def __init__(self, store: JobStore, pipeline, batch: int = 16, latency_window: int = 1000, reply=None,
                 audit=None):
        super().__init__(name="samf-jobs", daemon=True)
        from .audit import NullTrail

        self.store, self.pipeline, self.batch = store, pipeline, batch
        self.reply = reply  # reply(job id, scan, Result) -> record update, for jobs that came over DICOM
        self.audit = audit or NullTrail()
        self.wake = threading.Event()
        self.stopping = False
        self.streams: dict = {}
        self.latencies: deque = deque(maxlen=latency_window)   # seconds from submission to end
        self.finished: deque = deque(maxlen=100_000)            # finish times, for scans per minute
        self.begun: dict = {}                                   # job id -> monotonic start, while it runs

    def stream(self, job_id: str) -> TextStream:
        return self.streams.setdefault(job_id, TextStream())

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def running(self) -> list:
        return list(self.begun)

    def run(self) -> None:
        while not self.stopping:
            jobs = self.store.claim(self.batch)
            if not jobs:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            reports = [job for job in jobs if job.kind == "report"]
            for job in jobs:
                if job.kind == "vqa":
                    if self.stopping:
                        self._requeue([job])
                    else:
                        self._answer(job)
            if reports:
                self._reports(reports)

    def _requeue(self, jobs: list) -> None:
        if not jobs:
            return
        self.store.requeue([job.id for job in jobs])
        for job in jobs:
            self.audit.record("requeued", job.id, job.kind, who=job.params.get("who"),
                              scan_sha256=job.params.get("sha256"), outcome="stopping: queued for the next start")
        log.info("%d claimed job(s) put back in the queue (stopping)", len(jobs))

    def _begin(self, job_id: str, kind: str, params: dict) -> None:
        self.begun[job_id] = time.monotonic()
        self.audit.record("started", job_id, kind, who=params.get("who"), scan_sha256=params.get("sha256"))

    def _done(self, job_id: str, result: dict | None, error: str | None, scan: str | None = None,
              kind: str = "report", params: dict | None = None) -> None:
        created = self.store.get(job_id)["created"]
        if error is None:
            self.store.finish(job_id, result)
        else:
            self.store.fail(job_id, error)
        now = time.time()
        self.latencies.append(now - created)
        self.finished.append(now)
        stream = self.streams.pop(job_id, None)
        if stream is not None:
            stream.end()
        params = params or {}
        began = self.begun.pop(job_id, None)
        self.audit.record("done" if error is None else "failed", job_id, kind, who=params.get("who"),
                          scan_sha256=params.get("sha256"),
                          outcome="report made" if error is None else
                          "failed: " + error.replace(scan or "\0", "<scan>")[:200],
                          duration_s=None if began is None else time.monotonic() - began)
        if error is None:
            log.info("job %s done in %.2f s", job_id, now - created)
        else:  # the reason, with the scan's own path (which may name the patient) left out
            log.info("job %s failed in %.2f s: %s", job_id, now - created, error.replace(scan or "\0", "<scan>"))

    def _reports(self, jobs: list) -> None:
        groups: dict = {}
        for job in jobs:  # report_many takes one request and length (None: the pipeline's): group the jobs sharing them
            groups.setdefault((job.params.get("request"), job.params.get("max_tokens")), []).append(job)
        for (request, max_tokens), group in groups.items():
            def on_text(key, text):
                self.stream(key.job_id).update(text)

            keys = [_Key(job) for job in group]
            drawn: set = set()

            def feed(keys=keys, drawn=drawn):
                """The keys, drawn lazily by report_many: after stop() none is begun."""
                for key in keys:
                    if self.stopping:
                        return
                    drawn.add(key.job_id)
                    self._begin(key.job_id, "report", key.params)
                    yield key

            # A DICOM job's reply, and the SR and PDF of an HTTP job whose scan is a DICOM series, draw the slices
            # the model read into the PDF: keep them rather than read the series a second time.
            replies = self.reply is not None and any(key.params.get("dicom") for key in keys)
            keep = replies or any(_http_series(key) for key in keys)
            for key, res in self.pipeline.report_many(feed(), request=request, max_new_tokens=max_tokens,
                                                      on_text=on_text, keep_slices=keep):
                if isinstance(res, Exception):
                    self._done(key.job_id, None, one_line(res), str(key), params=key.params)
                    continue
                record = res.to_record()  # the job's own fields (delivery, dicom) go around it
                if key.params.get("dicom") and self.reply is not None:
                    try:
                        record.update(self.reply(key.job_id, str(key), res, stopping=lambda: self.stopping) or {})
                    except Exception as e:  # noqa: BLE001 - the report stands; its DICOM results were not made
                        self._done(key.job_id, None, f"reported, but the DICOM results were not made: "
                                                     f"{one_line(e)}", str(key), params=key.params)
                        continue
                    delivery = record.get("delivery")
                    if delivery:
                        self.audit.record(delivery["status"], key.job_id, "report", who=key.params.get("who"),
                                          scan_sha256=key.params.get("sha256"), outcome=delivery.get("outcome"),
                                          attempts=delivery.get("attempts"))
                if _http_series(key):
                    record.update(self._dicom_files(key, res))
                self._done(key.job_id, record, None, params=key.params)
            self._requeue([job for job in group if job.id not in drawn])

    def _dicom_files(self, key, res) -> dict:
        """The SR and PDF of an HTTP job whose scan is a DICOM series, written under ``WORK/results/<id>/``
        before the job's copy of the series goes: ``{"dicom": ["sr", "pdf"]}``, or, where they could not be
        made, ``{"dicom_error": one line}`` (the report stands)."""
        from ..outputs.compose import ScanOutputs

        try:
            ScanOutputs(str(key), res, self.pipeline.pre.slices_per_plane, job_id=key.job_id).write_dicom(
                os.path.join(self.store.results, key.job_id))
        except Exception as e:  # noqa: BLE001 - the report stands; its DICOM results could not be made
            return {"dicom_error": one_line(e).replace(str(key), "<scan>")}
        return {"dicom": ["sr", "pdf"]}

    def _answer(self, job: Job) -> None:
        params = job.params
        self._begin(job.id, "vqa", params)
        try:
            letter, res = self.pipeline.answer(job.scan, params["question"], params["choices"],
                                               params.get("max_tokens"))  # None: the pipeline's answer_tokens
        except Exception as e:  # noqa: BLE001 - a bad scan fails its own job only
            self._done(job.id, None, one_line(e), job.scan, "vqa", params)
            return
        self._done(job.id, dict(res.to_record(), answer=letter), None, kind="vqa", params=params)


def _http_series(key) -> bool:
    """Whether a report job came over HTTP (not DICOM) with a DICOM series (a folder) as its scan."""
    return not key.params.get("dicom") and os.path.isdir(key)


class _Key(str):
    """A job's scan path that also carries the job's id and params (report_many hands back what it was given)."""

    def __new__(cls, job: Job):
        obj = super().__new__(cls, job.scan)
        obj.job_id, obj.params = job.id, job.params
        return obj
