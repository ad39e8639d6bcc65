"""The stage sequence, written once: tokenizer → DINO → LM base → InfoNCE warm-up → fine-tune → merge.

The demo, the ablation, the test suite's trained fixture and the multi-rank test worker all run their stages
through :func:`run_recipe`; each stage is seeded by its own config, so a stage gives the same result
whichever others ran before it. The export (``samf.export.bundle_writer.write_bundle``) comes after, one
layer up.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .configs import DinoConfig, FinetuneConfig, LMConfig, WarmupConfig

#: The stages in the order they run; each reads what the ones before it wrote into the run folder.
STAGES = ("tokenizer", "pretrain-2d", "pretrain-lm", "warmup-3d", "finetune", "merge")


@dataclass
class RecipeSteps:
    """How long each trained stage runs when the recipe runs them all (the demo, and the ablation's shared stages),
    and the seed of all of them. These are the recipe's own knobs, not the stages' defaults when each is run alone
    (``samf-train <stage> --steps``, :mod:`samf.train.configs`); where the two agree the recipe reads the stage's.
    The ablation's fine-tunes are a knob of their own, shorter (``AblationConfig.finetune_steps``)."""

    dino: int = 150
    lm: int = LMConfig.steps
    warmup: int = 0  # 0: no InfoNCE warm-up
    finetune: int = 3000  # the demo's 2000 phantoms drawn 24 times each (batch 16). Slab-mean slices: effusion 1.00,
    #                       96% distinct reports, 7.5 min on the slower VM; 4000 steps gave 0.975 and 97% in 9.0 min
    #                       (benchmarks/learning.md). Thin slices needed 4000 (1500: effusion 0.86, 83% distinct)
    seed: int = 0


def stage_configs(steps: RecipeSteps) -> dict:
    return {"pretrain-2d": DinoConfig(steps=steps.dino, seed=steps.seed),
            "pretrain-lm": LMConfig(steps=steps.lm, seed=steps.seed),
            "warmup-3d": WarmupConfig(steps=steps.warmup, seed=steps.seed),
            "finetune": FinetuneConfig(steps=steps.finetune, seed=steps.seed)}


def start_run(run_dir: str, data_dir: str, preset: dict | None = None, progress: bool = True) -> tuple:
    """A run folder with ``preset`` (default: the tiny one) and the (train, test) examples of any supported
    dataset folder (phantoms or SAMF CSV, CT-RATE, M3D), preprocessed as the preset says."""
    from samf.runtime.scan.preprocess import PreprocessConfig

    from .datasets import load_dataset
    from .run_folder import init_run, tiny_preset

    preset = preset or tiny_preset()
    init_run(run_dir, preset)
    pre = PreprocessConfig.from_dict(preset["preprocess"])
    return (load_dataset(data_dir, "train", pre, progress=progress),
            load_dataset(data_dir, "test", pre, progress=progress))


def run_recipe(run_dir: str, train: list, steps: RecipeSteps | None = None, stages=STAGES, configs=None,
               on_stage=None, after=None, progress: bool = True) -> dict:
    """Run ``stages`` (names from :data:`STAGES`, always in that order) on ``train``; ``{stage: result}``
    (the losses of a trained stage, the tokenizer, the merged checkpoint's path).

    ``configs`` replaces a stage's config ({"finetune": FinetuneConfig(...)}); ``on_stage(name)`` is a
    context manager around each stage and ``after(name, result)`` is called when one ends (the demo prints
    with them)."""
    from . import finetune as FT
    from . import merge as M
    from . import stages as S
    from .data import text_corpus

    cfgs = {**stage_configs(steps or RecipeSteps()), **(configs or {})}
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; the recipe has {', '.join(STAGES)}")
    run = {
        "tokenizer": lambda: S.stage_tokenizer(run_dir, text_corpus(train)),
        "pretrain-2d": lambda: S.stage_pretrain_2d(run_dir, train, cfgs["pretrain-2d"], progress=progress),
        "pretrain-lm": lambda: S.stage_pretrain_lm(run_dir, train, cfgs["pretrain-lm"], progress=progress),
        "warmup-3d": lambda: S.stage_warmup_3d(run_dir, train, cfgs["warmup-3d"], progress=progress),
        "finetune": lambda: FT.stage_finetune(run_dir, train, cfgs["finetune"], progress=progress),
        "merge": lambda: M.stage_merge(run_dir),
    }
    results = {}
    for name in STAGES:
        if name not in stages or (name == "warmup-3d" and cfgs[name].steps == 0):
            continue
        with on_stage(name) if on_stage else contextlib.nullcontext():
            results[name] = run[name]()
            if after:
                after(name, results[name])
    return results
