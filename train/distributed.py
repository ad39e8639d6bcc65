"""Multi-GPU through torchrun + DistributedDataParallel; one process on CPU is the same code with world 1.

    torchrun --nproc_per_node 8 -m samf.cli.train_cli -- finetune --data DATA --run RUN

(The ``--`` matters: without it torchrun's own parser reads ``--run`` as an abbreviation of its ``--run-path``.)

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; each rank then trains on its own GPU (NCCL), draws its own
batches, and DDP averages the gradients. Without those variables nothing is initialised. ``--zero`` shards
the AdamW moments over the ranks (ZeRO stage 1); checkpoints gather them, with every rank's RNG state.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

from samf.errors import PeerRankFailed


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that broke because a peer process went away (gloo reports a closed or
    reset connection as a RuntimeError; NCCL and the store raise DistError subclasses)."""
    import torch.distributed as dist

    msg = str(exc)
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(s in msg for s in ("by peer", "remote worker")))


def tear_down_process_group(failed: bool) -> None:
    """Shut the default process group down, if one is up. Without this its threads are still alive when the
    interpreter exits, and a rank now and then dies with SIGABRT ("terminate called without an active
    exception") on its very last line, or hangs there: DDP's reducer, freed at exit with the GIL held, joins
    gloo's worker thread while that thread waits for the GIL. After a failure an NCCL group is aborted
    instead, since its clean shutdown can wait on peers that are gone; gloo's shutdown does not wait."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if failed and abort is not None and dist.get_backend() == "nccl":
        abort()
    else:
        dist.destroy_process_group()


def owns_process_group(stage):
    """Decorator for a stage that may run under torchrun: the process group that the stage brings up is torn
    down on every way out (return, error, KeyboardInterrupt). A collective broken by a dead peer becomes
    :class:`PeerRankFailed`, so the rank that failed first is the one whose error the user reads."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        import torch.distributed as dist

        up_before = dist.is_available() and dist.is_initialized()
        try:
            result = stage(*args, **kwargs)
        except BaseException as exc:
            if not up_before:
                tear_down_process_group(failed=True)
            if _peer_failure(exc):
                raise PeerRankFailed(f"rank {os.environ.get('RANK', '?')} stopped: another rank failed") from exc
            raise
        if not up_before:
            tear_down_process_group(failed=False)
        return result

    return run


def single_process_device(stage: str) -> torch.device:
    """The device of a stage that runs in one process (the GPU where there is one); refused under torchrun,
    where every rank would redo the same work and race to write the same file."""
    from samf.errors import SamfError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SamfError(f"{stage} runs in one process: launch it without torchrun")
    return DistributedContext.from_env().device


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

    def optimizer(self, params, zero: bool = False, **adamw) -> torch.optim.Optimizer:
        """AdamW over ``params`` (tensors or param groups). With ``zero`` and several ranks, ZeRO stage 1
        (PyTorch's ZeroRedundancyOptimizer): each rank keeps the AdamW moments of its share of the
        parameters only and broadcasts its updated share, so optimizer memory falls with the rank count while
        the weights stay those of plain DDP."""
        if zero and self.world_size > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **adamw)
        return torch.optim.AdamW(params, **adamw)

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict | None:
        """The whole optimizer state on rank 0 (None elsewhere), for a checkpoint. Every rank must call it:
        under ZeRO it gathers the shards. The result loads into either kind of optimizer."""
        if hasattr(opt, "consolidate_state_dict"):
            opt.consolidate_state_dict(to=0)
        return opt.state_dict() if self.is_main else None

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

    def all_gather(self, obj) -> list:
        """``obj`` from every rank, in rank order (a list of one without torchrun)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
