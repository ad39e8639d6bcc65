"""Resumable stages: RUN/checkpoints/<stage>.pt holds what a stage needs to go on after an interruption.

A checkpoint is written atomically every ``every`` steps and removed once the stage's output is written.
It records the stage's config; resuming with a different config is refused (start over with ``--restart``),
since mixing two configurations in one run would make its metrics meaningless.
"""

from __future__ import annotations

import os
import random

import torch

from samf.errors import SamfError
from samf.runtime.atomic import atomic_file

from .run_files import CHECKPOINTS_DIR


class ResumeError(SamfError):
    """A checkpoint that cannot be resumed with this configuration."""


def rng_state(py_rng: random.Random | None = None, gen: torch.Generator | None = None) -> dict:
    return {"python": py_rng.getstate() if py_rng else None, "torch": torch.get_rng_state(),
            "generator": gen.get_state() if gen is not None else None}


def set_rng_state(state: dict, py_rng: random.Random | None = None, gen: torch.Generator | None = None) -> None:
    if py_rng is not None and state.get("python") is not None:
        py_rng.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if gen is not None and state.get("generator") is not None:
        gen.set_state(state["generator"])


def own_rng_state(saved, rank: int, world_size: int) -> dict | None:
    """This rank's RNG state from a checkpoint written by as many ranks as now, else None (the caller then
    reseeds). Checkpoints from before per-rank states hold one dict: that of a single process."""
    states = saved if isinstance(saved, list) else [saved]
    return states[rank] if len(states) == world_size else None


class StageCheckpoint:
    def __init__(self, run_dir: str, stage: str, config: dict, every: int = 100, restart: bool = False,
                 enabled: bool = True):
        self.path = os.path.join(run_dir, CHECKPOINTS_DIR, f"{stage}.pt")
        self.stage, self.config, self.every, self.enabled = stage, config, max(1, int(every)), enabled
        if restart:
            self.clear()

    def load(self) -> dict | None:
        """The saved state (``step`` = steps already done), or None when there is nothing to resume."""
        if not (self.enabled and os.path.exists(self.path)):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)  # our own file, with RNG states
        if state.get("config") != self.config:
            raise ResumeError(f"{self.path} was written with another {self.stage} configuration; "
                              "rerun with --restart to start this stage over")
        return state

    def due(self, steps_done: int) -> bool:
        """Whether a checkpoint is written after ``steps_done`` steps."""
        return self.enabled and steps_done % self.every == 0

    def maybe_save(self, steps_done: int, state_fn) -> bool:
        if not self.due(steps_done):
            return False
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with atomic_file(self.path, "wb") as f:
            torch.save({"step": steps_done, "config": self.config, **state_fn()}, f)
        return True

    def save_from_every_rank(self, steps_done: int, dist, opt, rng_fn, state_fn) -> bool:
        """Called by every rank after each step. When a checkpoint is due, the ranks gather the optimizer
        (under ZeRO its shards) and every rank's ``rng_fn()`` state; rank 0 writes them with ``state_fn()``."""
        if not self.due(steps_done):
            return False
        opt_state, rngs = dist.optimizer_state(opt), dist.all_gather(rng_fn())
        return dist.is_main and self.maybe_save(steps_done, lambda: {**state_fn(), "optimizer": opt_state,
                                                                     "rng": rngs})

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
