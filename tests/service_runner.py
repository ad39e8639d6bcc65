"""``samf serve`` in a subprocess, for the service tests: start, wait until it answers, submit, poll, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``samf serve`` in a subprocess; its log in ``log``."""

    def __init__(self, bundle: str, work: str, *args, host: str = "127.0.0.1", token: str | None = None,
                 verify=True, https: bool = False):
        self.port, self.work, self.token, self.verify = free_port(), work, token, verify
        self.log = os.path.join(work + ".log")
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "samf.cli.samf_cli", "serve", "--bundle", bundle, "--work", work,
               "--host", host, "--port", str(self.port), "--quant", "F32", "--max-tokens", str(MAX_TOKENS), *args]
        env = dict(os.environ, SAMF_TOKEN=token) if token else {k: v for k, v in os.environ.items()
                                                                 if k != "SAMF_TOKEN"}
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=env)
        self._http = None

    def http(self) -> httpx.Client:
        """One client for the polls (status, health), its connections kept alive: ``httpx.get`` makes a client,
        and loads the CA bundle into a TLS context (17 ms of CPU), for every request, even a plain-http one."""
        if self._http is None:
            self._http = httpx.Client(verify=self.verify)
        return self._http

    def wait_ready(self, timeout: float = 120.0) -> "Server":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {open(self.log).read()[-2000:]}")
            try:
                if self.http().get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not come up")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def submit(self, path: str, name: str | None = None, **form) -> httpx.Response:
        with open(path, "rb") as f:
            return httpx.post(self.url + "/v1/reports", files={"scan": (name or os.path.basename(path), f)},
                              data=form, headers=self.headers(), timeout=60, verify=self.verify)

    def job(self, job_id: str) -> dict:
        return self.http().get(f"{self.url}/v1/reports/{job_id}", headers=self.headers(), timeout=30).json()

    def wait_all(self, ids, timeout: float = 300.0) -> dict:
        end, jobs = time.monotonic() + timeout, {}
        while time.monotonic() < end:
            jobs = {i: self.job(i) for i in ids}
            if all(j["status"] in ("done", "failed") for j in jobs.values()):
                return jobs
            time.sleep(0.05)
        raise AssertionError(f"jobs not finished: {[j['status'] for j in jobs.values()]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # leave no server behind a failed test
                self.proc.wait()
                raise
        if self._http is not None:
            self._http.close()
            self._http = None


class Pacs:
    """A storage SCP on localhost that keeps what it is sent (``received``); ``refuse``: answer the first that
    many C-STOREs with 0xA700 (out of resources; -1: all of them); ``ssl_context``: DICOM over TLS."""

    def __init__(self, refuse: int = 0, ssl_context=None):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port, self.received, self.lock, self.refuse, self.refused = free_port(), [], threading.Lock(), refuse, 0
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)

        def on_store(event):
            with self.lock:
                if self.refuse < 0 or self.refused < self.refuse:
                    self.refused += 1
                    return 0xA700
                ds = event.dataset
                ds.file_meta = event.file_meta
                self.received.append(ds)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def wait(self, n: int, timeout: float = 120.0) -> list:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"the PACS received {len(self.received)} of {n} objects")


def send_series(folder: str | None, port: int, calling_ae: str = "SCANNER", tls=None, extra=()) -> list:
    """C-STORE ``extra`` datasets, then every image of ``folder``, on one association to SAMF at ``port``;
    the statuses. ``tls``: ``(ssl context, host name)``."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="SAMF", tls_args=tls)
    assert assoc.is_established
    try:
        out = [assoc.send_c_store(ds).Status for ds in extra]
        names = sorted(os.listdir(folder)) if folder else []
        out += [assoc.send_c_store(pydicom.dcmread(os.path.join(folder, n))).Status for n in names]
        return out
    finally:
        assoc.release()
