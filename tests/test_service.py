"""samf serve: a real server on localhost, real HTTP clients (httpx) -- concurrent jobs, kill -9 and restart, bad
uploads, limits, a token-protected bind, streaming, metrics, and no identifiers in its log."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import shutil
import signal
import subprocess
import time
import zipfile

import httpx
import pytest
from service_runner import MAX_TOKENS, Server, free_port

from samf.runtime.inference.pipeline import RECORD_FIELDS
from samf.runtime.service.jobs import UploadError, kind_of_upload, path_within, unpack_dicom_zip


@pytest.fixture(scope="module")
def expected(quick, scans):
    """``samf report``'s pipeline, one scan at a time: what every service job must return."""
    from samf.runtime.inference.pipeline import ReportPipeline

    with ReportPipeline(quick.bundle, quant="F32", max_new_tokens=MAX_TOKENS) as pipe:
        return {s: pipe.report(s, max_new_tokens=MAX_TOKENS).text for s in scans}


def test_twenty_concurrent_clients_get_the_reports_samf_report_gives(quick, scans, expected, tmp_path):
    server = Server(quick.bundle, str(tmp_path / "work")).wait_ready()
    try:
        with cf.ThreadPoolExecutor(20) as pool:
            posted = list(pool.map(lambda s: server.submit(s), scans))
        assert [r.status_code for r in posted] == [202] * 20
        ids = {r.json()["id"]: s for r, s in zip(posted, scans)}
        # One client follows its report as it is written (server-sent events).
        first = next(iter(ids))
        pieces, final = [], None
        with httpx.stream("GET", f"{server.url}/v1/reports/{first}/stream", timeout=120) as r:
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "done":
                        final = json.loads(line[6:])
                    else:
                        pieces.append(json.loads(line[6:])["text"])
        jobs = server.wait_all(ids)
        assert {j["status"] for j in jobs.values()} == {"done"}
        for job_id, scan in ids.items():
            assert jobs[job_id]["report"] == expected[scan]
            assert jobs[job_id]["identity"]["llm"] == "llm-F32.gguf" and "load" in jobs[job_id]["timings"]
        assert "".join(pieces) == final["report"] == jobs[first]["report"]
        cli = subprocess.run(["samf", "report", scans[3], "--bundle", quick.bundle, "--quant", "F32", "--max-tokens",
                              str(MAX_TOKENS), "--json"], capture_output=True, text=True, check=True)
        said, job = json.loads(cli.stdout), jobs[next(i for i, s in ids.items() if s == scans[3])]
        assert said["report"].strip() == job["report"].strip()
        # One result record (Result.to_record) under the same names: the CLI adds the input around it, the
        # service the job's id, kind, status and times.
        record = [f for f in RECORD_FIELDS if f != "choice_nll"]
        assert [k for k in said if k in RECORD_FIELDS] == record == [k for k in job if k in RECORD_FIELDS]
        assert set(said) - set(record) == {"path", "input"}
        assert set(job) - set(record) == {"id", "kind", "status", "created", "started", "finished"}
        assert said["scan"] == job["scan"] and said["new_tokens"] == job["new_tokens"] and job["new_tokens"] > 0
        # The evidence (the fusion's attention) comes with the job's result, as with `samf report --json`.
        assert {p: [e["slice"] for e in t] for p, t in job["evidence"]["top"].items()} == {
            p: [e["slice"] for e in t] for p, t in said["evidence"]["top"].items()}
        assert max(abs(a - b) for a, b in zip(job["evidence"]["alpha"], said["evidence"]["alpha"])) < 1e-5

        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'samf_jobs{state="done"} 20.0' in metrics and "samf_queue_depth 0.0" in metrics
        assert 'samf_latency_seconds{quantile="0.95"}' in metrics and "samf_scans_per_minute 20.0" in metrics
        schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
        assert {"/v1/reports", "/v1/reports/{job_id}", "/v1/reports/{job_id}/stream", "/v1/vqa", "/healthz",
                "/metrics"} <= set(schema["paths"])
    finally:
        server.stop()


def test_kill_9_mid_job_then_restart_loses_nothing(quick, scans, expected, tmp_path):
    work = str(tmp_path / "work")
    server = Server(quick.bundle, work, "--parallel", "1").wait_ready()
    with cf.ThreadPoolExecutor(20) as pool:
        posted = list(pool.map(lambda s: (server.submit(s).json()["id"], s), scans + scans))
    ids = dict(posted)
    while True:  # kill as soon as the first jobs have ended, with the rest queued or running
        counts = server.http().get(server.url + "/healthz", timeout=10).json()["jobs"]
        if counts["done"] >= 1:
            server.stop(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert counts["queued"] + counts["running"] > 0, counts
    again = Server(quick.bundle, work, "--parallel", "1").wait_ready()
    try:
        jobs = again.wait_all(ids)
        assert len(jobs) == 40
        assert all(j["status"] == "done" and j["report"] == expected[ids[i]] for i, j in jobs.items())
        assert os.listdir(os.path.join(work, "inputs")) == []           # every upload removed once its job ended
        assert "job(s) resumed" in open(again.log).read()
    finally:
        again.stop()


def test_bad_input_fails_its_own_job_with_one_line(quick, scans, expected, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(scans[0], inputs / "Smith^Jane_ct.nii.gz")
    server = Server(quick.bundle, str(tmp_path / "work"), "--input-dir", str(inputs), "--max-upload-mb", "1")
    server.wait_ready()
    try:
        garbage = tmp_path / "notes.txt"
        garbage.write_bytes(b"not a scan at all" * 100)
        r = server.submit(str(garbage))
        assert r.status_code == 400 and "neither a NIfTI" in r.json()["error"]
        broken = tmp_path / "broken.nii.gz"
        broken.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(5000))
        bad = server.submit(str(broken), name="Doe^John.nii.gz").json()["id"]
        evil = tmp_path / "evil.zip"
        with zipfile.ZipFile(evil, "w") as z:
            z.writestr("../../outside.dcm", b"DICM" * 10)
        bad_zip = server.submit(str(evil)).json()["id"]
        good = server.submit(scans[1]).json()["id"]
        by_path = httpx.post(server.url + "/v1/reports", data={"path": str(inputs / "Smith^Jane_ct.nii.gz")},
                             timeout=30).json()["id"]
        outside = httpx.post(server.url + "/v1/reports", data={"path": scans[2]}, timeout=30)
        assert outside.status_code == 403 and "input folders" in outside.json()["error"]
        neither = httpx.post(server.url + "/v1/reports", data={}, timeout=30)
        assert neither.status_code == 400
        big = tmp_path / "big.nii.gz"
        big.write_bytes(b"\x1f\x8b" + b"\0" * (3 << 20))
        assert server.submit(str(big)).status_code == 413
        vqa = httpx.post(server.url + "/v1/vqa", data={"path": str(inputs / "Smith^Jane_ct.nii.gz"),
                                                       "question": "Is there a pleural effusion?",
                                                       "choices": ["Yes, left", "Yes, right", "Bilateral", "No"]},
                         timeout=30)
        assert vqa.status_code == 202
        jobs = server.wait_all([bad, bad_zip, good, by_path, vqa.json()["id"]])
        assert jobs[bad]["status"] == "failed" and "\n" not in jobs[bad]["error"] and "NIfTI" in jobs[bad]["error"]
        assert jobs[bad_zip]["status"] == "failed" and "DICOM" in jobs[bad_zip]["error"]
        assert not (tmp_path / "outside.dcm").exists() and not os.path.exists(os.path.join(tmp_path, "work", "..",
                                                                                             "outside.dcm"))
        assert jobs[good]["report"] == expected[scans[1]] and jobs[by_path]["report"] == expected[scans[0]]
        answered = jobs[vqa.json()["id"]]
        assert answered["status"] == "done" and answered["answer"] in ("A", "B", "C", "D")
        # Scored by its choices: the answer is the likeliest of the four, their scores in the record.
        nll = answered["choice_nll"]
        assert set(nll) == set("ABCD") and answered["answer"] == min(nll, key=nll.get)
        assert answered["report"].startswith(answered["answer"] + ". ")
        assert httpx.get(server.url + "/v1/reports/nope", timeout=10).status_code == 404
        log = open(server.log).read()
        for identifier in ("Doe^John", "Smith^Jane", str(inputs), "notes.txt", "phantom_"):
            assert identifier not in log, identifier
    finally:
        server.stop()
    full = Server(quick.bundle, str(tmp_path / "work2"), "--max-queue", "0").wait_ready()
    try:
        r = full.submit(scans[0])
        assert r.status_code == 429 and "queue is full" in r.json()["error"]
    finally:
        full.stop()


def test_off_this_machine_only_with_a_token(quick, scans, tmp_path):
    refused = subprocess.run(["samf", "serve", "--bundle", quick.bundle, "--host", "0.0.0.0", "--port",
                              str(free_port()), "--work", str(tmp_path / "w0")],
                             capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "SAMF_TOKEN"})
    assert refused.returncode != 0 and "needs a bearer token" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    server = Server(quick.bundle, str(tmp_path / "work"), host="0.0.0.0", token="s3cret-token").wait_ready()
    try:
        with open(scans[0], "rb") as f:
            anonymous = httpx.post(server.url + "/v1/reports", files={"scan": ("a.nii.gz", f)}, timeout=30)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        ok = server.submit(scans[0])
        assert ok.status_code == 202
        assert server.wait_all([ok.json()["id"]])[ok.json()["id"]]["status"] == "done"
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200     # health needs no token
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ helpers, no server

def test_upload_kinds_paths_and_zip_limits(tmp_path):
    assert kind_of_upload(b"\x1f\x8b\x08rest") == "nifti.gz"
    assert kind_of_upload(b"PK\x03\x04rest") == "zip"
    assert kind_of_upload(b"\0" * 344 + b"n+1\0" + b"\0" * 10) == "nifti"
    with pytest.raises(UploadError):
        kind_of_upload(b"%PDF-1.7")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.nii").write_bytes(b"x")
    os.symlink("/etc/passwd", tmp_path / "in" / "link")
    assert path_within(str(tmp_path / "in" / "a.nii"), [str(tmp_path / "in")]).endswith("a.nii")
    for p in (str(tmp_path / "in" / ".." / "x"), str(tmp_path / "in" / "link"), "/etc/passwd"):
        with pytest.raises(UploadError):
            path_within(p, [str(tmp_path / "in")])
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", b"\0" * (5 << 20))
    (tmp_path / "bomb.zip").write_bytes(bomb.getvalue())
    with pytest.raises(UploadError, match="more than"):
        unpack_dicom_zip(str(tmp_path / "bomb.zip"), str(tmp_path / "out"), 1 << 20)
    (tmp_path / "cut.zip").write_bytes(bomb.getvalue()[:100])
    with pytest.raises(UploadError, match="zip"):
        unpack_dicom_zip(str(tmp_path / "cut.zip"), str(tmp_path / "out2"), 1 << 30)
