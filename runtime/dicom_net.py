"""DICOM networking for the service (pynetdicom): a C-STORE SCP that receives CT series and answers C-ECHO, and
the C-STORE that hands the SR and the PDF back.

DICOM has no "end of series" message: a series counts as complete when no new image of it has arrived for
``settle_s`` seconds; it is then queued as a report job, like an upload. Received images are kept under
``WORK/dicom-in/<hash of the series UID>/`` (no UID or name in a path or a log); series still there when the
service starts are given ``settle_s`` again, as their sender may still be sending.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time

from samf.errors import SamfError

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


class SeriesCollector:
    """Receives images (``store``), and calls ``complete(folder)`` for each series once it has settled."""

    def __init__(self, root: str, settle_s: float, complete):
        self.root, self.settle_s, self.complete = root, settle_s, complete
        os.makedirs(root, exist_ok=True)
        self._last: dict = {name: time.monotonic() for name in os.listdir(root)}  # left by a previous run
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="samf-dicom-series", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def store(self, ds) -> None:
        """Keep one received image under its series' folder (file name: a hash of its SOP Instance UID)."""
        key = hashlib.sha256(str(ds.SeriesInstanceUID).encode()).hexdigest()[:16]
        name = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:24] + ".dcm"
        with self._lock:
            folder = os.path.join(self.root, key)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{name}.part")
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, os.path.join(folder, name))
            self._last[key] = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self.settle_s / 4)):
            now = time.monotonic()
            with self._lock:
                ready = [k for k, t in self._last.items() if now - t >= self.settle_s]
                for k in ready:
                    del self._last[k]
            for k in ready:
                try:
                    self.complete(os.path.join(self.root, k))
                except Exception as e:  # noqa: BLE001 - one series must not stop the watcher
                    log.warning("a received series could not be queued: %s", type(e).__name__)


def start_scp(ae_title: str, host: str, port: int, collector: SeriesCollector, allowed: tuple = ()):
    """A C-STORE and C-ECHO SCP for the storage SOP classes; returns the running server (``.shutdown()``).
    ``allowed``: the calling AE titles it associates with (any, when empty); others are rejected at association
    (A-ASSOCIATE-RJ, "calling AE title not recognised") and logged in one line."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    if allowed:
        ae.require_calling_aet = list(allowed)

    def on_store(event):
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            collector.store(ds)
        except Exception as e:  # noqa: BLE001 - answered as a failed store, the sender decides
            log.warning("a received image could not be kept: %s", type(e).__name__)
            return 0xC210
        return 0x0000

    def on_rejected(event):
        log.warning("DICOM association refused: its calling AE title is not in --dicom-allow")

    try:
        return ae.start_server((host, port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                                             (evt.EVT_REJECTED, on_rejected)])
    except OSError as e:
        raise SamfError(f"DICOM port {host}:{port}: {e.strerror or e}") from None


def send(datasets: list, destination: str, calling_ae: str = "SAMF") -> None:
    """C-STORE ``datasets`` to ``AE@HOST:PORT``; :class:`SamfError` with one line when any is not stored."""
    from pynetdicom import AE

    ae_title, host, port = parse_destination(destination)
    ae = AE(ae_title=calling_ae)
    for uid in {ds.SOPClassUID for ds in datasets}:
        ae.add_requested_context(uid)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise SamfError(f"could not associate with {ae_title} at {host}:{port}")
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
    PDF draws them."""

    def __init__(self, pipeline, destination: str | None, out_dir: str | None, calling_ae: str):
        self.pipeline, self.destination, self.out_dir, self.calling_ae = pipeline, destination, out_dir, calling_ae

    def __call__(self, job_id: str, folder: str, result) -> None:
        from .dicom_out import dicom_results, write_dicom_results

        slices, per_plane = result.slices, self.pipeline.pre.slices_per_plane
        ev = result.evidence  # the SR references the images the top slices fall on, the PDF frames them
        if self.destination is None:
            write_dicom_results(folder, result.text, result.identity, os.path.join(self.out_dir, job_id), slices,
                                per_plane, evidence=ev)
        else:
            results = dicom_results(folder, result.text, result.identity, slices, per_plane, evidence=ev)
            send(list(results.values()), self.destination, self.calling_ae)


def queue_series(store, max_tokens: int, wake):
    """The collector's ``complete``: move the settled series into a new job's folder, queue its report and
    ``wake()`` the worker."""

    def complete(folder: str) -> None:
        job_id = store.new_id()
        target = os.path.join(store.input_dir(job_id), "series")
        shutil.move(folder, target)
        store.add(job_id, "report", target, True, {"request": None, "max_tokens": max_tokens, "dicom": True})
        log.info("job %s queued (report, DICOM series of %d images)", job_id, len(os.listdir(target)))
        wake()

    return complete
