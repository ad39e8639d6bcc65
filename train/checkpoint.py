"""Resumable stages: RUN/checkpoints/<stage>.pt holds what a stage needs to go on after an interruption.

A checkpoint is written atomically every ``every`` steps and removed once the stage's output is written.
It records the stage's config; resuming with a different config is refused (start over with ``--restart``),
since mixing two configurations in one run would make its metrics meaningless.
"""

from __future__ import annotations

import os
import random

import torch

from samf.runtime.atomic import atomic_file
from samf.runtime.errors import SamfError


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


def rank_states(saved, world_size: int) -> list | None:
    """The per-rank RNG states of a checkpoint when it was written by as many ranks as now, else None.
    (Checkpoints from before per-rank states hold one dict: rank 0's of a single process.)"""
    states = saved if isinstance(saved, list) else [saved]
    return states if len(states) == world_size else None


class StageCheckpoint:
    def __init__(self, run_dir: str, stage: str, config: dict, every: int = 100, restart: bool = False,
                 enabled: bool = True):
        self.path = os.path.join(run_dir, "checkpoints", f"{stage}.pt")
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
        """Whether ``maybe_save`` would write after ``steps_done`` steps (every rank can ask, to gather first)."""
        return self.enabled and steps_done % self.every == 0

    def maybe_save(self, steps_done: int, state_fn) -> bool:
        if not self.due(steps_done):
            return False
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with atomic_file(self.path, "wb") as f:
            torch.save({"step": steps_done, "config": self.config, **state_fn()}, f)
        return True

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
