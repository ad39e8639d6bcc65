"""Latency and throughput of the slim runtime on a bundle, per stage, per GGUF type (``samf bench``).

Also the cost of quantization (report agreement with the first GGUF, teacher-forced loss of the reference
reports) and preprocessing of a 512×512×300 scan (a typical chest CT). Runs without torch.
"""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from samf.runtime.inference.pipeline import PipelineConfig, ReportPipeline
from samf.runtime.scan.ct import Volume
from samf.runtime.scan.preprocess import PreprocessConfig, preprocess

from ..options import option


@dataclass
class BenchConfig:
    """What ``samf bench`` measures, beyond the pipeline's own knobs (:class:`PipelineConfig`); a field made with
    :func:`~samf.runtime.options.option` is also its option."""

    scans: int = option(24, "held-out scans measured (the first of --data's test.csv, or synthetic phantoms)",
                        min=1)
    new_tokens: int | None = option(None, "decode exactly this many tokens per report, end token or not "
                                          "(random-weight bundles)", type=int, min=1)
    phantom_seed: int = 7  # the synthetic phantoms' seed, without --data


def bench_preprocess(cfg: PreprocessConfig, repeats: int = 5) -> dict:
    # drawn in float32, in place: a float64 draw and its copy took 2 s and 0.9 GB for a 315 MB volume
    hu = np.random.default_rng(0).standard_normal(size=(300, 512, 512), dtype=np.float32)
    hu *= 400.0
    hu -= 300.0
    hu[:, :40] = -1000.0
    vol = Volume(hu, (1.0, 0.7, 0.7), "synthetic-512x512x300")
    preprocess(vol, cfg)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        preprocess(vol, cfg)
        times.append(time.perf_counter() - t)
    return dict(shape=list(hu.shape), config=cfg.to_dict(), median_s=float(np.median(times)))


def rss_mb() -> dict:
    """This process's resident memory now and at its peak, in MB (Linux; empty elsewhere)."""
    out = {}
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) / 1024
    return out


def bench_quant(bundle: str, scans: list, refs: list, quant: str, threads: int | None,
                new_tokens: int | None = None, trusted_keys=(), encoders: str = PipelineConfig.encoders,
                backend: str = PipelineConfig.backend, gpu_layers: int = PipelineConfig.n_gpu_layers) -> dict:
    """One GGUF type with one encoder precision on ``scans``: a warm-up report, then one each. With
    ``new_tokens`` every report decodes exactly that many tokens (the model's end token is not honoured; random
    weights never say it) and the reference reports' loss is not measured. One report at a time: one sequence."""
    with ReportPipeline(bundle, quant=quant, n_threads=threads, trusted_keys=trusted_keys, encoders=encoders,
                        backend=backend, n_gpu_layers=gpu_layers, parallel=1,
                        max_new_tokens=max(new_tokens or 0, PipelineConfig.max_new_tokens)) as pipe:
        mem_loaded = rss_mb()
        kw = dict(max_new_tokens=new_tokens, stop_at_end=False) if new_tokens else {}
        pipe.report(scans[0], **kw)  # warm-up
        results = [pipe.report(s, **kw) for s in scans]
        nll = None if new_tokens else float(np.mean([pipe.report_nll(s, r) for s, r in zip(scans, refs)]))
    stages = list(results[0].timings)
    per = {k: dict(p50_ms=1000 * float(np.median([r.timings[k] for r in results])),
                   p90_ms=1000 * float(np.percentile([r.timings[k] for r in results], 90))) for k in stages}
    first = [sum(v for k, v in r.timings.items() if k not in ("llm_decode", "total")) for r in results]
    return dict(quant=quant, encoders=pipe.identity["encoder_precision"], encoder_engine=pipe.identity["encoders"],
                load_s=pipe.load_s, stages=per,
                reference_nll=nll,
                new_tokens=float(np.median([len(r.token_ids) for r in results])),
                prompt_tokens=int(np.median([r.prompt_tokens for r in results])),
                decode_tok_s=float(np.median([r.tokens_per_s for r in results])),
                first_token_p50_s=float(np.median(first)),
                scans_per_s=len(results) / sum(r.timings["total"] for r in results),
                rss_after_load_mb=mem_loaded.get("VmRSS"), peak_rss_mb=rss_mb().get("VmHWM"),
                texts=[r.text for r in results])


def bench_concurrency(bundle: str, scans: list, quant: str | None, threads: int | None, levels=(1, 2, 4, 8),
                      new_tokens: int | None = None, trusted_keys=(), encoders: str = PipelineConfig.encoders,
                      backend: str = PipelineConfig.backend, gpu_layers: int = PipelineConfig.n_gpu_layers) -> list:
    """``report_many`` over ``scans`` with K reports decoded together, for each K in ``levels``, each after a
    warm-up of K reports: scans per hour, per-scan latency (submitted to finished), decode tok/s (tokens of
    the batched decode steps over their time), and whether each report equals K = 1's."""
    rows, first = [], None
    for k in levels:
        with ReportPipeline(bundle, quant=quant, n_threads=threads, trusted_keys=trusted_keys, encoders=encoders,
                            backend=backend, n_gpu_layers=gpu_layers, parallel=k, repack=True,
                            max_new_tokens=max(new_tokens or 0, PipelineConfig.max_new_tokens)) as pipe:
            kw = dict(max_new_tokens=new_tokens, stop_at_end=False) if new_tokens else {}
            list(pipe.report_many(scans[:k], **kw))  # warm-up
            pipe.llm.step_stats.update(seconds=0.0, tokens=0)
            t = time.perf_counter()
            out = dict(pipe.report_many(scans, **kw))
            wall = time.perf_counter() - t
            steps = dict(pipe.llm.step_stats)
            identity = pipe.identity
        failed = [s for s, r in out.items() if isinstance(r, BaseException)]
        if failed:
            raise out[failed[0]]
        texts = {s: r.text for s, r in out.items()}
        first = first or texts
        latency = [r.timings["wall"] for r in out.values()]
        rows.append(dict(concurrency=k, quant=identity["llm"], encoders=identity["encoder_precision"],
                         scans=len(out), wall_s=wall, scans_per_hour=3600 * len(out) / wall,
                         latency_p50_s=float(np.median(latency)), latency_p90_s=float(np.percentile(latency, 90)),
                         new_tokens=sum(len(r.token_ids) for r in out.values()),
                         decode_tok_s=steps["tokens"] / steps["seconds"] if steps["seconds"] else float("nan"),
                         same_report_as_first=sum(texts[s] == first[s] for s in texts) / len(texts)))
    return rows


def format_concurrency(rows: list) -> str:
    lines = ["| K | GGUF | encoders | scans/hour | latency p50 s | latency p90 s | decode tok/s | same report as K="
             f"{rows[0]['concurrency']} |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['quant']} | {r['encoders']} | {r['scans_per_hour']:.0f} | "
                     f"{r['latency_p50_s']:.2f} | {r['latency_p90_s']:.2f} | {r['decode_tok_s']:.3g} | "
                     f"{r['same_report_as_first']:.0%} |")
    return "\n".join(lines)


def run_bench(bundle: str, data: str, n_scans: int = BenchConfig.scans, threads: int | None = PipelineConfig.n_threads,
              quants=None, new_tokens: int | None = BenchConfig.new_tokens, trusted_keys=(),
              encoders=(PipelineConfig.encoders,), backend: str = PipelineConfig.backend, concurrency=(),
              gpu_layers: int = PipelineConfig.n_gpu_layers) -> dict:
    """Benchmark ``bundle`` on the first ``n_scans`` of ``data``/test.csv, each GGUF type with each encoder
    precision; returns the results as a dict."""
    from ..bundle.bundle import read_bundle

    with open(os.path.join(data, "test.csv")) as f:
        rows = list(csv.DictReader(f))[:n_scans]
    scans, refs = [os.path.join(data, r["image"]) for r in rows], [r["caption"] for r in rows]
    # Each pipeline verifies what it loads.
    manifest = read_bundle(bundle, verify_hashes=False, trusted_keys=trusted_keys).manifest
    quants = list(quants or manifest["llm"]["files"])
    if concurrency:
        rows = bench_concurrency(bundle, scans, quants[0], threads, tuple(concurrency), new_tokens, trusted_keys,
                                 encoders[0], backend, gpu_layers)
        return dict(host=platform.node(), machine=platform.machine(), cpus=os.cpu_count(), scans=len(scans),
                    data=data, new_tokens=new_tokens, concurrency=rows)
    runs = [bench_quant(bundle, scans, refs, q, threads, new_tokens, trusted_keys, e, backend, gpu_layers)
            for q in quants for e in encoders]
    ref = runs[0]["texts"]
    for r in runs:
        r["same_report_as_first"] = sum(a == b for a, b in zip(r.pop("texts"), ref)) / len(ref)
    return dict(host=platform.node(), machine=platform.machine(), cpus=os.cpu_count(), scans=len(scans),
                data=data, new_tokens=new_tokens, runs=runs,
                preprocess_512x512x300=bench_preprocess(PreprocessConfig.from_dict(manifest["preprocess"])))


def format_bench(out: dict) -> str:
    """The results as a markdown table plus the preprocessing line."""
    if "concurrency" in out:
        return format_concurrency(out["concurrency"])
    runs = out["runs"]
    stages = list(runs[0]["stages"])
    lines = ["| GGUF | encoders | " + " | ".join(f"{s} p50 ms" for s in stages)
             + " | decode tok/s | same report | reference NLL/token |",
             "|---" * (len(stages) + 5) + "|"]
    for r in runs:
        lines.append(f"| {r['quant']} | {r['encoders']} | "
                     + " | ".join(f"{r['stages'][s]['p50_ms']:.1f}" for s in stages)
                     + f" | {r['decode_tok_s']:.3g} | {r['same_report_as_first']:.0%} | "
                     + ("-" if r["reference_nll"] is None else f"{r['reference_nll']:.4f}") + " |")
    pre = out["preprocess_512x512x300"]
    lines.append(f"\npreprocess 512x512x300 -> {3 * pre['config']['slices_per_plane']} slices at "
                 f"{pre['config']['image_size']}²: {pre['median_s'] * 1000:.0f} ms (median of 5)")
    return "\n".join(lines)
