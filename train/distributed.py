"""Multi-GPU through torchrun + DistributedDataParallel; one process on CPU is the same code with world 1.

    torchrun --nproc_per_node 8 -m samf.cli.train_cli -- finetune --data DATA --run RUN

(The ``--`` matters: without it torchrun's own parser reads ``--run`` as an abbreviation of its ``--run-path``.)

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; each rank then trains on its own GPU (NCCL), draws its own
batches, and DDP averages the gradients. Without those variables nothing is initialised.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def single_process_device(stage: str) -> torch.device:
    """The device of a stage that runs in one process (the GPU where there is one); refused under torchrun,
    where every rank would redo the same work and race to write the same file."""
    from samf.runtime.errors import SamfError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SamfError(f"{stage} runs in one process: launch it without torchrun")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistributedContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local)
        return cls(rank=dist.get_rank(), world_size=world, local_rank=local,
                   device=torch.device(f"cuda:{local}" if cuda else "cpu"))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around ``model`` when there are several ranks; the model itself otherwise."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    @staticmethod
    def no_sync_unless(model, sync: bool):
        """Skip DDP's gradient all-reduce on the micro-batches before the last of an accumulation."""
        if sync or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks (the loss a log should show is the global one)."""
        if self.world_size == 1:
            return value
        return float(self.mean_tensor(torch.tensor([value], dtype=torch.float64, device=self.device)))

    def mean_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks (a new tensor; ``t`` itself when there is one rank)."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
