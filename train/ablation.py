"""The paper's ablation grid on phantoms, by one command (``samf-train ablate``).

Shared stages run once (tokenizer, DINO, LM base, InfoNCE warm-up); then each cell fine-tunes from them with
its switches and is evaluated on the held-out phantoms with the full metric set. Cells: SAMF vs SAMF+Ao2D ×
ViT frozen vs trained × with vs without the warm-up, plus the frozen-aggregator variant (with warm-up),
and one zeroed-image baseline row. A rerun with the same settings keeps the shared stages and finished cells.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

from samf.runtime.atomic import atomic_file

GRID = [
    (f"{'SAMF+Ao2D' if ao2d else 'SAMF'}, ViT {'frozen' if fv else 'trained'}, {'warm-up' if wu else 'no warm-up'}",
     dict(ao2d=ao2d, freeze_vit=fv, warmup=wu))
    for ao2d in (False, True) for fv in (True, False) for wu in (False, True)
] + [("SAMF+Ao2D, ViT frozen, warm-up, aggregator frozen", dict(ao2d=True, freeze_vit=True, warmup=True,
                                                                freeze_aggregator=True))]


ZEROED = "zeroed image embeddings (last row's model)"


@dataclass
class AblationConfig:
    out_dir: str = "samf-ablation"
    data_dir: str | None = None       # phantoms; written to OUT/data when not given
    n_train: int = 300
    n_test: int = 24
    dino_steps: int = 150
    lm_steps: int = 300
    warmup_steps: int = 200
    finetune_steps: int = 1500        # as the demo: at 600 the tiny model still says the same report for most scans
    seed: int = 0
    progress: bool = True


SHARED = ("run.json", "tokenizer.model", "tokenizer", "vit_dino.pt", "lm_base", "aggregator_warmup.pt")


def copy_shared(base: str, run: str) -> None:
    """A run folder holding ``base``'s shared stages, ready for a fine-tune of its own."""
    os.makedirs(run, exist_ok=True)
    for f in SHARED:
        src, dst = os.path.join(base, f), os.path.join(run, f)
        if not os.path.exists(dst):
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)


def run_ablation(cfg: AblationConfig, echo=print) -> dict:
    from samf.runtime.phantom import generate_phantom_dataset

    from . import finetune as FT
    from . import run_folder as R
    from .evaluate import evaluate_model, format_findings, format_summary, summary_row
    from .recipe import RecipeSteps, run_recipe, start_run

    t0 = time.time()
    data = cfg.data_dir or os.path.join(cfg.out_dir, "data")
    if not cfg.data_dir and not os.path.exists(os.path.join(data, "train.csv")):
        generate_phantom_dataset(data, cfg.n_train, cfg.n_test, seed=cfg.seed, progress=cfg.progress)
    base = os.path.join(cfg.out_dir, "base")
    train, test = start_run(base, data, progress=cfg.progress)
    shared = {"dino": cfg.dino_steps, "lm": cfg.lm_steps, "warmup": cfg.warmup_steps, "seed": cfg.seed}
    done = os.path.join(base, "shared_done.json")
    if not (os.path.exists(done) and json.load(open(done)) == shared):  # a rerun keeps finished work
        run_recipe(base, train, RecipeSteps(dino=cfg.dino_steps, lm=cfg.lm_steps, warmup=cfg.warmup_steps,
                                            seed=cfg.seed),
                   stages=("tokenizer", "pretrain-2d", "pretrain-lm", "warmup-3d"), progress=cfg.progress)
        with atomic_file(done) as f:
            json.dump(shared, f)
    tok = R.base_tokenizer(base)

    results, rows, findings = {}, {}, {}
    for i, (name, switches) in enumerate(GRID):
        cell = os.path.join(cfg.out_dir, "cells", f"{i:02d}")
        result_path = os.path.join(cell, "result.json")
        res = json.load(open(result_path)) if os.path.exists(result_path) else {}
        if res.get("finetune_steps") != cfg.finetune_steps or res.get("shared") != shared:  # not done, or stale
            shutil.rmtree(cell, ignore_errors=True)
            copy_shared(base, cell)
            t = time.time()
            ft = FT.FinetuneConfig(steps=cfg.finetune_steps, seed=cfg.seed, **switches)
            losses = run_recipe(cell, train, stages=("finetune",), configs={"finetune": ft},
                                progress=cfg.progress)["finetune"]
            res = evaluate_model(FT.load_finetuned(cell), tok, test, progress=False, zeroed=(i == len(GRID) - 1))
            res.update(name=name, switches=switches, final_loss=sum(losses[-20:]) / len(losses[-20:]),
                       finetune_s=time.time() - t, finetune_steps=cfg.finetune_steps, shared=shared)
            with atomic_file(result_path) as f:
                json.dump(res, f, indent=2)
        results[name] = res
        rows[name] = summary_row(res)
        findings[name] = res["image"].get("findings", {})
        if "zeroed" in res:
            rows[ZEROED] = summary_row(res, "zeroed")
            findings[ZEROED] = res["zeroed"].get("findings", {})
        echo(f"{name}: loss {res['final_loss']:.3f}, finding acc {rows[name].get('finding_acc', 0):.2f}, "
             f"MCQ acc {rows[name]['mcq_accuracy']:.2f} ({res['finetune_s']:.0f} s)")
    table = format_summary(rows)
    if any(findings.values()):
        table += "\n\nPer-finding accuracy (phantoms):\n\n" + format_findings(findings)
    out = {"config": cfg.__dict__, "grid": results, "table": table, "wall_s": time.time() - t0}
    with atomic_file(os.path.join(cfg.out_dir, "ablation.json")) as f:
        json.dump(out, f, indent=2, default=str)
    with atomic_file(os.path.join(cfg.out_dir, "ablation.md")) as f:
        f.write(table + "\n")
    return out
