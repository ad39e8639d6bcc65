"""torchrun target for test_training: ``samf-train`` itself, with one rank failing at one optimizer step.

    torchrun --standalone --nproc_per_node 2 tests/ddp_failing_rank.py RANK STEP -- finetune --data D --run R

Rank RANK raises a SamfError just before its STEP-th optimizer step, as a rank that meets a bad input would;
the other rank is then inside a collective (DDP's gradient all-reduce, the logged loss's mean) waiting for it.
"""

import os
import sys

import torch

from samf.cli.train_cli import main as samf_train
from samf.errors import SamfError


def main() -> None:
    fail_rank, fail_step = int(sys.argv[1]), int(sys.argv[2])
    real_step, calls = torch.optim.AdamW.step, []

    def failing_step(self, *a, **k):
        calls.append(1)
        if int(os.environ["RANK"]) == fail_rank and len(calls) == fail_step:
            raise SamfError(f"injected failure on rank {fail_rank} at step {fail_step}")
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = failing_step
    samf_train(args=sys.argv[sys.argv.index("--") + 1:], prog_name="samf-train")


if __name__ == "__main__":
    main()
