"""Many scans on one load, side by side in one run: a worklist as separate `samf report` processes against one
batch run, `samf bench --concurrency`, and decode speed with another busy program on the machine.

    python benchmarks/batch_throughput.py --bundle samf-demo/bundle --data samf-demo/data --scans 24 \
        --out benchmarks/results/batch-demo-2cpu.json
    python benchmarks/batch_throughput.py --bundle PAPER --scans 8 --new-tokens 32 --quant Q4_K_M --skip-separate \
        --out benchmarks/results/batch-paper-2cpu.json

Parts (each a subprocess running the commands a user runs):

- ``separate``: ``samf report SCAN --bundle B`` once per scan (each loads and verifies the bundle);
- ``batch``: ``samf report SCAN... --bundle B --out DIR`` once, and whether its reports equal the separate ones;
- ``concurrency``: ``samf bench --concurrency K`` for K = 1, 2, 4, 8 (scans/hour, latency, decode tok/s);
- ``busy``: ``samf bench --concurrency 1`` with a busy-looping process started beside it, once with the
  default threads (which follow the cores left free) and once with ``--threads`` fixed at every core (the
  old behaviour), against the idle figure.

Without ``--data``, synthetic phantoms (seed 7) are written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def samf(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", "import sys; from samf.cli.samf_cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"samf {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc


def bench_json(bundle, data, scans, extra, out) -> dict:
    samf("bench", "--bundle", bundle, "--data", data, "--scans", str(scans), "--out", out, *extra)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", help="dataset folder with test.csv (default: synthetic phantoms)")
    ap.add_argument("--scans", type=int, default=24)
    ap.add_argument("--quant", default=None)
    ap.add_argument("--new-tokens", type=int, default=None, help="decode exactly this many tokens (random weights)")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--skip-separate", action="store_true", help="no separate-process runs (slow at paper size)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="batch-bench-")
    data = args.data
    if data is None:
        from samf.runtime.tools.phantom import generate_phantom_dataset

        data = os.path.join(work, "data")
        generate_phantom_dataset(data, 0, args.scans, seed=7, progress=False)
    import csv

    with open(os.path.join(data, "test.csv")) as f:
        scans = [os.path.join(data, r["image"]) for r in csv.DictReader(f)][: args.scans]
    common = ["--bundle", args.bundle] + (["--quant", args.quant] if args.quant else [])
    tokens = ["--max-tokens", str(args.new_tokens)] if args.new_tokens else []
    result = dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]), date=time.strftime("%Y-%m-%d"),
                  cpus=os.cpu_count(), bundle=args.bundle, scans=len(scans))

    if not args.skip_separate:
        t = time.perf_counter()
        separate = [json.loads(samf("report", s, *common, *tokens, "--json").stdout)["report"] for s in scans]
        result["separate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        samf("report", *scans, *common, *tokens, "--out", os.path.join(work, "out"))
        result["batch_s"] = time.perf_counter() - t
        with open(os.path.join(work, "out", "reports.jsonl")) as f:
            batch = [json.loads(line)["report"] for line in f]
        result["batch_same_as_separate"] = sum(a == b for a, b in zip(separate, batch))
        result["batch_speedup"] = result["separate_s"] / result["batch_s"]
        print(json.dumps({k: result[k] for k in ("separate_s", "batch_s", "batch_speedup",
                                                  "batch_same_as_separate")}), flush=True)

    new = ["--new-tokens", str(args.new_tokens)] if args.new_tokens else []
    quant = ["--quant", args.quant] if args.quant else []
    levels = [x for k in args.levels.split(",") for x in ("--concurrency", k)]
    result["concurrency"] = bench_json(args.bundle, data, len(scans), [*quant, *new, *levels],
                                       os.path.join(work, "conc.json"))["concurrency"]
    for r in result["concurrency"]:
        print(json.dumps(r), flush=True)

    busy = dict(idle=bench_json(args.bundle, data, len(scans), [*quant, *new, "--concurrency", "1"],
                                os.path.join(work, "idle.json"))["concurrency"][0])
    for label, extra in (("busy, default threads", []), ("busy, --threads all cores", ["--threads",
                                                                                       str(os.cpu_count())])):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            busy[label] = bench_json(args.bundle, data, len(scans), [*quant, *new, "--concurrency", "1", *extra],
                                     os.path.join(work, "busy.json"))["concurrency"][0]
        finally:
            spinner.kill()
            spinner.wait()
    result["busy"] = busy
    for label, r in busy.items():
        print(json.dumps(dict(case=label, decode_tok_s=r["decode_tok_s"], scans_per_hour=r["scans_per_hour"])),
              flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
