"""The paper's comparison on phantoms, by one command (``samf-train ablate``).

The shared stages run once (tokenizer, DINO, LM base); then each cell fine-tunes from them with its fusion and
its auxiliary-loss switch, once per seed, and is scored on held-out phantoms from a seed no training uses. Rows:
2D only (slices, no aggregator), 3D only (the aggregator alone), concatenation (no SAMF attention), SAMF, SAMF+Ao2D,
each with and without the auxiliary finding loss, and a zeroed-image row (SAMF+Ao2D with the loss, its rows
zeroed). Each row is the mean ± sd over the seeds, with a bootstrap 95% interval over the held-out scans. A rerun
with the same settings keeps the shared stages and the finished cells.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np

from samf.runtime.atomic import atomic_file
from samf.runtime.options import option

from .recipe import RecipeSteps
from .run_files import DINO_FILE, LM_BASE_DIR, RUN_FILE, TOKENIZER_DIR, TOKENIZER_MODEL, WARMUP_FILE

#: (row name, fine-tune switches): the fusion (train/models.py FUSION_MODES) and the auxiliary loss.
GRID = [(f"{name}{', finding loss' if aux else ''}", dict(fusion=mode, ao2d=ao2d, aux_weight=1.0 if aux else 0.0))
        for name, mode, ao2d in (("2D only", "2d", False), ("3D only", "3d", False), ("concatenation", "concat", False),
                                 ("SAMF", "samf", False), ("SAMF+Ao2D", "samf", True))
        for aux in (False, True)]
ZEROED = "SAMF+Ao2D, finding loss, zeroed image rows"
#: The findings the table scores (nodule presence too: at the demo's resolution it is not seen, see the probes).
SCORED = ("effusion", "cardiomegaly", "emphysema", "nodule")


@dataclass
class AblationConfig:
    """What ``samf-train ablate`` runs; a field made with :func:`~samf.runtime.options.option` is also its option,
    so its default is written here only. The shared stages run as long as the recipe runs them
    (:class:`~samf.train.recipe.RecipeSteps`); the fine-tunes are a knob of their own, ``finetune_steps``,
    shorter than the recipe's (3000 for the demo): ten rows times three seeds of them."""

    out_dir: str                      # required: the command's --out
    data_dir: str | None = option(None, "phantom dataset (default: generate one under OUT/data)", name="--data",
                                    path="dir")
    n_train: int = 2000               # the demo's training set
    n_test: int = option(200, "held-out phantoms", name="--test", min=2)  # from test_seed
    test_seed: int = 77               # a seed no training or test of ours uses for its phantoms
    dino_steps: int = RecipeSteps.dino
    lm_steps: int = RecipeSteps.lm
    finetune_steps: int = option(1000, "fine-tuning steps of each row and seed", min=1)
    seeds: tuple = option((0, 1, 2), "fine-tune seeds per row (0, 1, ...)", count=True, min=1)
    bootstrap: int = 1000
    progress: bool = True
    cells: tuple = option((), "run only this row (repeatable; default: every row)", name="--row", multiple=True,
                          choices=tuple(name for name, _ in GRID))


#: What a cell's run folder takes from the base run's shared stages.
SHARED = (RUN_FILE, TOKENIZER_MODEL, TOKENIZER_DIR, DINO_FILE, LM_BASE_DIR, WARMUP_FILE)


def copy_shared(base: str, run: str) -> None:
    """A run folder holding ``base``'s shared stages, ready for a fine-tune of its own."""
    os.makedirs(run, exist_ok=True)
    for f in SHARED:
        src, dst = os.path.join(base, f), os.path.join(run, f)
        if os.path.exists(src) and not os.path.exists(dst):
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)


def hits(reports: list, truths: list) -> dict:
    """``{finding: [0/1 per scan]}``: whether each report states each scored finding as the truth does."""
    from samf.runtime.tools.phantom import parse_report

    read = [parse_report(r) for r in reports]
    return {k: [int(r[k] == t[k]) for r, t in zip(read, truths)] for k in SCORED}


def summarise(per_seed: list, n_boot: int, seed: int = 0) -> dict:
    """``per_seed``: a ``hits`` dict per seed. Per finding: mean and sd over the seeds of the accuracy, and a
    bootstrap 95% interval of that mean (the held-out scans resampled, the same scans for every seed)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in SCORED:
        h = np.array([s[k] for s in per_seed], float)        # [seeds, scans]
        acc = h.mean(1)
        idx = rng.integers(0, h.shape[1], size=(n_boot, h.shape[1]))
        boot = h[:, idx].mean(2).mean(0)                       # [n_boot]
        out[k] = dict(mean=float(acc.mean()), sd=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                      ci95=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))])
    return out


def format_ablation(rows: dict, majority: dict, n_test: int, n_seeds: int) -> str:
    """The table: a row per cell, ``mean ± sd [95% interval]`` per finding, the majority class last."""
    head = "| row | " + " | ".join(SCORED) + " |"
    lines = [f"Held-out accuracy on {n_test} phantoms; mean ± sd over {n_seeds} seeds [bootstrap 95% interval].", "",
             head, "|---|" + "---|" * len(SCORED)]
    for name, r in rows.items():
        cells = [f"{r[k]['mean']:.3f} ± {r[k]['sd']:.3f} [{r[k]['ci95'][0]:.2f}, {r[k]['ci95'][1]:.2f}]"
                 for k in SCORED]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| majority class | " + " | ".join(f"{majority[k]:.3f}" for k in SCORED) + " |")
    return "\n".join(lines)


def run_ablation(cfg: AblationConfig, echo=print) -> dict:
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.runtime.tools.phantom import generate_phantom_dataset

    from . import finetune as FT
    from . import run_folder as R
    from .datasets import load_dataset
    from .evaluate import majority_accuracy
    from .recipe import run_recipe, start_run
    from .vlm import generate_reports

    t0 = time.time()
    data = cfg.data_dir or os.path.join(cfg.out_dir, "data")
    if not cfg.data_dir and not os.path.exists(os.path.join(data, "train.csv")):
        generate_phantom_dataset(data, cfg.n_train, 0, seed=0, progress=cfg.progress)
    held_out = os.path.join(cfg.out_dir, f"held-out-{cfg.test_seed}")
    if not os.path.exists(os.path.join(held_out, "test.csv")):
        generate_phantom_dataset(held_out, 0, cfg.n_test, seed=cfg.test_seed, progress=cfg.progress)
    base = os.path.join(cfg.out_dir, "base")
    train, _ = start_run(base, data, progress=cfg.progress)
    pre = PreprocessConfig.from_dict(R.read_run(base)["preprocess"])
    test = load_dataset(held_out, "test", pre, progress=cfg.progress)
    shared = {"dino": cfg.dino_steps, "lm": cfg.lm_steps, "n_train": len(train)}
    done = os.path.join(base, "shared_done.json")
    if not (os.path.exists(done) and json.load(open(done)) == shared):  # a rerun keeps finished work
        run_recipe(base, train, RecipeSteps(dino=cfg.dino_steps, lm=cfg.lm_steps),
                   stages=("tokenizer", "pretrain-2d", "pretrain-lm"), progress=cfg.progress)
        with atomic_file(done) as f:
            json.dump(shared, f)
    tok = R.base_tokenizer(base)
    truths = [e.findings for e in test]

    rows, per_row = {}, {}
    grid = [(n, s) for n, s in GRID if not cfg.cells or n in cfg.cells]
    for i, (name, switches) in enumerate(grid):
        per_seed = []
        for seed in cfg.seeds:
            cell = os.path.join(cfg.out_dir, "cells", f"{name.replace(' ', '_').replace(',', '')}-seed{seed}")
            result_path = os.path.join(cell, "result.json")
            res = json.load(open(result_path)) if os.path.exists(result_path) else {}
            if res.get("finetune_steps") != cfg.finetune_steps or res.get("shared") != shared:  # not done, or stale
                shutil.rmtree(cell, ignore_errors=True)
                copy_shared(base, cell)
                t = time.time()
                ft = FT.FinetuneConfig(steps=cfg.finetune_steps, seed=seed, **switches)
                losses = run_recipe(cell, train, stages=("finetune",), configs={"finetune": ft},
                                    progress=cfg.progress)["finetune"]
                vlm = FT.load_finetuned(cell)
                res = dict(name=name, switches=switches, seed=seed, finetune_steps=cfg.finetune_steps, shared=shared,
                           final_loss=float(np.mean(losses[-20:])), finetune_s=time.time() - t,
                           reports=generate_reports(vlm, tok, test, progress=False))
                if switches == GRID[-1][1]:  # the full model: also with its image rows zeroed
                    res["zeroed"] = generate_reports(vlm, tok, test, zero_image=True, progress=False)
                with atomic_file(result_path) as f:
                    json.dump(res, f, indent=2)
            per_seed.append(res)
            acc = {k: float(np.mean(v)) for k, v in hits(res["reports"], truths).items()}
            echo(f"{name}, seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
                 + f" ({res['finetune_s']:.0f} s)")
        rows[name] = summarise([hits(r["reports"], truths) for r in per_seed], cfg.bootstrap)
        per_row[name] = per_seed
        if all("zeroed" in r for r in per_seed):
            rows[ZEROED] = summarise([hits(r["zeroed"], truths) for r in per_seed], cfg.bootstrap)
    majority = majority_accuracy(truths)
    table = format_ablation(rows, majority, len(test), len(cfg.seeds))
    out = {"config": asdict(cfg), "rows": rows, "majority": {k: majority[k] for k in SCORED}, "table": table,
           "wall_s": time.time() - t0}
    with atomic_file(os.path.join(cfg.out_dir, "ablation.json")) as f:
        json.dump(out, f, indent=2, default=str)
    with atomic_file(os.path.join(cfg.out_dir, "ablation.md")) as f:
        f.write(table + "\n")
    return out
