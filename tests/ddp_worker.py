"""Run by test_training under torchrun (2 CPU ranks, gloo): one short stage, recorded per rank.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py STAGE RUN DATA OUT

Writes OUT/rank<R>.json with the losses the stage returned and, after every optimizer step, the sum of the
trained weights: equal on both ranks only if DDP really averaged their gradients.
"""

import json
import os
import sys

import torch

from samf.runtime.preprocess import PreprocessConfig
from samf.train import stages as S
from samf.train.data import load_split
from samf.train.dino import DinoConfig


def main() -> None:
    stage, run, data, out = sys.argv[1:5]
    sums = []
    real_step = torch.optim.AdamW.step

    def recorded_step(self, *a, **k):
        result = real_step(self, *a, **k)
        with torch.no_grad():
            sums.append(float(sum(p.double().sum() for g in self.param_groups for p in g["params"])))
        return result

    torch.optim.AdamW.step = recorded_step
    pre = PreprocessConfig.from_dict(S.read_run(run)["preprocess"])
    exs = load_split(data, "train", pre, progress=False)[:8]
    if stage == "finetune":
        losses = S.stage_finetune(run, exs, S.FinetuneConfig(steps=3, batch_size=2), progress=False)
    else:
        losses = S.stage_pretrain_2d(run, exs, DinoConfig(steps=3, batch_size=4), progress=False)
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump({"losses": losses, "sums": sums}, f)


if __name__ == "__main__":
    main()
