"""Shared fixtures: one small but real training run, merged and exported, reused by the suite.

Trained once per session (about two minutes on 2 cores): phantoms -> tokenizer -> DINO (brief) -> InfoNCE warm-up ->
tiny Phi-3 language base -> SAMF+Ao2D+LoRA fine-tune -> merge -> bundle (ONNX, GGUF F32, Q8_0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

# 48 held-out scans: on 16 one scan moves an accuracy by 0.06, which was the learning test's whole margin.
# Every stage is seeded, so this run is the same on every machine with the same thread count.
SMALL = dict(n_train=200, n_test=48, dino_steps=20, warmup_steps=60, lm_steps=200, finetune_steps=600)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The bundle-verification cache goes to a session folder, never into the user's ~/.cache (CLIs inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@dataclass
class Trained:
    data: str
    run: str
    merged: str
    bundle: str
    train: list
    test: list


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    import torch

    from samf.export.bundle_writer import write_bundle
    from samf.runtime.phantom import generate_phantom_dataset
    from samf.train.recipe import RecipeSteps, run_recipe, start_run

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    root = tmp_path_factory.mktemp("trained")
    data, run = str(root / "data"), str(root / "run")
    generate_phantom_dataset(data, SMALL["n_train"], SMALL["n_test"], seed=1, progress=False)
    train, test = start_run(run, data, progress=False)
    steps = RecipeSteps(dino=SMALL["dino_steps"], warmup=SMALL["warmup_steps"], lm=SMALL["lm_steps"],
                        finetune=SMALL["finetune_steps"])
    merged = run_recipe(run, train, steps, progress=False)["merge"]
    bundle = str(root / "bundle")
    write_bundle(merged, bundle, quants=("Q8_0",), keep_unquantized="F32", log=lambda m: None)
    return Trained(data=data, run=run, merged=merged, bundle=bundle, train=train, test=test)
