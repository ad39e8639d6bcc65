"""The HTTP app of ``samf serve`` (FastAPI): reports and questions queued as jobs (:mod:`.jobs`), their results,
server-sent events, health, readiness and metrics. :mod:`.server` loads the bundle and runs it.

Why FastAPI on uvicorn: the OpenAPI schema comes from the routes' own types, Starlette streams server-sent events
from the same process, uvicorn is the ASGI server most deployments already know, and all three are well kept.
Flask has neither the schema nor async streaming without add-ons.

Safety: uploads over the size limit get 413, a full queue 429; path inputs must lie under ``--input-dir``; a bad
scan fails its own job; logs carry job ids, states and timings only; who did what goes to the audit trail
(:mod:`samf.runtime.service.audit`), apart from the log.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' parameter types from their annotations, and
# the routes' types (UploadFile, Request) are imported inside create_app, where a string annotation cannot see them.

import asyncio
import ipaddress
import json
import logging
import os
import shutil
import threading
import time

from .audit import NullTrail, Tokens, scan_sha256
from .config import ServiceConfig
from .jobs import JobRunner, JobStore, UploadError, UploadTooLarge, path_within, save_upload

API_VERSION = "v1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Refused(Exception):
    """A request the service turns down: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def create_app(store: JobStore, runner: JobRunner, cfg: ServiceConfig, tokens: Tokens | None = None, audit=None,
               ready: threading.Event | None = None):
    """The ASGI application (FastAPI): ``cfg``'s limits and input folders, ``tokens`` (none: no token asked),
    ``audit`` (the trail; none: not kept), ``ready`` (set while jobs are taken: a stop clears it; none: always
    ready). The bundle's identity and the longest report a request may ask for are the runner's pipeline's."""
    tokens, audit = tokens or Tokens(), audit or NullTrail()
    if ready is None:
        ready = threading.Event()
        ready.set()
    identity, max_tokens = runner.pipeline.identity, runner.pipeline.config.max_new_tokens
    from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

    app = FastAPI(title="samf report service", version=API_VERSION,
                  description="CT scans in, radiology reports out (unverified AI output: not for diagnostic use).")

    @app.exception_handler(Refused)
    async def refused(_, exc: Refused):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def size_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_upload + (1 << 20):
            return JSONResponse({"error": f"upload larger than the {cfg.max_upload >> 20} MB accepted"},
                                status_code=413)
        return await call_next(request)

    def authorized(request: Request) -> str:
        """Who is asking: the name of the bearer token given (401 without a known one), or ``local``."""
        if not tokens.required:
            return "local"
        given = request.headers.get("authorization", "")
        who = tokens.who(given[7:]) if given.startswith("Bearer ") else None
        if who is None:
            raise Refused(401, "a bearer token is required (Authorization: Bearer TOKEN)")
        return who

    def admit() -> None:
        counts = store.counts()
        if counts["queued"] + counts["running"] >= cfg.max_queue:
            raise Refused(429, f"the queue is full ({cfg.max_queue} jobs); try again later")

    def submit(kind: str, scan: UploadFile | None, path: str | None, params: dict, who: str) -> dict:
        if (scan is None) == (not path):
            raise Refused(400, "give the scan as the multipart field 'scan' or a 'path' (one of them)")
        admit()
        job_id = store.new_id()
        if scan is not None:
            try:
                source, owned = save_upload(store.input_dir(job_id), scan.file, cfg.max_upload), True
            except UploadError as e:
                shutil.rmtree(os.path.join(store.inputs, job_id), ignore_errors=True)
                raise Refused(413 if isinstance(e, UploadTooLarge) else 400, str(e)) from None
        else:
            if not cfg.input_dirs:
                raise Refused(403, "this service takes no paths (start it with --input-dir)")
            try:
                source, owned = path_within(path, cfg.input_dirs), False
            except UploadError as e:
                raise Refused(403, str(e)) from None
            if not os.path.exists(source):
                raise Refused(404, "no such scan under the input folders")
        try:
            sha = scan_sha256(source)
        except OSError:
            sha = None  # unreadable: the job fails with the reason
        params = dict(params, who=who, sha256=sha)
        store.add(job_id, kind, source, owned, params)
        audit.record("received", job_id, kind, who=who, scan_sha256=sha,
                         outcome="upload" if owned else "path")
        runner.wake.set()
        logging.getLogger("samf.service").info("job %s queued (%s, %s)", job_id, kind, "upload" if owned else "path")
        return {"id": job_id}

    def length(n: int | None) -> int:
        if n is not None and not 1 <= n <= max_tokens:
            raise Refused(400, f"max_tokens must be 1..{max_tokens} (the service's --max-tokens)")
        return n or max_tokens

    @app.post("/v1/reports", status_code=202)
    def post_report(scan: UploadFile | None = File(None), path: str | None = Form(None),
                    request: str | None = Form(None), max_tokens: int | None = Form(None),
                    who: str = Depends(authorized)) -> dict:
        """Queue a report: a NIfTI upload or a zip of one DICOM series (field ``scan``), or a ``path`` under the
        service's input folders. Returns the job's id."""
        return submit("report", scan, path, {"request": request, "max_tokens": length(max_tokens)}, who)

    @app.post("/v1/vqa", status_code=202)
    def post_vqa(question: str = Form(...), choices: list[str] = Form(...), scan: UploadFile | None = File(None),
                 path: str | None = Form(None), who: str = Depends(authorized)) -> dict:
        """Queue a multiple-choice question about a scan (four ``choices`` fields). Returns the job's id."""
        if len(choices) != 4 or not all(c.strip() for c in choices) or not question.strip():
            raise Refused(400, "a question and exactly four non-empty choices are needed")
        return submit("vqa", scan, path, {"question": question, "choices": choices}, who)  # the pipeline's length

    def job_view(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise Refused(404, "no such job")
        out = {k: job[k] for k in ("id", "kind", "status", "created", "started", "finished")}
        out.update(job.get("result", {}))
        if isinstance(out.get("delivery"), dict):
            out["delivery"] = {k: v for k, v in out["delivery"].items() if k != "outcome"}
        if "dicom" in out:  # a DICOM series' SR and PDF: where to fetch them
            out["dicom"] = {kind: f"/{API_VERSION}/reports/{job_id}/{kind}" for kind in out["dicom"]}
        if "error" in job:
            out["error"] = job["error"]
        return out

    @app.get("/v1/reports/{job_id}", dependencies=[Depends(authorized)])
    def get_report(job_id: str) -> dict:
        """A job's status (queued, running, done, failed); when done its report, timings and the bundle's
        identity; when failed its one-line error."""
        return job_view(job_id)

    def dicom_result(job_id: str, name: str) -> str:
        """The path of a done report job's DICOM result ``name``; 409 while the job waits or runs, 404 with the
        reason where there is none."""
        job = store.get(job_id)
        if job is None or job["kind"] != "report":
            raise Refused(404, "no such report job")
        if job["status"] in ("queued", "running"):
            raise Refused(409, f"the job is {job['status']}: its DICOM results come when its report is done")
        result = job.get("result", {})
        if job["status"] == "failed":
            raise Refused(404, "the job failed: no report, no SR or PDF")
        if "dicom_error" in result:
            raise Refused(404, f"its DICOM results could not be made: {result['dicom_error']}")
        if "dicom" not in result:
            raise Refused(404, "no SR or PDF here: they are made for a DICOM series sent over HTTP (a series received "
                               "over DICOM gets them sent back over DICOM, and kept here only when undelivered)")
        path = os.path.join(store.results, job_id, name)
        if not os.path.isfile(path):
            raise Refused(404, "its DICOM results are gone from the service's work folder")
        return path

    @app.get("/v1/reports/{job_id}/sr", dependencies=[Depends(authorized)])
    def get_sr(job_id: str):
        """A report made from a DICOM series, as a Comprehensive 3D SR in the series' study (``application/dicom``):
        the report TEXT, UNVERIFIED, the source series as evidence."""
        return FileResponse(dicom_result(job_id, "sr.dcm"), media_type="application/dicom",
                            filename=f"{job_id}-sr.dcm")

    @app.get("/v1/reports/{job_id}/pdf", dependencies=[Depends(authorized)])
    def get_pdf(job_id: str, request: Request):
        """A report made from a DICOM series, for people: the PDF (``application/pdf``), or, with ``Accept:
        application/dicom``, the Encapsulated PDF object in the series' study."""
        path = dicom_result(job_id, "report_pdf.dcm")
        if "application/dicom" in request.headers.get("accept", ""):
            return FileResponse(path, media_type="application/dicom", filename=f"{job_id}-report_pdf.dcm")
        import pydicom

        ds = pydicom.dcmread(path)
        return Response(ds.EncapsulatedDocument[:int(ds.EncapsulatedDocumentLength)], media_type="application/pdf",
                        headers={"Content-Disposition": f'inline; filename="{job_id}-report.pdf"'})

    @app.get("/v1/vqa/{job_id}", dependencies=[Depends(authorized)])
    def get_vqa(job_id: str) -> dict:
        """A question's job, as for reports, with ``answer`` (the letter) when done."""
        return job_view(job_id)

    @app.get("/v1/reports/{job_id}/stream", dependencies=[Depends(authorized)])
    async def stream(job_id: str):
        """The report's text as it is generated, as server-sent events: ``data: {"text": piece}`` for each
        piece, then ``event: done`` with the job (as ``GET /v1/reports/{id}`` gives it)."""
        if store.get(job_id) is None:
            raise Refused(404, "no such job")

        async def events():
            seen = 0
            while True:
                job = store.get(job_id)
                if job["status"] in ("done", "failed"):
                    text = job.get("result", {}).get("report", "")
                    if len(text) > seen:
                        yield f"data: {json.dumps({'text': text[seen:]})}\n\n"
                    yield f"event: done\ndata: {json.dumps(job_view(job_id))}\n\n"
                    return
                live = runner.stream(job_id)
                text, ended = await asyncio.to_thread(live.wait, seen, 1.0)
                if len(text) > seen:
                    yield f"data: {json.dumps({'text': text[seen:]})}\n\n"
                    seen = len(text)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/healthz")
    def healthz() -> dict:
        """Alive (the process answers), the bundle it serves, and the queue."""
        return {"status": "ok", "bundle": identity, "jobs": store.counts()}

    @app.get("/readyz")
    def readyz():
        """Ready to take jobs: the bundle loaded (it is, once anything answers) and the worker alive and not
        stopping; 503 with the reason otherwise (a load balancer sends jobs elsewhere)."""
        if not ready.is_set():
            return JSONResponse({"status": "stopping"}, status_code=503)
        if not runner.is_alive():
            return JSONResponse({"status": "the worker is not running"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(authorized)])
    def metrics() -> PlainTextResponse:
        """Prometheus text: queue depth, jobs by state, scans per minute, p50/p95 latency (submission to end)."""
        return PlainTextResponse(metrics_text(store, runner), media_type="text/plain; version=0.0.4")

    return app


def metrics_text(store: JobStore, runner: JobRunner) -> str:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    counts = store.counts()
    Gauge("samf_queue_depth", "jobs waiting to run", registry=reg).set(counts["queued"])
    jobs = Gauge("samf_jobs", "jobs by state", ["state"], registry=reg)
    for state, n in counts.items():
        jobs.labels(state).set(n)
    now = time.time()
    Gauge("samf_scans_per_minute", "jobs finished in the last minute", registry=reg).set(
        sum(1 for t in runner.finished if now - t <= 60.0))
    lat = sorted(runner.latencies)
    q = Gauge("samf_latency_seconds", "submission to end, over the last 1000 jobs", ["quantile"], registry=reg)
    for name, p in (("0.5", 0.5), ("0.95", 0.95)):
        q.labels(name).set(lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan"))
    return generate_latest(reg).decode()
