"""samf serve's DICOM side against pynetdicom peers on localhost: a CT series sent by an SCU is reported and its SR
and PDF arrive at a storage SCP (the "PACS"); a partial series gets no SR and a one-line reason in the log. A
series uploaded over HTTP has its SR and PDF at the job's own URLs."""

from __future__ import annotations

import os
import time

import httpx
import pydicom
import pytest
from dicom_writer import PATIENT, write_series
from service_runner import MAX_TOKENS, Pacs, Server, free_port

from samf.runtime.tools.phantom import make_phantom


def _send_series(folder: str, port: int, skip: int | None = None) -> list:
    """C-ECHO then C-STORE every image of ``folder`` (but the ``skip``-th by position) to SAMF at ``port``."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    def height(name):
        return float(pydicom.dcmread(os.path.join(folder, name)).ImagePositionPatient[2])

    files = sorted(os.listdir(folder), key=height)
    if skip is not None:
        files.pop(skip)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SAMF")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        return [assoc.send_c_store(pydicom.dcmread(os.path.join(folder, n))).Status for n in files]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(44, shape=(24, 40, 40), spacing=(8.0, 9.0, 9.0))


def test_a_series_sent_over_dicom_comes_back_as_sr_and_pdf(quick, phantom, tmp_path):
    import highdicom as hd

    from samf.runtime.inference.pipeline import ReportPipeline

    folder = str(tmp_path / "series")
    uid = write_series(folder, phantom.volume, phantom.spacing, patient=PATIENT)
    partial = str(tmp_path / "partial")
    write_series(partial, phantom.volume, phantom.spacing, patient=PATIENT)
    with ReportPipeline(quick.bundle, quant="F32", max_new_tokens=MAX_TOKENS) as pipe:
        expected = pipe.report(folder, max_new_tokens=MAX_TOKENS).text
    pacs, port = Pacs(), free_port()
    server = Server(quick.bundle, str(tmp_path / "work"), "--dicom-port", str(port), "--dicom-dest",
                    f"PACS@127.0.0.1:{pacs.port}", "--series-settle", "1").wait_ready()
    try:
        # A series with a slice missing, sent right after (both settle together): no SR, and the log says why in
        # one line (below).
        assert set(_send_series(folder, port)) == {0x0000}
        assert set(_send_series(partial, port, skip=12)) == {0x0000}
        sr, pdf = sorted(pacs.wait(2), key=lambda ds: ds.Modality != "SR")
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and pdf.MIMETypeOfEncapsulatedDocument == \
            "application/pdf"
        assert b"/Subtype /Image" in pdf.EncapsulatedDocument  # the slice montage, from the job's own slices
        sr = hd.sr.Comprehensive3DSR.from_dataset(sr)
        assert sr.ContentSequence[0].TextValue == expected
        assert (sr.PatientName, sr.PatientID, sr.AccessionNumber) == (PATIENT["PatientName"], PATIENT["PatientID"],
                                                                     PATIENT["AccessionNumber"])
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == uid and sr.VerificationFlag == "UNVERIFIED"

        end = time.monotonic() + 120
        # The worker stores a job's end, then logs it: wait for the log line, not only the state.
        while not (failed := [line for line in open(server.log) if " failed in " in line]):
            assert time.monotonic() < end, "the partial series was not reported as failed"
            time.sleep(0.05)
        assert httpx.get(server.url + "/healthz", timeout=10).json()["jobs"]["failed"] == 1
        assert len(pacs.received) == 2
        assert len(failed) == 1 and "missing slices" in failed[0]
        log = open(server.log).read()
        assert PATIENT["PatientName"] not in log and uid not in log and "Traceback" not in log
    finally:
        server.stop()
        pacs.server.shutdown()


def test_a_dicom_series_uploaded_over_http_has_its_sr_and_pdf_there(quick, phantom, tmp_path):
    """A zip of a series de-identified down to what samf reads: the job's record links its SR and PDF, which
    carry the report and the series' study; a NIfTI job has none, and says why."""
    import io
    import zipfile

    from dicom_writer import strip_to_minimum

    folder = tmp_path / "series"
    uid = write_series(str(folder), phantom.volume, phantom.spacing, patient=PATIENT)
    strip_to_minimum(str(folder))
    study = pydicom.dcmread(next(folder.iterdir())).StudyInstanceUID
    upload = tmp_path / "series.zip"
    with zipfile.ZipFile(upload, "w") as z:
        for path in folder.iterdir():
            z.write(path, f"DICOM/{path.name}")
    server = Server(quick.bundle, str(tmp_path / "work")).wait_ready()
    try:
        series_job = server.submit(str(upload)).json()["id"]
        nifti_job = server.submit(os.path.join(quick.data, quick.test[0].image)).json()["id"]
        jobs = server.wait_all([series_job, nifti_job])
        job = jobs[series_job]
        assert job["status"] == "done" and job["dicom"] == {"sr": f"/v1/reports/{series_job}/sr",
                                                            "pdf": f"/v1/reports/{series_job}/pdf"}
        got = httpx.get(server.url + job["dicom"]["sr"], timeout=30)
        assert got.status_code == 200 and got.headers["content-type"] == "application/dicom"
        sr = pydicom.dcmread(io.BytesIO(got.content))
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and sr.ContentSequence[0].TextValue == job["report"]
        assert sr.StudyInstanceUID == study and sr.PatientID == "" and sr.PatientBirthDate == ""
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        pdf = httpx.get(server.url + job["dicom"]["pdf"], timeout=30)
        assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF-")
        wrapped = httpx.get(server.url + job["dicom"]["pdf"], headers={"Accept": "application/dicom"}, timeout=30)
        ds = pydicom.dcmread(io.BytesIO(wrapped.content))
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.StudyInstanceUID == study
        assert ds.EncapsulatedDocument[:ds.EncapsulatedDocumentLength] == pdf.content
        assert "dicom" not in jobs[nifti_job]
        none = httpx.get(f"{server.url}/v1/reports/{nifti_job}/sr", timeout=30)
        assert none.status_code == 404 and "DICOM series" in none.json()["error"]
        assert httpx.get(f"{server.url}/v1/reports/nope/pdf", timeout=30).status_code == 404
    finally:
        server.stop()


def _echo(port: int, calling_ae: str) -> bool:
    """Whether an SCU calling itself ``calling_ae`` gets an association and a C-ECHO answer."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SAMF")
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_only_allowed_senders_associate(tmp_path, caplog):
    from samf.runtime.service.dicom_net import SeriesCollector, start_scp

    collector = SeriesCollector(str(tmp_path / "in"), 60.0, lambda folder: None)
    port = free_port()
    scp = start_scp("SAMF", "127.0.0.1", port, collector, allowed=("SCANNER", "CT2"))
    try:
        with caplog.at_level("WARNING", logger="samf.service"):
            assert _echo(port, "SCANNER") and _echo(port, "CT2")
            assert not _echo(port, "INTRUDER")
        assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == [
            "DICOM association refused: its calling AE title is not in --dicom-allow"]
    finally:
        scp.shutdown()
    open_scp = start_scp("SAMF", "127.0.0.1", port := free_port(), collector)  # no list: any sender
    try:
        assert _echo(port, "ANYONE")
    finally:
        open_scp.shutdown()


def test_dicom_off_this_machine_needs_an_allow_list(quick, tmp_path):
    import subprocess

    def serve(*extra):
        return subprocess.run(["samf", "serve", "--bundle", quick.bundle, "--host", "0.0.0.0", "--token", "t0ken",
                               "--port", str(free_port()), "--work", str(tmp_path / "w"), "--dicom-port",
                               str(free_port()), *extra], capture_output=True, text=True, timeout=120)

    for extra, words in (((), "--dicom-allow"), (("--dicom-allow", "BAD\\AE"), "AE title")):
        r = serve(*extra)
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_job_delivered_twice_sends_the_same_uids(phantom, tmp_path):
    """A job that runs again (kill -9 after the C-STORE of its results, before its "done" record) sends its SR and
    PDF under the same Series and SOP Instance UIDs, so the PACS stores them once; another job, or the same job on
    another bundle, gets others; ``samf report --dicom-out`` (no job) makes new ones each time."""
    from types import SimpleNamespace

    from service_runner import Pacs

    from samf.runtime.outputs.dicom_out import dicom_results
    from samf.runtime.service.dicom_net import DicomReply

    folder = str(tmp_path / "series")
    write_series(folder, phantom.volume, phantom.spacing, patient=PATIENT)
    identity = {"llm": "test", "bundle_sha256": "ab" * 32}
    result = SimpleNamespace(text="No acute findings.", identity=identity, slices=None, evidence=None)
    pacs = Pacs()
    try:
        reply = DicomReply(SimpleNamespace(pre=SimpleNamespace(slices_per_plane=8)), f"PACS@127.0.0.1:{pacs.port}",
                           None, "SAMF", results_dir=str(tmp_path / "results"), retries=0)
        for _ in range(2):
            assert reply("job-1", folder, result)["delivery"]["status"] == "delivered"
        first, second = pacs.wait(4)[:2], pacs.received[2:]
    finally:
        pacs.server.shutdown()

    def uids(objects):
        return sorted((ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in objects)

    assert uids(first) == uids(second) and len({u for _, s, i in uids(first) for u in (s, i)}) == 4
    again = dicom_results(folder, result.text, identity, job_id="job-1")
    assert uids(again.values()) == uids(first)
    others = [dicom_results(folder, result.text, identity, job_id="job-2"),
              dicom_results(folder, result.text, dict(identity, bundle_sha256="cd" * 32), job_id="job-1"),
              dicom_results(folder, result.text, identity), dicom_results(folder, result.text, identity)]
    seen = {u for objects in [first, *[o.values() for o in others]] for _, s, i in uids(objects) for u in (s, i)}
    assert len(seen) == 4 * 5
