"""Run by test_training under torchrun (2 CPU ranks, gloo): one short stage, recorded per rank.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py STAGE RUN DATA OUT [--zero] [--crash-at N] [--cache]

Writes OUT/rank<R>.json with the losses the stage returned and, after every optimizer step, the sum of all
trained weights (equal on both ranks only if DDP really averaged their gradients) and how many parameters
this rank keeps AdamW moments for (all of them, or its share under ZeRO). ``--crash-at N`` interrupts the
run just before its N-th optimizer step, as a killed job would be; the stage checkpoints every 2 steps. With
``--cache``, DATA is a cache made by ``samf-train prepare`` that the stage streams (one loader worker per rank),
and the record also holds the scans this rank was given, in order.
"""

import json
import os
import sys

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from samf.runtime.scan.preprocess import PreprocessConfig
from samf.train import finetune as FT
from samf.train import run_folder as R
from samf.train.data import load_split
from samf.train.dino import DinoConfig
from samf.train.recipe import run_recipe

STEPS = 4


def main() -> None:
    stage, run, data, out = sys.argv[1:5]
    zero = "--zero" in sys.argv
    crash_at = int(sys.argv[sys.argv.index("--crash-at") + 1]) if "--crash-at" in sys.argv else None
    record = {"sums": [], "moments": []}
    # ZeRO's step runs AdamW on this rank's share, then broadcasts: record after the whole of it.
    cls = ZeroRedundancyOptimizer if zero and os.environ.get("WORLD_SIZE", "1") != "1" else torch.optim.AdamW
    real_step = cls.step

    def recorded_step(self, *a, **k):
        if crash_at is not None and len(record["sums"]) + 1 == crash_at:
            raise KeyboardInterrupt
        result = real_step(self, *a, **k)
        with torch.no_grad():
            record["sums"].append(float(sum(p.double().sum() for g in self.param_groups for p in g["params"])))
        local = self.optim if isinstance(self, ZeroRedundancyOptimizer) else self
        record["moments"].append(sum(1 for s in local.state.values() if "exp_avg" in s))
        return result

    cls.step = recorded_step
    pre = PreprocessConfig.from_dict(R.read_run(run)["preprocess"])
    cached = "--cache" in sys.argv
    if cached:
        from samf.train import cache_stream
        from samf.train.datasets import load_dataset

        record["scans"] = []
        real_init = cache_stream.StreamedScan.__init__

        def recorded_init(self, split, index, *a):
            record["scans"].append(index)
            real_init(self, split, index, *a)

        cache_stream.StreamedScan.__init__ = recorded_init
        exs = load_dataset(data, "train", pre)
    else:
        exs = load_split(data, "train", pre, progress=False)[:8]
    if stage == "finetune":
        cfg = FT.FinetuneConfig(steps=STEPS, batch_size=2, save_every=2, zero=zero, loader_workers=1)
    else:
        stage, cfg = "pretrain-2d", DinoConfig(steps=STEPS, batch_size=4, save_every=2, zero=zero)
    losses = run_recipe(run, exs, stages=(stage,), configs={stage: cfg}, progress=False)[stage]
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump({"losses": losses, **record}, f)


if __name__ == "__main__":
    main()
