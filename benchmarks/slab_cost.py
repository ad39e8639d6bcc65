"""What each slice mode costs in preprocessing (``PreprocessConfig.slab``), at a preset's size, side by side in one
process: thin, MIP, mean (averaged right after sampling along the normal, as ``cut_slices`` does), and the mean
taken last (every sample plane cut in-plane, then averaged: the order before the early mean), with the largest
difference between the two means.

    python benchmarks/slab_cost.py --preset paper   # a 240×512×512 phantom at 1.25×0.7×0.7 mm, 224², S = 8
    python benchmarks/slab_cost.py --preset tiny    # the demo's 64×96×96 phantom at 5×4×4 mm, 48², S = 6

Each figure is the best of ``--repeats`` runs of ``cut_slices`` (the windows, the same for every mode, left out).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from samf.runtime.scan import preprocess as P
from samf.runtime.scan.ct import Volume
from samf.runtime.tools.phantom import make_phantom
from samf.train.configs import PRESET_PREPROCESS

VOLUMES = {"paper": dict(shape=(240, 512, 512), spacing=(1.25, 0.7, 0.7)),
           "tiny": dict(shape=(64, 96, 96), spacing=(5.0, 4.0, 4.0))}


def mean_taken_last(vol: Volume, cfg: P.PreprocessConfig) -> np.ndarray:
    """The slab mean as the mean of ``slab_samples`` thin cuts at the slab's sample planes."""
    placed, m = P.place_slices(vol, cfg), cfg.slab_samples
    thin = dataclasses.replace(cfg, slab="thin")
    return np.mean([P.cut_slices(vol, thin, dataclasses.replace(
        placed, positions=placed.positions + ((j + 0.5) / m - 0.5) * placed.step[:, None])) for j in range(m)], axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(VOLUMES), default="paper")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    ph = make_phantom(5, **VOLUMES[a.preset])
    vol = Volume(ph.volume, ph.spacing, a.preset)
    base = dataclasses.replace(PRESET_PREPROCESS[a.preset], slab="thin")
    runs = {"thin": lambda: P.cut_slices(vol, base),
            "mip": lambda: P.cut_slices(vol, dataclasses.replace(base, slab="mip")),
            "mean": lambda: P.cut_slices(vol, dataclasses.replace(base, slab="mean")),
            "mean, taken last": lambda: mean_taken_last(vol, dataclasses.replace(base, slab="mean"))}
    out = {}
    print(f"{a.preset}: volume {ph.volume.shape}, {base.image_size}², S = {base.slices_per_plane}, "
          f"{base.slab_samples} planes a slab")
    for name, run in runs.items():
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            out[name] = run()
            times.append(time.perf_counter() - t)
        print(f"  {name:17s} {min(times) * 1000:8.1f} ms")
    print(f"  mean vs mean taken last: max |diff| {np.abs(out['mean'] - out['mean, taken last']).max():.1e} HU")


if __name__ == "__main__":
    main()
