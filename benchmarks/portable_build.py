"""Decode tok/s of llama.cpp builds side by side: the portable build (every x86-64 CPU variant, chosen at load
time; CMakeLists.txt) against a native one (-march=native), on the same GGUFs, in one run (issue 29).

    python benchmarks/portable_build.py --lib portable=/path/llama_cpp/lib --lib native=/path/lib \\
        --gguf demo=samf-demo/bundle/llm-Q8_0.gguf --paper-layers 2 --work /tmp/portable-bench \\
        --out benchmarks/results/portable-build-2cpu.json

Each build is a llama_cpp/lib folder (libllama.so and its ggml libraries), loaded by llama-cpp-python through
``LLAMA_CPP_LIB_PATH`` in a process of its own; samf's engine registers a portable build's CPU variant
(:func:`samf.engines.llama_cpp_engine._load_backends`). Per GGUF and build: the prompt (head, image rows, tail
as a report's) is decoded, then exactly ``--new-tokens`` greedy tokens (no stop token); decode tok/s is new
tokens over decode seconds (wall), the fastest of ``--repeats`` in the process (a neighbour's burst slows one, and
with several threads one stalled thread stalls all: ``CoreShare``'s docstring). The builds alternate,
``--rounds`` times, so a neighbour's load falls on both; the median is reported. ``--paper-layers N`` adds a
Phi-3-mini-width synthetic bundle of N layers (``samf-export synthetic-bundle --preset paper``), made once in
``--work``.

On a shared machine wall time measures the neighbours as much as the build; with ``--threads 1`` the decode's
own CPU time is reported too (new tokens over the process's CPU seconds of a report of ``--new-tokens`` less
those of a report of one token), which a neighbour's time slices do not enter (its share of the caches and of
memory bandwidth still does).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROBE = """
import json, sys, time
import numpy as np
from samf.engines.llama_cpp_engine import LlamaCppLLM, loaded_cpu_variant
path, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = LlamaCppLLM(path, n_ctx=64 + 32 + new_tokens, n_threads=threads)
rng = np.random.default_rng(0)
rows = rng.standard_normal((32, llm.n_embd)).astype(np.float32) * 0.02
tail = llm.tokenize("Write the radiology report for this chest CT scan.")
def cpu(n):  # this process's CPU seconds for a report of n new tokens, and the report
    t = time.process_time()
    o = llm.generate([1], rows, tail, stop=set(), max_new_tokens=n)
    return time.process_time() - t, o
outs, cpu_tok_s = [], []
for _ in range(int(sys.argv[4])):
    (c1, _), (cn, o) = cpu(1), cpu(new_tokens)
    outs.append(o)
    cpu_tok_s.append((new_tokens - 1) / max(cn - c1, 1e-9))
out = min(outs, key=lambda o: o["decode_s"])  # the least disturbed of the repeats: the machine is shared
print(json.dumps(dict(variant=loaded_cpu_variant(), new_tokens=out["new_tokens"], decode_s=out["decode_s"],
                      prefill_s=out["prefill_s"], tok_s=out["new_tokens"] / out["decode_s"], ids=out["ids"][:16],
                      all_tok_s=[o["new_tokens"] / o["decode_s"] for o in outs], cpu_tok_s=max(cpu_tok_s),
                      all_cpu_tok_s=cpu_tok_s)))
"""


def run_one(lib: str, gguf: str, new_tokens: int, threads: int, repeats: int = 1) -> dict:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": os.path.abspath(lib)}
    out = subprocess.run([sys.executable, "-c", PROBE, gguf, str(new_tokens), str(threads), str(repeats)],
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"error: {lib} on {gguf}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def paper_gguf(work: str, layers: int) -> str:
    bundle = os.path.join(work, f"paper-{layers}layers")
    if not os.path.exists(os.path.join(bundle, "manifest.json")):
        subprocess.run(["samf-export", "synthetic-bundle", "--preset", "paper", "--layers", str(layers),
                        "--quant", "Q4_K_M", "--quant", "Q8_0", "--precision", "none", "--out", bundle],
                       check=True)
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", action="append", required=True, help="NAME=FOLDER, a llama_cpp/lib; repeatable")
    ap.add_argument("--gguf", action="append", default=[], help="NAME=FILE.gguf; repeatable")
    ap.add_argument("--paper-layers", type=int, default=0, help="add a paper-width synthetic bundle of N layers")
    ap.add_argument("--work", default="/tmp/portable-bench")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="reports per process; the fastest counts")
    ap.add_argument("--out", default=None, help="JSON of every run")
    a = ap.parse_args()
    libs = dict(x.split("=", 1) for x in a.lib)
    ggufs = dict(x.split("=", 1) for x in a.gguf)
    if a.paper_layers:
        bundle = paper_gguf(a.work, a.paper_layers)
        for f in sorted(glob.glob(os.path.join(bundle, "llm-Q*.gguf"))):
            ggufs[f"paper-{a.paper_layers}L {os.path.basename(f)[4:-5]}"] = f
    runs = {g: {b: [] for b in libs} for g in ggufs}
    load = os.getloadavg()
    for g, path in ggufs.items():
        for b, lib in libs.items():  # a warm-up each: the file in the page cache, the first load's costs paid
            run_one(lib, path, 8, a.threads)
        for r in range(a.rounds):
            order = list(libs) if r % 2 == 0 else list(libs)[::-1]
            for b in order:
                runs[g][b].append(run_one(libs[b], path, a.new_tokens, a.threads, a.repeats))
    names = list(libs)
    by_cpu = a.threads == 1  # with more threads, CPU time counts their spinning at each barrier too
    pair = " / ".join(names[:2])
    header = ("| GGUF | " + " | ".join(f"{b} (variant)" for b in names) + f" | {pair} wall | "
              + ("".join(f"{b} per CPU s | " for b in names) + f"{pair} CPU | " if by_cpu else "") + "same tokens |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    summary = {}
    for g in ggufs:
        med = {b: statistics.median(x["tok_s"] for x in runs[g][b]) for b in names}
        per_cpu = {b: statistics.median(x["cpu_tok_s"] for x in runs[g][b]) for b in names}
        same = all(x["ids"] == runs[g][names[0]][0]["ids"] for b in names for x in runs[g][b])
        summary[g] = dict(median_tok_s=med, median_tok_per_cpu_s=per_cpu, same_tokens=same,
                          variants={b: runs[g][b][0]["variant"] for b in names})
        def ratio(d):
            return (f"{d[names[0]] / d[names[1]]:.3f}" if len(names) > 1 else "-")
        lines.append(f"| {g} | " + " | ".join(f"{med[b]:.1f} ({runs[g][b][0]['variant'] or 'linked'})" for b in names)
                     + f" | {ratio(med)} | "
                     + ("".join(f"{per_cpu[b]:.1f} | " for b in names) + f"{ratio(per_cpu)} | " if by_cpu else "")
                     + f"{'yes' if same else 'no'} |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), host=platform.node(), cpus=os.cpu_count(),
                           load_before=load, load_after=os.getloadavg(), threads=a.threads, repeats=a.repeats,
                           new_tokens=a.new_tokens, rounds=a.rounds, libs=libs, ggufs=ggufs,
                           summary=summary, runs=runs), f, indent=1)


if __name__ == "__main__":
    main()
