"""Would finer slices let the tiny preset's DINO ViT see what it misses at 48² (nodules, calcifications)?

On a phantom dataset (a `samf demo --workdir` folder's data/, or `samf-train make-phantoms`), the slices are cut at
the size, spacing and slab asked; a tiny-preset ViT (3 blocks, 64 wide) with that patch size is DINO-pretrained
with the default `DinoConfig` on the first 600 training scans; then one logistic regression per label (CT-RATE's
18) is fitted on 400 of them and scored on the held-out scans, for three features per scan:

    cls         the ViT's CLS outputs, concatenated over the slices (what the aggregator is given)
    patchmean   its patch tokens averaged per slice, concatenated (the pooling the CLS token could be swapped for)
    slices      the raw slices, each area-averaged to 12x12 per window (`samf.train.probe.small_slices`)

    python benchmarks/resolution_probes.py samf-demo/data --size 96 --spacing 4 --patch 8 --slab mean
    python benchmarks/resolution_probes.py samf-demo/data --size 48 --spacing 8 --patch 8 --slab mean  # the preset

It prints the seconds the slices and DINO took, then one line per label with the majority class beside it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a phantom dataset folder (train.csv, test.csv, scans/)")
    ap.add_argument("--size", type=int, default=96, help="slice side in pixels")
    ap.add_argument("--spacing", type=float, default=4.0, help="in-plane pixel spacing, mm")
    ap.add_argument("--patch", type=int, default=8, help="the ViT's patch side in pixels")
    ap.add_argument("--slab", choices=("thin", "mip", "mean"), default="mean")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.train.configs import DinoConfig
    from samf.train.datasets import load_dataset
    from samf.train.dino import pretrain_dino
    from samf.train.labels import CTRATE_LABELS, truth_labels
    from samf.train.models import VisionTransformer, ViTConfig
    from samf.train.probe import probe_accuracy, small_slices

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    pre = PreprocessConfig(image_size=args.size, pixel_spacing_mm=args.spacing, slices_per_plane=6, slab=args.slab)
    train = load_dataset(args.data, "train", pre, progress=False, limit=600)
    test = load_dataset(args.data, "test", pre, progress=False)
    print(f"slices: {time.perf_counter() - t:.0f} s", flush=True)
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(img_size=args.size, patch_size=args.patch, in_chans=3, embed_dim=64, depth=3,
                                      num_heads=4))
    t = time.perf_counter()
    pretrain_dino(vit, np.concatenate([e.slices for e in train]), DinoConfig(), progress=False)
    print(f"DINO ({DinoConfig().steps} steps): {time.perf_counter() - t:.0f} s", flush=True)
    vit.eval()

    @torch.no_grad()
    def features(examples) -> dict:
        out = {"cls": [], "patchmean": [], "slices": []}
        for e in examples:
            h = vit.tokens(torch.from_numpy(e.slices))
            out["cls"].append(h[:, 0].flatten().numpy())
            out["patchmean"].append(h[:, 1:].mean(1).flatten().numpy())
            out["slices"].append(small_slices(e.slices))
        return {k: np.stack(v) for k, v in out.items()}

    fitted = train[:400]
    f_train, f_test = features(fitted), features(test)
    truth_train, truth_test = [truth_labels(e.findings) for e in fitted], [truth_labels(e.findings) for e in test]
    for label in CTRATE_LABELS:
        y_train = np.array([bool(t.get(label)) for t in truth_train])
        y_test = np.array([bool(t.get(label)) for t in truth_test])
        acc = {k: round(probe_accuracy(f_train[k], y_train, f_test[k], y_test), 3) for k in f_train}
        print(f"{label:36s} {acc}  majority {max(y_test.mean(), 1 - y_test.mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
