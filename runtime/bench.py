"""Latency and throughput of the slim runtime on a bundle, per stage, per GGUF type (``samf bench``).

Also the cost of quantization (report agreement with the first GGUF, teacher-forced loss of the reference
reports) and preprocessing of a 512×512×300 scan (a typical chest CT). Runs without torch.
"""

from __future__ import annotations

import csv
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


def run_bench(bundle: str, data: str, n_scans: int = 24, threads: int | None = None, quants=None) -> dict:
    """Benchmark ``bundle`` on the first ``n_scans`` of ``data``/test.csv; returns the results as a dict."""
    from .bundle import read_bundle

    with open(os.path.join(data, "test.csv")) as f:
        rows = list(csv.DictReader(f))[:n_scans]
    scans = [os.path.join(data, r["image"]) for r in rows]
    refs = [r["caption"] for r in rows]
    quants = list(quants or read_bundle(bundle).manifest["llm"]["files"])
    runs = [bench_quant(bundle, scans, refs, q, threads) for q in quants]
    ref = runs[0]["texts"]
    for r in runs:
        r["same_report_as_first"] = sum(a == b for a, b in zip(r.pop("texts"), ref)) / len(ref)
    return dict(host=platform.node(), machine=platform.machine(), cpus=os.cpu_count(), scans=len(scans),
                runs=runs, preprocess_512x512x300=bench_preprocess(PreprocessConfig()))


def format_bench(out: dict) -> str:
    """The results as a markdown table plus the preprocessing line."""
    runs = out["runs"]
    stages = list(runs[0]["stages"])
    lines = ["| GGUF | " + " | ".join(f"{s} p50 ms" for s in stages)
             + " | decode tok/s | same report | reference NLL/token |",
             "|---" * (len(stages) + 4) + "|"]
    for r in runs:
        lines.append(f"| {r['quant']} | " + " | ".join(f"{r['stages'][s]['p50_ms']:.1f}" for s in stages)
                     + f" | {r['decode_tok_s']:.0f} | {r['same_report_as_first']:.0%} | {r['reference_nll']:.4f} |")
    pre = out["preprocess_512x512x300"]
    lines.append(f"\npreprocess 512x512x300 -> {3 * pre['config']['slices_per_plane']} slices at "
                 f"{pre['config']['image_size']}²: {pre['median_s'] * 1000:.0f} ms (median of 5)")
    return "\n".join(lines)
