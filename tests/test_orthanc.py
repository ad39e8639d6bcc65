"""samf serve against a real PACS: Orthanc (Debian package ``orthanc``, started here with its own configuration,
storage folder and free localhost ports) sends a CT series to samf by C-STORE (its REST
``/modalities/samf/store``), and samf's SR and PDF come back into Orthanc in the series' study, reading as
``samf report``'s. Then the state a ``kill -9`` leaves between the C-STORE of the results and the job's "done"
record (the job still running, its series still in the work folder) is restarted: the job runs again and sends
again, and Orthanc still holds one SR and one PDF (the same SOP Instance UIDs: see ``job_uids``).

Orthanc 1.10 has no option for the address it listens on: it listens on every interface, so its configuration
refuses every peer but samf at 127.0.0.1 (``RemoteAccessAllowed`` false: REST from this machine only;
``DicomAlwaysAllow*`` false and ``DicomCheckModalityHost``: DICOM from the declared modality only). Skipped, with
the reason, where Orthanc is not installed or does not start. About 12 s after the ``quick`` bundle (2 cores): not
marked slow. Orthanc answers the second C-STORE of the same SOP Instance UIDs with success and keeps the first
copy (its default, ``OverwriteInstances`` false)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import httpx
import pydicom
import pytest
from dicom_writer import PATIENT, write_series
from service_runner import MAX_TOKENS, Server, free_port

from samf.runtime.tools.phantom import make_phantom

ENCAPSULATED_PDF, COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.88.34"


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                            if os.access(p, os.X_OK)), None)


class Orthanc:
    """An Orthanc of its own in ``root``: REST at ``url``, DICOM ``ORTHANC`` at ``dicom_port``, and samf declared
    as the modality ``samf`` (AE SAMF at 127.0.0.1:``samf_port``)."""

    def __init__(self, binary: str, root, samf_port: int):
        self.http_port, self.dicom_port, self.samf_port = free_port(), free_port(), samf_port
        self.url, self.log = f"http://127.0.0.1:{self.http_port}", str(root / "orthanc.log")
        storage = root / "storage"
        storage.mkdir()
        config = dict(Name="samf-test", HttpPort=self.http_port, DicomPort=self.dicom_port, DicomAet="ORTHANC",
                      StorageDirectory=str(storage), IndexDirectory=str(storage), RemoteAccessAllowed=False,
                      AuthenticationEnabled=False, Plugins=[], DicomModalities={"samf": ["SAMF", "127.0.0.1",
                                                                                          samf_port]},
                      DicomCheckModalityHost=True, DicomCheckCalledAet=True, DicomAlwaysAllowEcho=False,
                      DicomAlwaysAllowStore=False, DicomAlwaysAllowFind=False, DicomAlwaysAllowGet=False,
                      DicomAlwaysAllowMove=False, LuaScripts=[], HttpCompressionEnabled=False)
        path = root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        self.http = httpx.Client(base_url=self.url, timeout=60, trust_env=False)
        self.proc = subprocess.Popen([binary, str(path)], stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     cwd=str(root))

    def wait_up(self, timeout: float = 60.0) -> str | None:
        """None once the REST API answers; otherwise why not (the log's last line)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                if self.http.get("/system", timeout=2).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        lines = open(self.log).read().strip().splitlines()
        return f"Orthanc did not start ({lines[-1] if lines else 'no log'})"

    def get(self, path: str):
        r = self.http.get(path)
        r.raise_for_status()
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.content

    def upload(self, folder: str) -> dict:
        """POST /instances every file of ``folder``; the last answer (its ParentSeries and ParentStudy)."""
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                r = self.http.post("/instances", content=f.read())
            r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        """Killed: everything was read from it, its storage is this test's, and on SIGTERM it takes 3.4 s to
        stop (2 cores)."""
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def orthanc(tmp_path):
    binary = _orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc): no test against a real PACS")
    root = tmp_path / "orthanc"
    root.mkdir()
    pacs = Orthanc(binary, root, free_port())
    try:
        why = pacs.wait_up()
        if why is not None:
            pytest.skip(why)
        yield pacs
    finally:
        pacs.stop()


def _study_series(pacs: Orthanc, study: str) -> dict:
    """Modality -> [Orthanc series ids] in ``study``."""
    out: dict = {}
    for series in pacs.get(f"/studies/{study}/series"):
        out.setdefault(series["MainDicomTags"].get("Modality"), []).append(series["ID"])
    return out


def _wait_results(pacs: Orthanc, study: str, timeout: float = 300.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = _study_series(pacs, study)
        if "SR" in found and "DOC" in found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"Orthanc's study holds {sorted(found)} after {timeout:.0f} s, not the SR and the PDF; "
                         f"Orthanc's log: {open(pacs.log).read()[-1500:]}")


def _instances(pacs: Orthanc, series_id: str) -> list:
    """The series' instances as Orthanc stored them (their files, read with pydicom)."""
    return [pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{i['ID']}/file")))
            for i in pacs.get(f"/series/{series_id}/instances")]


def test_orthanc_sends_a_series_and_stores_the_sr_and_pdf_once(quick, orthanc, tmp_path):
    import highdicom as hd

    phantom = make_phantom(45, shape=(24, 40, 40), spacing=(8.0, 9.0, 9.0))
    folder = str(tmp_path / "series")
    series_uid = write_series(folder, phantom.volume, phantom.spacing, patient=PATIENT)
    study_uid = str(pydicom.dcmread(os.path.join(folder, os.listdir(folder)[0])).StudyInstanceUID)
    # What `samf report` makes of the same series: the text, and its own SR's.
    out = str(tmp_path / "report")
    r = subprocess.run(["samf", "report", folder, "--bundle", quick.bundle, "--quant", "F32", "--max-tokens",
                        str(MAX_TOKENS), "--dicom-out", out], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    expected = r.stdout.strip()
    assert hd.sr.srread(os.path.join(out, "sr.dcm")).ContentSequence[0].TextValue.strip() == expected

    uploaded = orthanc.upload(folder)
    study = uploaded["ParentStudy"]
    work = str(tmp_path / "work")
    args = ("--dicom-port", str(orthanc.samf_port), "--dicom-dest", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
            "--dicom-allow", "ORTHANC", "--series-settle", "1", "--dicom-retries", "0")
    server = Server(quick.bundle, work, *args).wait_ready()
    try:
        sent = orthanc.http.post("/modalities/samf/store", json={"Resources": [uploaded["ParentSeries"]],
                                                                 "Synchronous": True})
        assert sent.status_code == 200, sent.text
        found = _wait_results(orthanc, study)
        end = time.monotonic() + 60
        while server.http().get(server.url + "/healthz", timeout=10).json()["jobs"]["done"] != 1:
            assert time.monotonic() < end, "the job was not recorded done"
            time.sleep(0.1)
    finally:
        server.stop(signal.SIGKILL)
    assert sorted(found) == ["CT", "DOC", "SR"] and all(len(v) == 1 for v in found.values()), found
    [sr], [pdf] = _instances(orthanc, found["SR"][0]), _instances(orthanc, found["DOC"][0])
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.StudyInstanceUID == study_uid
    assert hd.sr.Comprehensive3DSR.from_dataset(sr).ContentSequence[0].TextValue == expected
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PatientID == PATIENT["PatientID"]
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == \
        series_uid
    assert pdf.SOPClassUID == ENCAPSULATED_PDF and pdf.StudyInstanceUID == study_uid
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf" and pdf.EncapsulatedDocument.startswith(b"%PDF-")
    first = {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in (sr, pdf)}

    # The state a kill -9 between the C-STORE and the "done" record leaves: the job running, its copy of the
    # series still in the work folder. The restart runs it again and sends its SR and PDF again.
    with sqlite3.connect(os.path.join(work, "jobs.sqlite3")) as db:
        [(job_id, scan)] = db.execute("SELECT id, scan FROM jobs WHERE status='done'").fetchall()
        db.execute("UPDATE jobs SET status='running', finished=NULL, result=NULL WHERE id=?", (job_id,))
    shutil.copytree(folder, scan)
    server = Server(quick.bundle, work, *args).wait_ready()
    try:
        job = server.wait_all([job_id])[job_id]
    finally:
        server.stop()
    assert job["status"] == "done" and job["delivery"]["status"] == "delivered", job
    events = [json.loads(line) for line in open(os.path.join(work, "audit.jsonl"))]
    assert [e["event"] for e in events if e.get("job") == job_id and e["event"] in ("delivered", "requeued")] == \
        ["delivered", "requeued", "delivered"]
    found = _study_series(orthanc, study)
    assert sorted(found) == ["CT", "DOC", "SR"] and all(len(v) == 1 for v in found.values()), found
    again = [ds for kind in ("SR", "DOC") for ds in _instances(orthanc, found[kind][0])]
    assert len(again) == 2 and {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in again} == first
    assert orthanc.get("/statistics")["CountInstances"] == 24 + 2
