"""The stack at its real size on this machine: Phi-3-mini's shape (random weights), ViT-B/16 at 224².

    python benchmarks/paper_scale.py --work /tmp/paper-scale --out benchmarks/results/paper-scale-2cpu.json

Steps, each in its own process, timed, with its peak memory (``ru_maxrss`` of the process, exact; and the
anonymous and file-backed parts of its resident set, sampled every 50 ms from /proc; this driver imports
nothing large, since a child's ``ru_maxrss`` starts at its parent's size):

1. memory bandwidth (read, all cores), for the decode roofline;
2. a random-weight merged checkpoint of the paper preset (bf16 LLM, written a tensor at a time);
3. ``samf-export bundle`` on it: ONNX + F16 GGUF + Q8_0 + Q4_K_M, each validated, and the encoder variants
   ``--encoders`` names besides fp32 (bf16: the fp32 files on OpenVINO), each written only if it holds the
   export's tolerance (checked on ``--check-scans`` held-out phantoms; embeddings only unless ``--check-tokens``);
4. ``samf bench`` per GGUF type on phantoms with the fp32 encoders (ONNX Runtime), exactly ``--new-tokens``
   tokens per report; then the last GGUF type with each other encoder variant the bundle carries (a variant the
   export refused is recorded with the export's reason, not measured);
5. the same phantom through the PyTorch pipeline (``SamfVLM.generate``, transformers eager, the checkpoint's
   bf16), the same prompt and number of new tokens;
6. ``samf report --max-tokens 1`` from process start (time to first token), 3 runs per encoder variant, and
   bundle verification alone.

Steps whose output exists are not redone (``--redo`` forces them). Nothing here downloads anything. OpenVINO
(bf16) only ever loads in ``samf-export`` (after its torch work, as the export does for ``--precision bf16``) and
in torch-free runtime processes (``samf bench``, ``samf report``), never in the PyTorch pipeline's process: a
process holding both torch and OpenVINO was seen to crash at a later vfork.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

from samf.train.run_files import MODULES_CONFIG, PREPROCESS_FILE  # no imports: the driver stays small

GB = 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------ measuring

def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def measured(cmd: list, log: str | None = None) -> dict:
    """Run ``cmd``; wall time, exit code, exact peak RSS (``ru_maxrss``) and sampled peak anon/file RSS, the
    process's CPU time (user + system) and the machine's 1-minute load average before and after: on a shared
    machine, CPU time well under wall time times the threads, or a load above the cores, says others competed."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    peaks = dict(RssAnon=0, RssFile=0, VmRSS=0)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    res = dict(cmd=" ".join(cmd), wall_s=round(time.perf_counter() - t0, 2), rc=proc.returncode,
               peak_rss_gb=round(usage.ru_maxrss * 1024 / GB, 3), peak_anon_gb=round(peaks["RssAnon"] / GB, 3),
               peak_file_gb=round(peaks["RssFile"] / GB, 3), cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
               load_before=round(load0, 2), load_after=round(os.getloadavg()[0], 2))
    print(json.dumps(res), flush=True)
    if proc.returncode != 0:
        tail = open(log).read()[-3000:] if log else ""
        raise SystemExit(f"failed: {' '.join(cmd)}\n{tail}")
    return res


def bandwidth(gib: float = 2.0, repeats: int = 5) -> dict:
    """Read bandwidth: a float32 sum over ``gib`` GiB with all of torch's threads (what decode does: stream
    the weights once per token), best of ``repeats``; and numpy's one-thread copy for reference."""
    import numpy as np
    import torch

    x = torch.ones(int(gib * GB) // 4, dtype=torch.float32)
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    a = np.ones(int(gib * GB) // 8, dtype=np.float32)
    b = np.empty_like(a)
    copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return dict(read_gb_s=round(gib * GB / best / 1e9, 2), threads=torch.get_num_threads(),
                copy_1thread_gb_s=round(2 * a.nbytes / copy / 1e9, 2), buffer_gib=gib)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------------- the PyTorch pipeline

def torch_pipeline(ckpt: str, new_tokens: int, out: str) -> None:
    """One phantom (the first ``samf bench`` uses) through ``SamfVLM.generate``; stage timings to ``out``."""
    import tempfile

    import torch

    from samf.runtime.inference.prompt import REPORT_REQUESTS
    from samf.runtime.scan.ct import load_scan
    from samf.runtime.scan.preprocess import PreprocessConfig, preprocess
    from samf.runtime.tools.phantom import generate_phantom_dataset
    from samf.train.llm_folder import LLMTokenizer
    from samf.train.vlm import SamfVLM, prompt_ids

    t = {}
    t0 = time.perf_counter()
    vlm = SamfVLM.from_checkpoint(ckpt)
    tok = LLMTokenizer(ckpt)
    t["model_load"] = time.perf_counter() - t0
    with open(os.path.join(ckpt, PREPROCESS_FILE)) as f:
        pre = PreprocessConfig.from_dict(json.load(f))
    with tempfile.TemporaryDirectory() as tmp:
        generate_phantom_dataset(tmp, 0, 1, seed=7, progress=False)  # samf bench's first phantom
        scan = os.path.join(tmp, "scans", os.listdir(os.path.join(tmp, "scans"))[0])
        t0 = time.perf_counter()
        vol = load_scan(scan)
        t["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    slices = torch.from_numpy(preprocess(vol, pre))
    t["preprocess"] = time.perf_counter() - t0
    prompt = prompt_ids(tok, REPORT_REQUESTS[0])
    vlm.generate(slices, prompt, 2, stop_at_end=False)  # warm-up
    stages: dict = {}
    ids = vlm.generate(slices, prompt, new_tokens, stop_at_end=False, timings=stages)
    t.update(stages)
    t["total"] = sum(v for k, v in t.items() if k != "model_load")
    res = dict(timings_s=t, new_tokens=len(ids), decode_tok_s=(len(ids) - 1) / stages["decode"],
               llm_dtype=str(next(vlm.llm.parameters()).dtype), torch_threads=torch.get_num_threads(),
               first_token_s=t["load"] + t["preprocess"] + stages["encoder"] + stages["fusion"] + stages["prefill"])
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


def verify_time(bundle: str, quant: str, out: str) -> None:
    """How long a start spends on bundle verification (the cache as it is)."""
    t0 = time.perf_counter()
    from samf.runtime.bundle.bundle import read_bundle

    read_bundle(bundle, quant=quant)
    with open(out, "w") as f:
        json.dump(dict(verify_s=time.perf_counter() - t0), f)


# ------------------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder for the checkpoint and bundle (about 22 GB at 32 layers)")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--quant", action="append", default=None, help="GGUF types (default F16, Q8_0, Q4_K_M)")
    ap.add_argument("--encoders", action="append", default=None, choices=["fp32", "bf16", "int8", "fp16"],
                    help="encoder variants measured side by side, fp32 (ONNX Runtime) first (default fp32, bf16); "
                         "each besides fp32 is asked of the export, which writes it only if it holds its tolerance")
    ap.add_argument("--check-scans", type=int, default=20, help="held-out phantoms the export checks variants on")
    ap.add_argument("--check-tokens", type=int, default=0,
                    help="greedy report tokens the export compares per check scan (0: embeddings only; random "
                         "weights' reports mean nothing, and 20 x 256 tokens on the F16 GGUF take half an hour)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="then this many more runs of the last GGUF type's bench (each encoder variant) and the "
                         "PyTorch pipeline, one after the other, each pair's ratio recorded; a rerun adds more "
                         "(on a shared machine only ratios taken side by side count)")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--step", choices=["torch-pipeline", "verify-time", "bandwidth"], help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step == "torch-pipeline":
        return torch_pipeline(a.args[0], a.new_tokens, a.out)
    if a.step == "verify-time":
        return verify_time(a.args[0], a.args[1], a.out)
    if a.step == "bandwidth":
        with open(a.out, "w") as f:
            return json.dump(bandwidth(), f)

    quants = a.quant or ["F16", "Q8_0", "Q4_K_M"]
    encoders = list(dict.fromkeys(["fp32"] + (a.encoders or ["bf16"])))
    os.makedirs(a.work, exist_ok=True)
    ckpt, bundle = os.path.join(a.work, "checkpoint"), os.path.join(a.work, "bundle")
    res = json.load(open(a.out)) if os.path.exists(a.out) and not a.redo else {}
    res.update(host=platform.node(), cpus=os.cpu_count(), python=platform.python_version(), layers=a.layers,
               new_tokens=a.new_tokens, date=time.strftime("%Y-%m-%d"), commit=subprocess.run(
                   ["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    res.setdefault("passes", []).append(dict(commit=res["commit"], started=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime()),
                                             argv=sys.argv[1:]))  # a rerun adds to the same results
    me = [sys.executable, os.path.abspath(__file__)]

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)

    if "bandwidth" not in res:  # in a process of its own: this one must stay small, as a child's ru_maxrss
        j = os.path.join(a.work, "bandwidth.json")  # starts from its parent's peak (vfork then exec)
        measured(me + ["--work", a.work, "--out", j, "--step", "bandwidth"])
        res["bandwidth"] = json.load(open(j))
        save()
    if a.redo or not os.path.exists(os.path.join(ckpt, MODULES_CONFIG)):
        res["checkpoint"] = measured([sys.executable, "-c", "import sys; from samf.export.synthetic import "
                                      "write_synthetic_checkpoint as w; w(sys.argv[1], 'paper', int(sys.argv[2]))",
                                      ckpt, str(a.layers)], os.path.join(a.work, "checkpoint.log"))
        save()
    if a.redo or not os.path.exists(os.path.join(bundle, "manifest.json")):
        cmd = ["samf-export", "bundle", ckpt, "--out", bundle, "--base", quants[0]]
        cmd += [x for q in quants[1:] for x in ("--quant", q)]
        cmd += [x for e in encoders[1:] for x in ("--precision", e)] or ["--precision", "none"]
        cmd += ["--check-scans", str(a.check_scans), "--check-tokens", str(a.check_tokens)]
        res["export"] = measured(cmd, os.path.join(a.work, "export.log"))
        res["bundle_files_mb"] = {n: round(m["size"] / 1e6, 1) for n, m in
                                  json.load(open(os.path.join(bundle, "manifest.json")))["files"].items()}
        save()
    manifest = json.load(open(os.path.join(bundle, "manifest.json")))
    res["encoder_variants"] = dict(  # what the export kept (with its check's figures) and what it refused, and why
        kept={p: dict(figures=e.get("figures"), tolerance=e.get("tolerance"), backend=e.get("backend", "onnxruntime"))
              for p, e in manifest["encoders"].items()},
        rejected=manifest.get("fidelity", {}).get("encoders_rejected", {}))
    have = [e for e in encoders if e in manifest["encoders"]]
    for q in quants:
        key = f"runtime_{q}"
        if key not in res or a.redo:
            j = os.path.join(a.work, f"bench-{q}.json")
            res[key] = measured(["samf", "bench", "--bundle", bundle, "--quant", q, "--scans", str(a.scans),
                                 "--new-tokens", str(a.new_tokens), "--encoders", "fp32", "--out", j],
                                os.path.join(a.work, f"bench-{q}.log"))
            res[key]["bench"] = json.load(open(j))
            save()
    for e in encoders[1:]:  # the last GGUF type with each other encoder variant, each in a torch-free process
        key = f"runtime_{quants[-1]}_{e}"
        if e not in have:
            res[key] = dict(not_in_bundle=res["encoder_variants"]["rejected"].get(e, {}).get(
                "reason", "the export did not make it (OpenVINO not installed?)"))
            save()
        elif key not in res or "not_in_bundle" in res[key] or a.redo:
            j = os.path.join(a.work, f"bench-{quants[-1]}-{e}.json")
            res[key] = measured(["samf", "bench", "--bundle", bundle, "--quant", quants[-1], "--scans", str(a.scans),
                                 "--new-tokens", str(a.new_tokens), "--encoders", e, "--out", j],
                                os.path.join(a.work, f"bench-{quants[-1]}-{e}.log"))
            res[key]["bench"] = json.load(open(j))
            save()
    q1 = f"runtime_{quants[-1]}_1thread"  # decode scaling with cores: compute-bound or memory-bound
    if q1 not in res or a.redo:
        j = os.path.join(a.work, "bench-1thread.json")
        res[q1] = measured(["samf", "bench", "--bundle", bundle, "--quant", quants[-1], "--scans", "1", "--threads",
                            "1", "--new-tokens", str(a.new_tokens), "--encoders", "fp32", "--out", j],
                           os.path.join(a.work, "bench-1t.log"))
        res[q1]["bench"] = json.load(open(j))
        save()
    if "torch_pipeline" not in res or a.redo:
        j = os.path.join(a.work, "torch.json")
        res["torch_pipeline"] = measured(me + ["--work", a.work, "--out", j, "--new-tokens", str(a.new_tokens),
                                               "--step", "torch-pipeline", ckpt], os.path.join(a.work, "torch.log"))
        res["torch_pipeline"]["result"] = json.load(open(j))
        save()
    q = "Q4_K_M" if "Q4_K_M" in quants else quants[-1]
    scan = os.path.join(a.work, "scan.nii.gz")
    if not os.path.exists(scan):
        subprocess.run([sys.executable, "-c", "import sys; from samf.runtime.scan.ct import save_nifti; from "
                        "samf.runtime.tools.phantom import make_phantom; p = make_phantom(17); "
                        "save_nifti(sys.argv[1], p.volume, p.spacing)", scan], check=True)
    j = os.path.join(a.work, "verify.json")
    res["verify_warm"] = measured(me + ["--work", a.work, "--out", j, "--step", "verify-time", bundle, q])
    res["verify_warm"]["verify_s"] = json.load(open(j))["verify_s"]
    res.setdefault("first_token", {})
    for e in (e for e in have if a.redo or len(res["first_token"].get(e, [])) < 3):
        # 3 runs per variant, after the verification run above has warmed the page cache
        runs = []
        for i in range(3):
            log = os.path.join(a.work, f"first-token-{e}-{i}.log")
            r = measured(["samf", "report", scan, "--bundle", bundle, "--quant", q, "--max-tokens", "1",
                          "--encoders", e], log)
            r["timings"] = next((ln for ln in reversed(open(log).read().splitlines()) if ln.startswith("[load")),
                                "")  # the command's own timing line (stderr)
            runs.append(r)
        res["first_token"][e] = runs
        save()
    for _ in range(a.pairs):
        pair = {}
        for e in have:
            j = os.path.join(a.work, f"pair-{quants[-1]}-{e}.json")
            r = measured(["samf", "bench", "--bundle", bundle, "--quant", quants[-1], "--scans", str(a.scans),
                          "--new-tokens", str(a.new_tokens), "--encoders", e, "--out", j],
                         os.path.join(a.work, f"pair-{quants[-1]}-{e}.log"))
            run = json.load(open(j))["runs"][0]
            pair[f"runtime_{e}"] = dict(r, stages_p50_ms={k: v["p50_ms"] for k, v in run["stages"].items()},
                                        decode_tok_s=run["decode_tok_s"])
        j = os.path.join(a.work, "pair-torch.json")
        r = measured(me + ["--work", a.work, "--out", j, "--new-tokens", str(a.new_tokens), "--step",
                           "torch-pipeline", ckpt], os.path.join(a.work, "pair-torch.log"))
        pair["torch"] = dict(r, result=json.load(open(j)))
        pair["ratio"] = {e: pair["torch"]["result"]["timings_s"]["total"] * 1000
                         / pair[f"runtime_{e}"]["stages_p50_ms"]["total"] for e in have}
        res.setdefault("pairs", []).append(pair)
        save()
    for qq in quants:
        res[f"roofline_{qq}"] = roofline(os.path.join(bundle, f"llm-{qq}.gguf"), res["bandwidth"]["read_gb_s"],
                                         res[f"runtime_{qq}"]["bench"], a.new_tokens)
    save()
    summarize(res, q)


def roofline(gguf_path: str, read_gb_s: float, bench: dict, new_tokens: int) -> dict:
    """Decode's memory-bound ceiling: each new token reads every weight but the token-embedding table (one row
    of it) and the KV cache so far (F16, at the mean position of the decode)."""
    import gguf

    r = gguf.GGUFReader(gguf_path)
    weights = sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight")
    f = r.fields
    arch = "phi3"
    n_layer = int(f[f"{arch}.block_count"].parts[-1][0])
    n_embd = int(f[f"{arch}.embedding_length"].parts[-1][0])
    prompt = bench["runs"][0].get("prompt_tokens") or 0
    kv = 2 * n_layer * n_embd * 2 * (prompt + new_tokens / 2)
    per_token = weights + kv
    return dict(weight_bytes=weights, kv_bytes=int(kv), bytes_per_token=int(per_token),
                tok_s=read_gb_s * 1e9 / per_token)


def summarize(res: dict, q: str) -> None:
    """The ratios the issue sets floors for, printed: per encoder variant the report against PyTorch's and the
    first token."""
    tp = res["torch_pipeline"]["result"]
    rt = res[f"runtime_{q}"]["bench"]["runs"][0]
    variants = {"fp32": res[f"runtime_{q}"]}
    variants.update({k[len(f"runtime_{q}_"):]: v for k, v in res.items()
                     if k.startswith(f"runtime_{q}_") and not k.endswith("_1thread")})
    for e, r in variants.items():
        if "not_in_bundle" in r:
            print(f"\nruntime {q}, {e} encoders: not in the bundle ({r['not_in_bundle']})")
            continue
        run = r["bench"]["runs"][0]
        total = run["stages"]["total"]["p50_ms"] / 1000
        print(f"\nper report ({res['new_tokens']} new tokens, models loaded): runtime {q}, {e} encoders "
              f"{total:.1f} s (vit {run['stages']['vit']['p50_ms'] / 1000:.2f} s), PyTorch "
              f"{tp['timings_s']['total']:.1f} s: {tp['timings_s']['total'] / total:.1f}x; peak RSS "
              f"{r['peak_rss_gb']:.2f} GB (PyTorch {res['torch_pipeline']['peak_rss_gb']:.2f} GB)")
    roof = res[f"roofline_{q}"]
    print(f"decode {q}: {rt['decode_tok_s']:.2f} tok/s; roofline {roof['tok_s']:.2f} tok/s "
          f"({roof['bytes_per_token'] / 1e9:.2f} GB per token at {res['bandwidth']['read_gb_s']} GB/s): "
          f"{rt['decode_tok_s'] / roof['tok_s']:.0%}")
    print(f"export peak RSS {res['export']['peak_rss_gb']:.2f} GB (anon {res['export']['peak_anon_gb']:.2f} GB)")
    for i, p in enumerate(res.get("pairs", [])):
        print(f"pair {i + 1}: PyTorch {p['torch']['result']['timings_s']['total']:.1f} s; "
              + ", ".join(f"runtime {e} {p[f'runtime_{e}']['stages_p50_ms']['total'] / 1000:.1f} s ({x:.1f}x)"
                          for e, x in p["ratio"].items()))
    for e, runs in res["first_token"].items():
        print(f"first token, {e} encoders: " + ", ".join(f"{r['wall_s']:.1f} s" for r in runs))
    print(f"verification {res['verify_warm']['verify_s']:.3f} s")

if __name__ == "__main__":
    main()
