"""DICOM networking for the service (pynetdicom): a C-STORE SCP that receives CT series and answers C-ECHO, and
the C-STORE that hands the SR and the PDF back.

DICOM has no "end of series" message: a series counts as complete when no new image of it has arrived for
``settle_s`` seconds; it is then queued as a report job, like an upload. Received images are kept under
``WORK/dicom-in/<hash of the series UID>/`` (no UID or name in a path or a log); series still there when the
service starts are given ``settle_s`` again, as their sender may still be sending. A series still arriving
``timeout_s`` after its first image (a sender that never stops, or stalls and resumes for ever) is dropped, its
files removed, with one log line.

Only CT images are taken: a C-STORE of any other SOP class, or of a CT image whose Modality is not CT, is answered
with a failure status (0x0122, SOP class not supported; 0xA900, data set does not match) and one log line; the
association stays up for the sender's next image.

TLS (``tls_contexts``): the SCP and the C-STORE of the results take an ``ssl.SSLContext`` (pynetdicom's
``ssl_context``/``tls_args``); with a CA file the SCP asks every sender for a certificate that chains to it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import ssl
import threading
import time

from samf.errors import SamfError, one_line

from .config import ServiceConfig

log = logging.getLogger("samf.service")


def check_ae_title(title: str, what: str) -> str:
    """An AE title as DICOM allows it: 1-16 characters of printable ASCII, not only spaces, no backslash."""
    if not 0 < len(title.strip()) <= 16 or len(title) > 16 or "\\" in title or not title.isprintable() \
            or not title.isascii():
        raise SamfError(f"{what} {title!r}: an AE title is 1-16 printable ASCII characters, no backslash")
    return title


def parse_destination(text: str) -> tuple:
    """``AE@HOST:PORT`` -> (ae title, host, port)."""
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        port = int(port)
    except ValueError:
        raise SamfError(f"--dicom-dest {text!r}: expected AE@HOST:PORT") from None
    if not ae or len(ae) > 16 or not host or not 0 < port < 65536:
        raise SamfError(f"--dicom-dest {text!r}: expected AE@HOST:PORT (an AE title of 1-16 characters)")
    return ae, host, port


#: CT Image, Enhanced CT Image and Legacy Converted Enhanced CT Image Storage: the images samf's loader reads.
CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")


def tls_contexts(cert: str, key: str, ca: str | None = None) -> tuple:
    """``(server, client)`` SSL contexts for DICOM TLS from PEM files: the server's asks senders for a
    certificate chaining to ``ca`` when one is given; the client's checks the destination's certificate against
    ``ca`` (the system's CAs without one) and presents ``cert``."""
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert, key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        client.load_cert_chain(cert, key)
        if ca:
            server.load_verify_locations(ca)
            server.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise SamfError(f"DICOM TLS files ({cert}, {key}{', ' + ca if ca else ''}): "
                        f"{getattr(e, 'strerror', None) or e}") from None
    return server, client


class SeriesCollector:
    """Receives images (``store``), and calls ``complete(folder, who)`` for each series once it has settled;
    drops a series still arriving ``timeout_s`` after its first image."""

    def __init__(self, root: str, settle_s: float, complete, timeout_s: float = ServiceConfig.series_timeout):
        self.root, self.settle_s, self.complete, self.timeout_s = root, settle_s, complete, timeout_s
        os.makedirs(root, exist_ok=True)
        left = [n for n in os.listdir(root) if not n.startswith(".")]  # series left by a previous run
        self._last: dict = {name: time.monotonic() for name in left}
        self._first: dict = dict(self._last)
        self._who: dict = {name: self._read_sender(name) for name in left}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="samf-dicom-series", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _sender_file(self, key: str) -> str:
        """Where a series' sender is kept beside it, so a series received before a restart is still audited under
        its sender's name after it (``.<key>.sender``: not a series folder, not inside one)."""
        return os.path.join(self.root, f".{key}.sender")

    def _read_sender(self, key: str) -> str | None:
        try:
            with open(self._sender_file(key)) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _forget(self, key: str) -> None:
        try:
            os.remove(self._sender_file(key))
        except OSError:
            pass

    def store(self, ds, who: str | None = None) -> None:
        """Keep one received image under its series' folder (file name: a hash of its SOP Instance UID)."""
        key = hashlib.sha256(str(ds.SeriesInstanceUID).encode()).hexdigest()[:16]
        name = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:24] + ".dcm"
        with self._lock:
            folder = os.path.join(self.root, key)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{name}.part")
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, os.path.join(folder, name))
            now = time.monotonic()
            self._last[key] = now
            self._first.setdefault(key, now)
            if who:
                if self._who.get(key) != who:
                    with open(self._sender_file(key), "w") as f:
                        f.write(who)
                self._who[key] = who

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self.settle_s / 4)):
            now = time.monotonic()
            with self._lock:
                ready = [k for k, t in self._last.items() if now - t >= self.settle_s]
                stale = [k for k in self._last if k not in ready and now - self._first[k] >= self.timeout_s]
                for k in ready + stale:
                    del self._last[k]
                    self._first.pop(k, None)
                who = {k: self._who.pop(k, None) for k in ready + stale}
                for k in stale:  # under the lock: an image arriving now starts a new series folder
                    folder = os.path.join(self.root, k)
                    n = len(os.listdir(folder)) if os.path.isdir(folder) else 0
                    shutil.rmtree(folder, ignore_errors=True)
                    log.warning("a received series (%d images, from %s) was still arriving after %.0f s: dropped, "
                                "its files removed", n, who[k] or "an unknown sender", self.timeout_s)
            for k in stale:
                self._forget(k)
            for k in ready:
                try:
                    self.complete(os.path.join(self.root, k), who[k])
                except Exception as e:  # noqa: BLE001 - one series must not stop the watcher
                    log.warning("a received series could not be queued: %s", type(e).__name__)
                self._forget(k)


def start_scp(ae_title: str, host: str, port: int, collector: SeriesCollector, allowed: tuple = (),
              ssl_context: ssl.SSLContext | None = None):
    """A C-STORE and C-ECHO SCP for the storage SOP classes; returns the running server (``.shutdown()``).
    ``allowed``: the calling AE titles it associates with (any, when empty); others are rejected at association
    (A-ASSOCIATE-RJ, "calling AE title not recognised") and logged in one line. Images other than CT are
    refused one by one (a failure status), the association kept. ``ssl_context``: DICOM over TLS."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    if allowed:
        ae.require_calling_aet = list(allowed)

    def on_store(event):
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in CT_STORAGE:
            log.warning("a received image was refused: not a CT image (SOP class %s)", sop_class)
            return 0x0122
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            modality = str(ds.get("Modality", ""))
            if modality != "CT":
                log.warning("a received image was refused: a CT image whose Modality is %r", modality[:16])
                return 0xA900
            collector.store(ds, "dicom:" + str(event.assoc.requestor.ae_title).strip())
        except Exception as e:  # noqa: BLE001 - answered as a failed store, the sender decides
            log.warning("a received image could not be kept: %s", type(e).__name__)
            return 0xC210
        return 0x0000

    def on_rejected(event):
        log.warning("DICOM association refused: its calling AE title is not in --dicom-allow")

    try:
        return ae.start_server((host, port), block=False, ssl_context=ssl_context,
                               evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                                             (evt.EVT_REJECTED, on_rejected)])
    except OSError as e:
        raise SamfError(f"DICOM port {host}:{port}: {e.strerror or e}") from None


def send(datasets: list, destination: str, calling_ae: str = ServiceConfig.ae_title,
         ssl_context: ssl.SSLContext | None = None) -> None:
    """C-STORE ``datasets`` to ``AE@HOST:PORT`` (over TLS with ``ssl_context``); :class:`SamfError` with one
    line when any is not stored."""
    from pynetdicom import AE

    ae_title, host, port = parse_destination(destination)
    ae = AE(ae_title=calling_ae)
    for uid in {ds.SOPClassUID for ds in datasets}:
        ae.add_requested_context(uid)
    tls = None if ssl_context is None else (ssl_context, host)
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls)
    if not assoc.is_established:
        raise SamfError(f"could not associate with {ae_title} at {host}:{port}"
                        + (" over TLS" if tls else ""))
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0x0000:
                code = f"0x{status.Status:04X}" if status else "no answer"
                raise SamfError(f"{ae_title} did not store the {ds.Modality} object ({code})")
    finally:
        assoc.release()


class DicomReply:
    """After a DICOM-received series is reported: the SR and the PDF, sent to ``destination`` by C-STORE or
    written under ``out_dir/<job id>/``. The result must keep the slices the model read (``keep_slices``): the
    PDF draws them.

    A C-STORE that fails (no association, a refusal status) is tried again ``retries`` times, waiting
    ``retry_wait`` seconds and doubling, each failure logged in one line; then the job is marked undelivered,
    and its SR and PDF are kept under ``results_dir/<job id>/`` for ``GET /v1/reports/{id}/sr|pdf``. A stop
    (SIGTERM) ends the waiting at once, with the same outcome."""

    def __init__(self, pipeline, destination: str | None, out_dir: str | None, calling_ae: str,
                 results_dir: str | None = None, retries: int = ServiceConfig.dicom_retries,
                 retry_wait: float = ServiceConfig.dicom_retry_wait,
                 ssl_context: ssl.SSLContext | None = None):
        self.pipeline, self.destination, self.out_dir, self.calling_ae = pipeline, destination, out_dir, calling_ae
        self.results_dir, self.retries, self.retry_wait, self.ssl_context = results_dir, retries, retry_wait, \
            ssl_context
        self.interrupt = threading.Event()  # set on stop: no more waiting between tries

    def __call__(self, job_id: str, folder: str, result, stopping=lambda: False) -> dict:
        from ..outputs.compose import ScanOutputs

        # UIDs from the job's id: a job that runs again after a crash sends the same objects, stored once.
        outputs = ScanOutputs(folder, result, self.pipeline.pre.slices_per_plane, job_id=job_id)
        if self.destination is None:
            outputs.write_dicom(os.path.join(self.out_dir, job_id))
            return {"delivery": {"status": "delivered", "outcome": "written to the output folder", "attempts": 1}}
        results = outputs.dicom()
        ae_title = parse_destination(self.destination)[0]
        wait, error = self.retry_wait, None
        for attempt in range(1, self.retries + 2):
            try:
                send(list(results.values()), self.destination, self.calling_ae, self.ssl_context)
                if attempt > 1:
                    log.info("job %s: SR and PDF delivered to %s on try %d", job_id, ae_title, attempt)
                return {"delivery": {"status": "delivered", "to": ae_title, "attempts": attempt,
                                     "outcome": f"stored by {ae_title}"}}
            except Exception as e:  # noqa: BLE001 - any failure to store is retried, then reported
                error = one_line(e)
            if attempt > self.retries or stopping() or self.interrupt.is_set():
                break
            log.warning("job %s: SR and PDF not delivered (try %d of %d: %s); again in %.1f s", job_id, attempt,
                        self.retries + 1, error, wait)
            if self.interrupt.wait(wait):
                break
            wait *= 2
        outputs.write_dicom(os.path.join(self.results_dir, job_id))
        log.warning("job %s: undelivered after %d tries (%s); its SR and PDF are kept for GET "
                    "/v1/reports/%s/sr and /pdf", job_id, attempt, error, job_id)
        return {"delivery": {"status": "undelivered", "attempts": attempt, "error": error,
                             "outcome": f"not stored by {ae_title}: {error}"}, "dicom": ["sr", "pdf"]}


def queue_series(store, max_tokens: int, wake, audit=None):
    """The collector's ``complete``: move the settled series into a new job's folder, queue its report and
    ``wake()`` the worker."""
    from .audit import NullTrail, scan_sha256

    audit = audit or NullTrail()

    def complete(folder: str, who: str | None = None) -> None:
        job_id = store.new_id()
        target = os.path.join(store.input_dir(job_id), "series")
        shutil.move(folder, target)
        who = who or "dicom:unknown"
        sha = scan_sha256(target)
        store.add(job_id, "report", target, True, {"request": None, "max_tokens": max_tokens, "dicom": True,
                                                   "who": who, "sha256": sha})
        audit.record("received", job_id, "report", who=who, scan_sha256=sha,
                     outcome=f"series of {len(os.listdir(target))} images")
        log.info("job %s queued (report, DICOM series of %d images)", job_id, len(os.listdir(target)))
        wake()

    return complete
