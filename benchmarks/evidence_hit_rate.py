"""Do the slices the model weighted most fall on the finding? Measured on phantoms whose findings are drawn where
we know, through the runtime (``ReportPipeline``: fusion.onnx's α and γ), against chance.

    python benchmarks/evidence_hit_rate.py --bundle samf-demo/bundle --bundle random=B2 --scans 300 \
        --out benchmarks/results/evidence-hit-rate.json

For each phantom with a unilateral pleural effusion or a nodule (``make_phantom(seed, with_masks=True)``, seeds
``--seed`` onward, the demo's 64×96×96 grid at 5×4×4 mm), each plane and each score (α, γ, their mean):

- the finding's range: the voxel indices along the plane's normal where its mask is drawn;
- a slice is *in range* when the voxels it reads (:meth:`SlicePlacement.voxel_range`) overlap that range;
- **hit@1**: the plane's highest-scored slice is in range; **chance**: the share of the plane's slices in range
  (what a slice picked at random scores); **mass**: the share of the plane's score on slices in range (chance
  again: the share of slices in range);
- **another scan's top**: the same model's best slice for *another* scan, scored on this scan's finding, averaged
  over all pairs. Attention can favour a slice position whatever the image, and findings favour places
  (effusions lie posterior and low): this is what position alone scores, the baseline that matters;
- ``p``: two-sided permutation test of hit@1 against that baseline: twice the smaller share of 2000 shuffles of
  the best slices among the scans that score at least, or at most, the observed hit@1;
- **lowest@1**: the plane's lowest-scored slice is in range (attention can also point *away* from a finding);
- **peak / mean**: the plane's highest score over its mean (1: flat, S: all on one slice);
- **same top slice**: the share of scans whose best slice is the plane's most frequent one.

Planes where no slice touches the finding (a small nodule between two slices) are counted apart, not as misses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

FINDINGS = ("unilateral effusion", "nodule")
SCORES = ("alpha", "gamma", "mean")


def finding_masks(phantom) -> dict:
    """``{finding: mask}`` for the findings measured: a unilateral effusion (the bilateral ones cover both sides,
    so they say nothing about where the model looks), a nodule."""
    f, out = phantom.findings, {}
    if f.effusion in ("left", "right"):
        out["unilateral effusion"] = phantom.masks[f"effusion_{f.effusion}"]
    if f.nodule:
        out["nodule"] = phantom.masks["nodule"]
    return out


def in_range(mask: np.ndarray, placement, plane: int) -> np.ndarray:
    """Per slice of ``plane``: does it read a voxel of the finding's range along the plane's normal?"""
    other = tuple(a for a in range(3) if a != plane)
    idx = np.flatnonzero(mask.any(axis=other))
    lo, hi = int(idx[0]), int(idx[-1])
    ranges = [placement.voxel_range(plane, k) for k in range(placement.positions.shape[1])]
    return np.array([a <= hi and b >= lo for a, b in ranges])


def measure(bundle: str, seeds, threads: int | None, encoders: str = "fp32") -> dict:
    """Per (finding, plane): each scan's in-range slices and the plane's scores, from the runtime's evidence."""
    from samf.runtime.inference.pipeline import ReportPipeline
    from samf.runtime.scan.ct import Volume
    from samf.runtime.tools.phantom import make_phantom

    cases: dict = {}  # (finding, plane) -> list of (in_range [S], {score: [S]})
    untouched = {f: [0, 0, 0] for f in FINDINGS}
    scans = {f: 0 for f in FINDINGS}
    t0 = time.perf_counter()
    with ReportPipeline(bundle, encoders=encoders, n_threads=threads, repack=False, max_new_tokens=1) as pipe:
        if not pipe.has_attention:
            raise SystemExit(f"{bundle}: its fusion outputs no attention (export it again)")
        for seed in seeds:
            ph = make_phantom(seed, with_masks=True)
            masks = finding_masks(ph)
            if not masks:
                continue
            ev = pipe.report(Volume(ph.volume, ph.spacing, f"phantom {seed}"), max_new_tokens=1).evidence
            S = ev.slices_per_plane
            scores = dict(alpha=ev.alpha, gamma=ev.gamma, mean=ev.score())
            for finding, mask in masks.items():
                scans[finding] += 1
                for p in range(3):
                    hit_mask = in_range(mask, ev.placement, p)
                    if not hit_mask.any():
                        untouched[finding][p] += 1
                        continue
                    cases.setdefault((finding, p), []).append(
                        (hit_mask, {k: v[p * S:(p + 1) * S] for k, v in scores.items()}))
    return dict(cases=cases, untouched=untouched, scans=scans, seconds=round(time.perf_counter() - t0, 1))


def summarise(measured: dict, permutations: int = 2000, seed: int = 0) -> list:
    """Per finding, plane and score: hit@1, chance, mass on range; and the same model's top slice of *another*
    scan on this scan's finding (``other_scan``: what position alone gets, since attention can favour a slice
    position whatever the image), with a permutation p-value for hit@1 against it."""
    from samf.runtime.scan.preprocess import PLANES

    rng = np.random.default_rng(seed)
    out = []
    for finding in FINDINGS:
        for p, plane in enumerate(PLANES):
            cases = measured["cases"].get((finding, p), [])
            if len(cases) < 2:
                continue
            ranges = np.array([c[0] for c in cases])                      # [n, S] in range
            for name in SCORES:
                top = np.array([int(np.argmax(c[1][name])) for c in cases])  # each scan's best slice
                bottom = np.array([int(np.argmin(c[1][name])) for c in cases])
                n = len(cases)
                hits = ranges[np.arange(n), top]
                cross = ranges[:, top]                                     # [i, j]: scan j's best on scan i
                other = (cross.sum() - np.trace(cross)) / (n * (n - 1))
                perm = np.array([ranges[np.arange(n), top[rng.permutation(n)]].mean() for _ in range(permutations)])
                tail = min((perm >= hits.mean()).sum(), (perm <= hits.mean()).sum())
                mass = np.mean([c[1][name][c[0]].sum() / c[1][name].sum() for c in cases])
                peak = np.mean([c[1][name].max() / c[1][name].mean() for c in cases])
                out.append(dict(finding=finding, plane=plane, score=name, n=n, hit_at_1=round(float(hits.mean()), 3),
                                bottom_at_1=round(float(ranges[np.arange(n), bottom].mean()), 3),
                                chance=round(float(ranges.mean()), 3), other_scan=round(float(other), 3),
                                p_value=round(min(1.0, 2 * float((1 + tail) / (1 + permutations))), 4),
                                mass=round(float(mass), 3), peak=round(float(peak), 2), favourite_share=round(
                                    float(np.bincount(top).max() / n), 3),
                                untouched=measured["untouched"][finding][p]))
    return out


def table(summary: list) -> str:
    lines = ["| finding | plane | score | scans | hit@1 | chance | another scan's top | p | lowest@1 | "
             "mass on range | peak / mean | same top slice | no slice on it |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['finding']} | {s['plane']} | {s['score']} | {s['n']} | {s['hit_at_1']:.2f} | "
                     f"{s['chance']:.2f} | {s['other_scan']:.2f} | {s['p_value']:.3f} | {s['bottom_at_1']:.2f} | "
                     f"{s['mass']:.2f} | {s['peak']:.2f} | {s['favourite_share']:.0%} | {s['untouched']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", required=True,
                    help="a bundle to measure, as PATH or NAME=PATH; repeat to compare (e.g. a random-weight one)")
    ap.add_argument("--scans", type=int, default=300, help="phantoms drawn (those with neither finding are skipped)")
    ap.add_argument("--seed", type=int, default=900_000, help="first phantom seed (the demo trains on seeds < 1000)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--encoders", default="fp32", choices=("auto", "fp32", "fp16", "int8"),
                    help="the encoders' precision (GPUs run fp16 by default, CPUs int8 where the bundle has it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    seeds = range(args.seed, args.seed + args.scans)
    report = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores", command=" ".join(os.sys.argv),
                  date=time.strftime("%Y-%m-%d"), first_seed=args.seed, phantoms=args.scans, encoders=args.encoders,
                  bundles={})
    for spec in args.bundle:
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(os.path.normpath(path))
        measured = measure(path, seeds, args.threads, args.encoders)
        summary = summarise(measured)
        report["bundles"][name] = dict(path=path, scans=measured["scans"], seconds=measured["seconds"],
                                       summary=summary)
        print(f"\n## {name} ({path}): {measured['scans']} scans with the finding, {measured['seconds']} s\n")
        print(table(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
