"""Latency and throughput of the slim runtime on a bundle, per stage, per GGUF type.

    python benchmarks/bench_runtime.py --bundle samf-demo/bundle --data samf-demo/data [--scans 24]

Prints a markdown table and writes benchmarks/results/runtime-<host>.json. Also measures preprocessing
of a 512×512×300 scan (the size of a typical chest CT). Runs without torch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time

import numpy as np

from samf.runtime.ct import Volume
from samf.runtime.pipeline import ReportPipeline
from samf.runtime.preprocess import PreprocessConfig, preprocess


def bench_preprocess(cfg: PreprocessConfig, repeats: int = 5) -> dict:
    rng = np.random.default_rng(0)
    hu = rng.normal(-300, 400, size=(300, 512, 512)).astype(np.float32)
    hu[:, :40] = -1000.0
    vol = Volume(hu, (1.0, 0.7, 0.7), "synthetic-512x512x300")
    preprocess(vol, cfg)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        preprocess(vol, cfg)
        times.append(time.perf_counter() - t)
    return dict(shape=list(hu.shape), config=cfg.to_dict(), median_s=float(np.median(times)))


def bench_quant(bundle: str, scans: list, refs: list, quant: str, threads: int | None) -> dict:
    pipe = ReportPipeline(bundle, quant=quant, n_threads=threads)
    pipe.report(scans[0])  # warm-up
    results = [pipe.report(s) for s in scans]
    nll = float(np.mean([pipe.report_nll(s, r) for s, r in zip(scans, refs)]))
    pipe.close()
    stages = list(results[0].timings)
    per = {k: dict(p50_ms=1000 * float(np.median([r.timings[k] for r in results])),
                   p90_ms=1000 * float(np.percentile([r.timings[k] for r in results], 90))) for k in stages}
    return dict(quant=quant, load_s=pipe.load_s, stages=per, reference_nll=nll,
                decode_tok_s=float(np.median([r.tokens_per_s for r in results])),
                scans_per_s=len(results) / sum(r.timings["total"] for r in results),
                texts=[r.text for r in results])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, help="dataset folder with test.csv")
    ap.add_argument("--scans", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quant", action="append", default=None)
    args = ap.parse_args()
    with open(os.path.join(args.data, "test.csv")) as f:
        rows = list(csv.DictReader(f))[: args.scans]
    scans = [os.path.join(args.data, r["image"]) for r in rows]
    refs = [r["caption"] for r in rows]
    from samf.runtime.bundle import read_bundle

    b = read_bundle(args.bundle)
    quants = args.quant or list(b.manifest["llm"]["files"])
    runs = [bench_quant(args.bundle, scans, refs, q, args.threads) for q in quants]
    ref = runs[0]["texts"]
    for r in runs:
        r["same_report_as_" + runs[0]["quant"]] = sum(a == b for a, b in zip(r["texts"], ref)) / len(ref)
    pre = bench_preprocess(PreprocessConfig())
    out = dict(host=platform.node(), machine=platform.machine(), cpus=os.cpu_count(), scans=len(scans),
               runs=[{k: v for k, v in r.items() if k != "texts"} for r in runs], preprocess_512x512x300=pre)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", f"runtime-{os.cpu_count()}cpu.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    stages = list(runs[0]["stages"])
    print("| GGUF | " + " | ".join(f"{s} p50 ms" for s in stages)
          + " | decode tok/s | same report | reference NLL/token |")
    print("|---" * (len(stages) + 4) + "|")
    for r in runs:
        same = r["same_report_as_" + runs[0]["quant"]]
        print(f"| {r['quant']} | " + " | ".join(f"{r['stages'][s]['p50_ms']:.1f}" for s in stages)
              + f" | {r['decode_tok_s']:.0f} | {same:.0%} | {r['reference_nll']:.4f} |")
    print(f"\npreprocess 512x512x300 -> {3 * pre['config']['slices_per_plane']} slices at "
          f"{pre['config']['image_size']}²: {pre['median_s'] * 1000:.0f} ms (median of 5)")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
