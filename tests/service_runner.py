"""``samf serve`` in a subprocess, for the service tests: start, wait until it answers, submit, poll, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``samf serve`` in a subprocess; its log in ``log``."""

    def __init__(self, bundle: str, work: str, *args, host: str = "127.0.0.1", token: str | None = None):
        self.port, self.work, self.token = free_port(), work, token
        self.log = os.path.join(work + ".log")
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "samf.cli.samf_cli", "serve", "--bundle", bundle, "--work", work,
               "--host", host, "--port", str(self.port), "--quant", "F32", "--max-tokens", str(MAX_TOKENS), *args]
        env = dict(os.environ, SAMF_TOKEN=token) if token else {k: v for k, v in os.environ.items()
                                                                 if k != "SAMF_TOKEN"}
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> "Server":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {open(self.log).read()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
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
                              data=form, headers=self.headers(), timeout=60)

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.url}/v1/reports/{job_id}", headers=self.headers(), timeout=30).json()

    def wait_all(self, ids, timeout: float = 300.0) -> dict:
        end, jobs = time.monotonic() + timeout, {}
        while time.monotonic() < end:
            jobs = {i: self.job(i) for i in ids}
            if all(j["status"] in ("done", "failed") for j in jobs.values()):
                return jobs
            time.sleep(0.05)
        raise AssertionError(f"jobs not finished: {[j['status'] for j in jobs.values()]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
