"""samf serve as a hospital's IT runs it: SIGTERM mid-batch then a restart (every job done once, no SR sent twice),
/readyz, the audit trail and its named tokens (rotated without a restart), bad DICOM input (not CT, a series that
never ends, a PACS that refuses the SR), and the TOML config file."""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import os
import signal
import time

import httpx
import pydicom
import pytest
from dicom_writer import PATIENT, write_series
from service_runner import MAX_TOKENS, Pacs, Server, free_port, send_series

from samf.runtime.inference.pipeline import PipelineConfig
from samf.runtime.service.config import ServiceConfig
from samf.runtime.tools.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(44, shape=(24, 40, 40), spacing=(8.0, 9.0, 9.0))


@pytest.fixture(scope="module")
def scans(quick):
    import csv

    with open(os.path.join(quick.data, "test.csv")) as f:
        return [os.path.join(quick.data, r["image"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def expected(quick, scans):
    from samf.runtime.inference.pipeline import ReportPipeline

    with ReportPipeline(quick.bundle, quant="F32", max_new_tokens=MAX_TOKENS) as pipe:
        return {s: pipe.report(s, max_new_tokens=MAX_TOKENS).text for s in scans}


def audit_lines(work: str) -> list:
    with open(os.path.join(work, "audit.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for(predicate, timeout: float = 120.0, what: str = "a condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_mid_batch_then_restart_every_job_done_once_no_sr_twice(quick, scans, expected, phantom, tmp_path):
    work = str(tmp_path / "work")
    series = []
    for i in range(3):
        folder = str(tmp_path / f"series{i}")
        series.append(write_series(folder, phantom.volume, phantom.spacing, patient=PATIENT))
    pacs, dport = Pacs(), free_port()
    args = ("--parallel", "1", "--dicom-port", str(dport), "--dicom-dest", f"PACS@127.0.0.1:{pacs.port}",
            "--series-settle", "2")
    server = Server(quick.bundle, work, *args).wait_ready()
    assert httpx.get(server.url + "/readyz", timeout=10).json() == {"status": "ready"}
    for i in range(3):
        assert set(send_series(str(tmp_path / f"series{i}"), dport)) == {0x0000}
    http_ids = {server.submit(s).json()["id"]: s for s in scans}
    wait_for(lambda: server.http().get(server.url + "/healthz", timeout=10).json()["jobs"]["done"] >= 1,
             what="a job done")
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(timeout=120)
    stop_s = time.monotonic() - t0
    log = open(server.log).read()
    assert rc == 0 and "stopped: every begun job ended" in log and "Traceback" not in log, log[-3000:]
    before = audit_lines(work)
    counts = collections.Counter(r["event"] for r in before)
    # Every upload was received before its POST returned; a DICOM series still settling at SIGTERM is kept on
    # disk and received after the restart (below), so 8 to 11 receipts here.
    assert len(scans) <= counts["received"] <= 3 + len(scans) and counts["done"] < counts["received"], counts
    assert counts["started"] == counts["done"] + counts["failed"]   # nothing begun was left running
    print(f"SIGTERM: stopped in {stop_s:.2f} s with {counts['done']} done, {counts['requeued']} requeued")

    again = Server(quick.bundle, work, *args).wait_ready()
    try:
        jobs = again.wait_all(http_ids)
        assert all(j["status"] == "done" and j["report"] == expected[http_ids[i]] for i, j in jobs.items())
        dicom_ids = wait_for(lambda: len(ids := [r["job"] for r in audit_lines(work) if r["event"] == "received"
                                                 and r["who"] == "dicom:SCANNER"]) >= 3 and ids,
                             what="the three DICOM series received")
        assert len(dicom_ids) == 3
        done = again.wait_all(dicom_ids)
        assert {j["status"] for j in done.values()} == {"done"}
        assert {j["delivery"]["status"] for j in done.values()} == {"delivered"}
        received = pacs.wait(6)
        time.sleep(1.0)  # a duplicate would come now
        assert len(pacs.received) == 6 and len({ds.SOPInstanceUID for ds in pacs.received}) == 6
        assert sorted(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
                      for ds in received if ds.Modality == "SR") == sorted(series)
        trail = audit_lines(work)
        per_job = collections.Counter(r["job"] for r in trail if r["event"] in ("done", "failed"))
        assert set(per_job) == set(http_ids) | set(dicom_ids) and set(per_job.values()) == {1}
        assert collections.Counter(r["job"] for r in trail if r["event"] == "delivered") == dict.fromkeys(dicom_ids, 1)
        assert os.listdir(os.path.join(work, "inputs")) == []
        assert os.listdir(os.path.join(work, "dicom-in")) == []  # the series and their senders' names, all taken
    finally:
        again.stop()


def test_audit_trail_names_who_and_holds_no_identifiers_tokens_rotate_live(quick, scans, phantom, tmp_path):
    work = str(tmp_path / "work")
    folder = str(tmp_path / "series")
    series_uid = write_series(folder, phantom.volume, phantom.spacing, patient=PATIENT)
    first = pydicom.dcmread(os.path.join(folder, sorted(os.listdir(folder))[0]))
    tokens = tmp_path / "tokens"
    tokens.write_text("# name token\nalice alice-secret-1\nbob   bob-secret-22\n")
    pacs, dport = Pacs(), free_port()
    server = Server(quick.bundle, work, "--token-file", str(tokens), "--dicom-port", str(dport), "--dicom-dest",
                    f"PACS@127.0.0.1:{pacs.port}", "--series-settle", "1")
    server.wait_ready()
    try:
        server.token = "alice-secret-1"
        by_alice = server.submit(scans[0], name="Doe^Jane.nii.gz").json()["id"]
        server.token = "bob-secret-22"
        by_bob = server.submit(scans[1]).json()["id"]
        assert set(send_series(folder, dport)) == {0x0000}
        jobs = server.wait_all([by_alice, by_bob])
        pacs.wait(2)
        # A DICOM job's "done" line follows its "delivered" one: wait for the last line of the three jobs.
        trail = wait_for(lambda: (t := audit_lines(work)) and sum(r["event"] == "done" for r in t) == 3 and t,
                         what="the DICOM job's done line")
        dicom_job = next(r["job"] for r in trail if r["who"] == "dicom:SCANNER")
        events = collections.defaultdict(list)
        for r in trail:
            events[r["job"]].append((r["event"], r["who"]))
        assert events[by_alice] == [("received", "alice"), ("started", "alice"), ("done", "alice")]
        assert [e for e, _ in events[by_bob]] == ["received", "started", "done"] and events[by_bob][0][1] == "bob"
        assert [e for e, _ in events[dicom_job]] == ["received", "started", "delivered", "done"]
        import hashlib

        with open(scans[0], "rb") as f:
            assert next(r for r in trail if r["job"] == by_alice)["scan_sha256"] == hashlib.sha256(f.read()).hexdigest()
        done = next(r for r in trail if r["job"] == by_alice and r["event"] == "done")
        assert done["bundle"]["bundle_sha256"] and done["bundle"]["encoders"] and done["duration_s"] >= 0
        text = open(os.path.join(work, "audit.jsonl")).read()
        dicom_report = server.job(dicom_job)["report"]
        for secret in (PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["AccessionNumber"], "Doe^Jane",
                       series_uid, first.StudyInstanceUID, first.SOPInstanceUID, jobs[by_alice]["report"],
                       jobs[by_bob]["report"], dicom_report, quick.bundle, "alice-secret", "bob-secret"):
            assert secret not in text, secret

        # Rotated without a restart: alice's token revoked, carol's added; the file's change is enough.
        tokens.write_text('{"carol": "carol-secret-333", "bob": "bob-secret-22"}')
        server.token = "alice-secret-1"
        assert server.submit(scans[2]).status_code == 401
        server.token = "carol-secret-333"
        carol = server.submit(scans[2])
        assert carol.status_code == 202
        server.proc.send_signal(signal.SIGHUP)  # and SIGHUP rereads it too
        wait_for(lambda: open(server.log).read().count("token file reloaded") >= 2, 30, "the SIGHUP reload")
        server.wait_all([carol.json()["id"]])
        assert [r["who"] for r in audit_lines(work) if r["job"] == carol.json()["id"]][0] == "carol"
    finally:
        server.stop()


def test_bad_dicom_input_not_ct_a_series_that_never_ends_a_pacs_that_refuses(quick, phantom, tmp_path):
    from pydicom.uid import MRImageStorage, generate_uid

    work = str(tmp_path / "work")
    folder = str(tmp_path / "series")
    write_series(folder, phantom.volume, phantom.spacing, patient=PATIENT)
    pacs, dport = Pacs(refuse=-1), free_port()
    server = Server(quick.bundle, work, "--dicom-port", str(dport), "--dicom-dest", f"PACS@127.0.0.1:{pacs.port}",
                    "--series-settle", "1", "--series-timeout", "3", "--dicom-retries", "2", "--dicom-retry-wait",
                    "0.2").wait_ready()
    try:
        # Not CT: an MR image, and a CT image that says MR, each refused; the association carries on.
        mr = pydicom.dcmread(os.path.join(folder, sorted(os.listdir(folder))[0]))
        mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
        mr.Modality, mr.SeriesInstanceUID = "MR", generate_uid()
        liar = pydicom.dcmread(os.path.join(folder, sorted(os.listdir(folder))[1]))
        liar.Modality, liar.SeriesInstanceUID = "MR", generate_uid()
        statuses = send_series(folder, dport, extra=[mr, liar])
        assert statuses[:2] == [0x0122, 0xA900] and set(statuses[2:]) == {0x0000}

        # A series that never ends, sent while the refused delivery below goes on: an image every 0.25 s (a quarter
        # of the settle time, so that a loaded machine that delays one image does not end the series early) for
        # 4 s, longer than the timeout.
        def send_slowly() -> list:
            from pynetdicom import AE
            from pynetdicom.sop_class import CTImageStorage

            ae = AE(ae_title="SLOW")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", dport, ae_title="SAMF")
            uid, statuses = generate_uid(), []
            try:
                for name in sorted(os.listdir(folder))[:16]:
                    ds = pydicom.dcmread(os.path.join(folder, name))
                    ds.SeriesInstanceUID = uid
                    statuses.append(assoc.send_c_store(ds).Status)
                    time.sleep(0.25)
            finally:
                assoc.release()
            return statuses

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(send_slowly)

            # A PACS that refuses every C-STORE: 3 tries, then undelivered; the report and its SR stay here.
            def undelivered():
                lines = audit_lines(work) if os.path.exists(os.path.join(work, "audit.jsonl")) else []
                return next((r for r in lines if r["event"] == "undelivered"), None)
            rec = wait_for(undelivered, what="the undelivered job")
            job = server.job(rec["job"])
            assert job["status"] == "done" and job["delivery"]["status"] == "undelivered"
            assert job["delivery"]["attempts"] == 3 and "0xA700" in job["delivery"]["error"]
            sr = pydicom.dcmread(io.BytesIO(httpx.get(server.url + job["dicom"]["sr"], timeout=30).content))
            assert sr.ContentSequence[0].TextValue == job["report"]
            assert httpx.get(server.url + job["dicom"]["pdf"], timeout=30).content.startswith(b"%PDF-")
            log = open(server.log).read()
            assert log.count(f"job {rec['job']}: SR and PDF not delivered (try") == 2
            assert "not a CT image" in log and "whose Modality is 'MR'" in log
            assert slow.result(timeout=60) == [0x0000] * 16
        dropped = wait_for(lambda: [x for x in open(server.log) if "still arriving after" in x], 30, "the drop")
        assert len(dropped) == 1 and "from dicom:SLOW" in dropped[0]
        time.sleep(1.5)  # its last images form a new series that settles and fails on its own: no second drop line
        assert [x for x in open(server.log) if "still arriving after" in x] == dropped
        assert "Traceback" not in open(server.log).read()
    finally:
        server.stop()
        pacs.server.shutdown()


# ------------------------------------------------------------------------------------------ config file, no server

def _serve_configs(*args) -> tuple:
    """``samf serve ARGS`` parsed: (its params, the ServiceConfig and the PipelineConfig they make)."""
    from samf.cli.common import config_from
    from samf.cli.samf_cli import main

    params = main.get_command(None, "serve").make_context("serve", list(args)).params
    rest = dict(params)
    return params, config_from(ServiceConfig, rest), config_from(PipelineConfig, rest)


def test_config_file_every_option_and_the_command_line_wins(tmp_path):
    from samf.cli.samf_cli import main
    from samf.cli.serve_cli import config_keys

    keys = config_keys(main.get_command(None, "serve"))
    assert {"bundle", "port", "token-file", "tls-cert", "dicom-tls-ca", "audit-log", "input-dir", "stop-timeout",
            "series-timeout", "dicom-retries", "threads", "encoders", "gpu-layers"} <= set(keys)
    cfg = tmp_path / "serve.toml"
    cfg.write_text('bundle = "/srv/bundle"\nport = 9000\ninput-dir = ["/a", "/b"]\ndicom_port = 11112\n'
                   'series-settle = 2.5\nmax-tokens = 100\n')
    params, service, pipeline = _serve_configs("--config", str(cfg), "--port", "9100")
    assert params["bundle_dir"] == "/srv/bundle" and service.port == 9100 and service.input_dirs == ("/a", "/b")
    assert service.dicom_port == 11112 and service.series_settle == 2.5 and pipeline.max_new_tokens == 100
    assert service.host == ServiceConfig.host and pipeline.parallel == PipelineConfig.parallel  # not given: defaults
    shipped = os.path.join(os.path.dirname(__file__), "..", "deploy", "serve.toml")  # the example in the guide
    params, service, pipeline = _serve_configs("--config", shipped)
    assert service.dicom_allow == ("CT1", "PACS") and params["trusted_keys"] == ("/etc/samf/bundle-signer.pub",)
    assert service.port == 8443 and service.tls_key == "/etc/samf/tls/samf.key" and pipeline.parallel == 4
    import subprocess

    cfg.write_text('bundle = "/srv/bundle"\nprot = 9000\n')
    r = subprocess.run(["samf", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such option 'prot'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    cfg.write_text('port = "x"\n')
    r = subprocess.run(["samf", "serve", "--config", str(cfg), "--bundle", "b"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "'x' is not a valid integer" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_token_file_formats_and_refusals(tmp_path):
    from samf.errors import SamfError
    from samf.runtime.service.audit import Tokens, parse_tokens

    assert parse_tokens("a aaaaaaaa\n# c\n\nb bbbbbbbb", "f") == {"aaaaaaaa": "a", "bbbbbbbb": "b"}
    assert parse_tokens('{"a": "aaaaaaaa"}', "f") == {"aaaaaaaa": "a"}
    for bad, words in (("a short", "shorter than 8"), ("a aaaaaaaa b", "line 1"), ('{"a": 1}', "JSON object"),
                       ("a aaaaaaaa\nb aaaaaaaa", "share a token"), ("{nope", "not valid JSON")):
        with pytest.raises(SamfError, match=words):
            parse_tokens(bad, "f")
    path = tmp_path / "t"
    path.write_text("a aaaaaaaa\n")
    tokens = Tokens("fixed-token", str(path))
    assert tokens.who("aaaaaaaa") == "a" and tokens.who("fixed-token") == "token" and tokens.who("nope") is None
    path.write_text("a aaaaaaaa\nb short\n")      # a broken edit keeps the tokens in force
    assert tokens.who("aaaaaaaa") == "a"
    os.remove(path)                                 # the file removed: its tokens are revoked
    assert tokens.who("aaaaaaaa") is None and tokens.who("fixed-token") == "token"


def test_doctor_says_ok_or_one_line_per_blocker(quick, tmp_path):
    import socket
    import subprocess

    pacs = Pacs()
    try:
        r = subprocess.run(["samf", "doctor", "--bundle", quick.bundle, "--dicom-dest", f"PACS@127.0.0.1:{pacs.port}",
                            "--port", str(free_port()), "--work", str(tmp_path), "--json"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert checks["bundle"]["status"] == "ok" and "all hashes match" in checks["bundle"]["detail"]
        assert checks["dicom-dest"]["status"] == "ok" and "CPU backend" in checks["llama.cpp"]["detail"]
        assert {"cpu", "onnxruntime", "gpu", "memory", "disk", "HTTP port"} <= set(checks)
    finally:
        pacs.server.shutdown()
    (tmp_path / "notabundle").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = subprocess.run(["samf", "doctor", "--bundle", str(tmp_path / "notabundle"), "--port",
                            str(busy.getsockname()[1]), "--dicom-dest", f"PACS@127.0.0.1:{free_port()}"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith("error: bundle: ") and "HTTP port" in errors[1] and "C-ECHO" in errors[2]
