"""CT-RATE-sized data through ``samf-train prepare``, the cache's loader, and fine-tuning at paper width with and
without the frozen-ViT embedding cache, side by side in one run.

    python benchmarks/scan_cache.py --work /tmp/cache-bench --out benchmarks/results/scan-cache-2cpu.json

Parts (each the command a user runs, in its own process):

1. ``volumes``: ``--scans`` phantoms in CT-RATE's release layout at CT-RATE's size: 512×512×300, raw unsigned
   16-bit values, spacing and rescale only in the metadata CSV (``samf-train make-phantoms --layout ctrate``'s
   code at that shape);
2. ``prepare``: ``samf-train prepare --preset paper`` with 1 worker, then with every core: scans/s and scans/s
   per core, and the disk per scan;
3. ``loader``: scans/s out of the cache's stream (``stream_examples``) with 0, 1 and 2 DataLoader workers;
4. ``finetune``: a run of the paper preset over a random-weight LLM at Phi-3-mini's width (3072, 32 heads,
   ``--layers`` layers, the real vocabulary) with a seeded random ViT-B/16 as its DINO ViT; ``samf-train embed``;
   then ``samf-train finetune --steps N`` from the cache without and with the embedding cache. Step time is the
   median of the steps after the first (metrics.jsonl's ``step_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from samf.train.run_files import DINO_FILE, METRICS_FILE, RUN_FILE

SHAPE = (300, 512, 512)        # CT-RATE's common size: 512×512 in-plane, a few hundred slices
SPACING = (1.0, 0.7, 0.7)      # mm (z, y, x): CT-RATE's typical ZSpacing and XYSpacing


def train_cli(*args) -> float:
    """Run ``samf-train ARGS`` and return its wall time in seconds."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "samf.cli.train_cli", *args], capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"samf-train {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-3:]}")
    return took


def volumes(work: str, n: int) -> str:
    from samf.train.synthetic_ctrate import write_ctrate_release

    root = os.path.join(work, "ctrate")
    if not os.path.exists(os.path.join(root, "metadata")):
        write_ctrate_release(root, n, 0, shape=SHAPE, spacing=SPACING, seed=11, progress=True)
    return root


def prepare(root: str, work: str, workers: int) -> dict:
    from samf.train.scan_cache import CACHE_FILE

    out = os.path.join(work, f"cache-{workers}w")
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    took = train_cli("prepare", "--data", root, "--out", out, "--preset", "paper", "--workers", str(workers),
                     "--quiet")
    with open(os.path.join(out, CACHE_FILE)) as f:
        record = json.load(f)
    n = record["splits"]["train"]["scans"]
    return dict(cache=out, workers=workers, scans=n, wall_s=round(took, 2), scans_per_s=round(n / took, 3),
                scans_per_s_per_core=round(n / took / workers, 3),
                bytes_per_scan=record["splits"]["train"]["bytes_per_scan"])


def loader(cache: str, samples: int) -> dict:
    from samf.train.cache_stream import stream_examples
    from samf.train.scan_cache import ScanCache

    split = ScanCache(cache).split("train")
    out = {}
    for workers in (0, 1, 2):
        it = stream_examples(split, seed=0, rank=0, world=1, workers=workers, buffer=16)
        next(it)  # workers started, first read done
        t = time.perf_counter()
        for _ in range(samples):
            next(it)
        out[workers] = round(samples / (time.perf_counter() - t), 1)
        it.close()
    return out


def finetune(work: str, cache: str, layers: int, steps: int) -> dict:
    import torch

    from samf.train.embed_cache import CachedEmbeddings, other_embeddings
    from samf.train.models import VisionTransformer
    from samf.train.run_folder import read_run
    from samf.train.scan_cache import ScanCache
    from samf.train.synthetic_llm import write_phi3_folder
    from samf.train.vlm import ImageConfig

    llm = os.path.join(work, f"phi3-width-{layers}layers")
    if not os.path.exists(os.path.join(llm, "config.json")):
        write_phi3_folder(llm, hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
                          num_attention_heads=32, dtype="bfloat16")
    run = os.path.join(work, "run")
    if not os.path.exists(os.path.join(run, RUN_FILE)):
        train_cli("init", "--run", run, "--preset", "paper", "--llm-path", llm)
    if not os.path.exists(os.path.join(run, DINO_FILE)):
        torch.manual_seed(0)
        vit = VisionTransformer(ImageConfig.from_dict(read_run(run)["image"]).vit)
        torch.save(vit.state_dict(), os.path.join(run, DINO_FILE))
    embed_s = train_cli("embed", "--run", run, "--cache", cache, "--quiet")
    scans = ScanCache(cache)
    (key,) = other_embeddings(scans)
    emb = CachedEmbeddings(scans, key).record
    res = dict(layers=layers, steps=steps, batch_size=4, embed_wall_s=round(embed_s, 1),
               embedding_bytes_per_scan=emb["splits"]["train"]["bytes_per_scan"])
    metrics = os.path.join(run, METRICS_FILE)
    for name, flag in (("vit_runs", "--no-embedding-cache"), ("embedding_cache", "--embedding-cache")):
        if os.path.exists(metrics):
            os.remove(metrics)
        wall = train_cli("finetune", "--data", cache, "--run", run, "--steps", str(steps), flag, "--restart",
                         "--quiet")
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if '"finetune"' in line]
        times = [r["step_s"] for r in rows]
        res[name] = dict(wall_s=round(wall, 1), step_s=times, median_step_s=round(statistics.median(times[1:]), 2),
                         losses=[round(r["loss"], 4) for r in rows])
    res["speedup"] = round(res["vit_runs"]["median_step_s"] / res["embedding_cache"]["median_step_s"], 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the volumes, caches and the run")
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--scans", type=int, default=8, help="CT-RATE-sized volumes to write and prepare")
    ap.add_argument("--layers", type=int, default=2, help="LLM layers at Phi-3-mini's width")
    ap.add_argument("--steps", type=int, default=4, help="fine-tuning steps per variant")
    ap.add_argument("--loader-samples", type=int, default=32)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    cores = os.cpu_count() or 1
    res = dict(machine=dict(cpu=platform.processor() or platform.machine(), cores=cores),
               command=" ".join(sys.argv), shape=SHAPE, spacing=SPACING)
    root = volumes(args.work, args.scans)
    res["prepare"] = [prepare(root, args.work, 1), prepare(root, args.work, cores)]
    cache = res["prepare"][-1]["cache"]
    res["loader_scans_per_s"] = loader(cache, args.loader_samples)
    res["finetune"] = finetune(args.work, cache, args.layers, args.steps)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
