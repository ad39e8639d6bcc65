"""`samf serve` under load: 20 concurrent HTTP clients, latency and throughput; then the server's memory over many
jobs.

    python benchmarks/service_load.py --bundle B --out benchmarks/results/service-demo-2cpu.json [--jobs 500]
    python benchmarks/service_load.py --bundle PAPER --clients 20 --per-client 1 --jobs 0 --max-tokens 16 \
        --out benchmarks/results/service-paper-2cpu.json

The server runs as a user runs it (``samf serve``, its own process); the clients upload NIfTI phantoms (seed 5)
with httpx from threads and follow each job's event stream until it ends. Latency is the job's own record:
submitted to finished.
Memory: the server's resident set (``VmRSS`` from /proc), sampled every 0.2 s while ``--jobs`` more jobs run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    import httpx

    from samf.runtime.tools.phantom import generate_phantom_dataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--per-client", type=int, default=3, help="jobs each client submits, one after another")
    ap.add_argument("--jobs", type=int, default=500, help="jobs for the memory run (0: none)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--quant", default=None)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="samf-service-bench-")
    data = os.path.join(work, "data")
    generate_phantom_dataset(data, 20, 0, seed=5, progress=False)
    scans = sorted(os.path.join(data, "scans", n) for n in os.listdir(os.path.join(data, "scans")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["samf", "serve", "--bundle", args.bundle, "--work", os.path.join(work, "service"), "--port", str(port),
           "--max-tokens", str(args.max_tokens), "--parallel", str(args.parallel), "--max-queue", "100000"]
    if args.quant:
        cmd += ["--quant", args.quant]
    t_start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=open(os.path.join(work, "server.log"), "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(open(os.path.join(work, "server.log")).read()[-2000:])
        time.sleep(0.1)
    ready_s = time.perf_counter() - t_start

    def run_job(scan: str) -> dict:
        """Upload, then wait on the job's event stream until its ``done`` event (no polling: on two cores, twenty
        clients polling took more CPU than the server)."""
        with open(scan, "rb") as f:
            job = httpx.post(url + "/v1/reports", files={"scan": f}, timeout=600).json()["id"]
        with httpx.stream("GET", f"{url}/v1/reports/{job}/stream", timeout=600) as r:
            done = False
            for line in r.iter_lines():
                if line == "event: done":
                    done = True
                elif done and line.startswith("data: "):
                    return json.loads(line[6:])
        raise RuntimeError(f"job {job}: the stream ended without its done event")

    def client(i: int) -> list:
        return [run_job(scans[(i + k) % len(scans)]) for k in range(args.per_client)]

    res = dict(machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count()),
               command=" ".join(sys.argv), bundle=args.bundle, server_ready_s=round(ready_s, 1),
               rss_after_load_mb=round(rss_mb(server.pid), 1))
    try:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            jobs = [j for js in pool.map(client, range(args.clients)) for j in js]
        wall = time.perf_counter() - t0
        lat = sorted(j["finished"] - j["created"] for j in jobs)
        res["concurrent"] = dict(
            clients=args.clients, jobs=len(jobs), failed=sum(j["status"] != "done" for j in jobs),
            wall_s=round(wall, 2),
            jobs_per_min=round(60 * len(jobs) / wall, 1), latency_p50_s=round(statistics.median(lat), 3),
            latency_p95_s=round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
            service_s_p50=round(statistics.median(j["timings"]["total"] for j in jobs if "timings" in j), 3))
        if args.jobs:
            samples, stop = [], threading.Event()

            def sample():
                while not stop.wait(0.2):
                    samples.append((time.perf_counter(), rss_mb(server.pid)))

            threading.Thread(target=sample, daemon=True).start()
            t0 = time.perf_counter()
            done_at = []
            with cf.ThreadPoolExecutor(args.clients) as pool:
                for _ in pool.map(lambda k: (run_job(scans[k % len(scans)]), done_at.append(time.perf_counter())),
                                  range(args.jobs)):
                    pass
            stop.set()
            done_at.sort()
            first = [m for t, m in samples if t <= done_at[min(49, len(done_at) - 1)]]
            res["memory"] = dict(jobs=args.jobs, wall_s=round(time.perf_counter() - t0, 1),
                                 rss_peak_first_50_jobs_mb=round(max(first), 1) if first else None,
                                 rss_peak_mb=round(max(m for _, m in samples), 1),
                                 rss_end_mb=round(samples[-1][1], 1),
                                 rss_by_tenth_mb=[round(samples[int(k * (len(samples) - 1) / 10)][1], 1)
                                                  for k in range(11)])
        res["metrics"] = [line for line in httpx.get(url + "/metrics", timeout=10).text.splitlines()
                          if line.startswith("samf_")]
    finally:
        server.terminate()
        server.wait(timeout=60)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
