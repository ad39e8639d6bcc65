"""``samf demo``: every step of the stack once, small but real, each one a stage a user can also run alone.

data (phantoms) -> DINO ViT -> tiny Phi-3 language base -> SAMF+Ao2D fine-tune with LoRA -> merge ->
ONNX + GGUF + Q8_0 -> bundle -> slim runtime (ONNX Runtime + llama.cpp) on held-out phantoms.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import click

from samf.runtime.options import option


@dataclass
class DemoConfig:
    """What ``samf demo`` runs; a field made with :func:`~samf.runtime.options.option` is also its option, so its
    default is written here only. The stages' steps default to the recipe's (``samf.train.recipe.RecipeSteps``,
    which this module does not import: ``samf``'s commands load no training code until one trains)."""

    workdir: str = option("samf-demo", "where data, run and bundle go", path="dir")
    # at 320 the LLM learned the reports by heart (loss 0.12 on them, 0.50 on fresh scans)
    n_train: int = option(2000, "training phantoms", name="--train", min=1)
    # held-out scans the table is measured on (±3.5 points of standard error at 0.5)
    n_test: int = option(200, "held-out phantoms (of their own seed)", name="--test", min=1)
    compare_torch: int = 24  # held-out scans whose runtime report is compared with PyTorch's
    dino_steps: int | None = None       # None: the recipe's
    lm_steps: int | None = None
    finetune_steps: int | None = option(None, "fine-tuning steps", type=int, min=1, shown="the recipe's")
    seed: int = option(0, "seed of the training phantoms and of every stage")
    test_seed: int = 2026  # the held-out phantoms' own seed sequence, which no training set of another seed holds
    show: int = option(4, "reports printed next to their reference", min=0)
    threads: int | None = option(None, "CPU threads for training and the runtime (default: all cores); more than "
                                       "the cores this process may use are capped to them", type=int, min=1, max=1024)
    progress: bool = True


class _Stages:
    """Prints each stage's heading and wall time; keeps the times for the summary."""

    def __init__(self):
        self.times = {}

    def __call__(self, name: str):
        stages = self

        class _Ctx:
            def __enter__(self):
                click.secho(f"\n== {name}", bold=True)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                if exc[0] is None:
                    stages.times[name] = time.perf_counter() - self.t
                    click.echo(f"   ({stages.times[name]:.1f} s)")

        return _Ctx()


def run_demo(cfg: DemoConfig) -> dict:
    import numpy as np

    from samf.runtime.atomic import atomic_file
    from samf.runtime.inference.prompt import REPORT_REQUESTS
    from samf.runtime.tools.phantom import generate_phantom_dataset
    from samf.train import run_folder as R
    from samf.train.evaluate import (
        distinct_share,
        finding_accuracy,
        format_table,
        majority_accuracy,
        sentence_share,
    )
    from samf.train.recipe import RecipeSteps, run_recipe, start_run

    from .common import torch_threads

    torch_threads(cfg.threads)
    import torch

    t_start = time.perf_counter()
    data, run, bundle = (os.path.join(cfg.workdir, d) for d in ("data", "run", "bundle"))
    stage = _Stages()

    with stage("1. synthetic chest-CT phantoms"):
        generate_phantom_dataset(data, cfg.n_train, cfg.n_test, seed=cfg.seed, test_seed=cfg.test_seed,
                                 progress=cfg.progress, workers=cfg.threads or os.cpu_count() or 1)
        click.echo(f"   {cfg.n_train} train + {cfg.n_test} held-out scans in {data}")
    train, test = start_run(run, data, progress=cfg.progress)

    headings = {
        "tokenizer": "2a. tokenizer (SentencePiece BPE on the report corpus)",
        "pretrain-2d": "2b. ViT: DINO self-supervised pretraining on axial/coronal/sagittal slices",
        "pretrain-lm": "2c. tiny Phi-3 language base (text only)",
        "finetune": "2d. SAMF + Ao2D fusion and aggregator (ViT frozen), Phi-3 LoRA (peft): reports + multiple choice",
        "merge": "3. merge LoRA into a plain Hugging Face checkpoint",
    }

    def said(name, result):
        if name == "tokenizer":
            click.echo(f"   {result.vocab_size()} pieces")
        elif name == "merge":
            click.echo(f"   {result}")
        else:
            first, last = (np.mean(result[:20]), np.mean(result[-20:])) if name == "finetune" else (result[0],
                                                                                                  result[-1])
            click.echo(f"   {name} loss {first:.3f} -> {last:.3f}")

    given = dict(dino=cfg.dino_steps, lm=cfg.lm_steps, finetune=cfg.finetune_steps)
    steps = RecipeSteps(seed=cfg.seed, **{k: v for k, v in given.items() if v is not None})
    merged = run_recipe(run, train, steps, on_stage=lambda name: stage(headings[name]), after=said,
                        progress=cfg.progress)["merge"]
    with stage("4-6. ONNX export + checks, GGUF (phi3) + Q8_0 quantization, bundle"):
        from samf.export.bundle_writer import write_bundle

        manifest = write_bundle(merged, bundle, quants=("Q8_0",), keep_unquantized="F32",
                                log=lambda m: click.echo("   " + m))
    with stage("7. slim runtime (ONNX Runtime + llama.cpp) on held-out phantoms"):
        from samf.runtime.inference.pipeline import MCQ_METHODS, ReportPipeline

        results = {}
        # F32 with the fp32 encoders: the reference the PyTorch pipeline is compared with below; Q8_0 with the
        # encoders a workstation would pick (--encoders auto), which also answers the multiple-choice questions.
        for quant, encoders in (("F32", "fp32"), ("Q8_0", "auto")):
            # One scan at a time (report, answer): one sequence.
            with ReportPipeline(bundle, quant=quant, encoders=encoders, n_threads=cfg.threads, parallel=1) as pipe:
                results[quant] = [pipe.report(os.path.join(data, ex.image)) for ex in test]
                if quant == "Q8_0":  # each question answered both ways (ReportPipeline.answer says why two)
                    asked = {method: [(pipe.answer(os.path.join(data, ex.image), q["question"], q["choices"],
                                                   method=method)[0], q["answer"])
                                      for ex in test for q in ex.questions] for method in MCQ_METHODS}
        q8 = results["Q8_0"]
        for ex, res in list(zip(test, q8))[: cfg.show]:
            click.echo(f"\n   scan      {ex.image}")
            click.echo(f"   generated {res.text}")
            click.echo(f"   reference {ex.report}")
        keys = list(q8[0].timings)
        mean_t = {k: float(np.mean([r.timings[k] for r in q8])) for k in keys}
        click.echo(f"\n   mean per-scan timings (Q8_0, {q8[0].identity['encoder_precision']} encoders): "
                   + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in mean_t.items()))
        click.echo(f"   decode speed: {np.mean([r.tokens_per_s for r in q8]):.0f} tok/s (Q8_0), "
                   f"{np.mean([r.tokens_per_s for r in results['F32']]):.0f} tok/s (F32)")

    with stage(f"learning check: per-finding accuracy on {len(test)} held-out phantoms"):
        from samf.train.vlm import SamfVLM, generate_reports, prompt_ids

        truths = [e.findings for e in test]
        vlm = SamfVLM.from_checkpoint(merged)
        tok = R.base_tokenizer(run)
        zeroed = generate_reports(vlm, tok, test, zero_image=True, progress=False)
        q8_texts = [r.text for r in q8]
        table = {"runtime F32": finding_accuracy([r.text for r in results["F32"]], truths),
                 "runtime Q8_0": finding_accuracy(q8_texts, truths),
                 "zeroed image": finding_accuracy(zeroed, truths),
                 "majority class": majority_accuracy(truths)}
        click.echo(format_table(table))
        quality = dict(scans=len(test), sentences_in_grammar=sentence_share(q8_texts),
                       distinct_reports=distinct_share(q8_texts),
                       mcq_accuracy=_share(asked["choices"]), mcq_accuracy_generated=_share(asked["generate"]),
                       mcq_questions=len(asked["choices"]))
        click.echo(f"   Q8_0 reports: {quality['sentences_in_grammar']:.1%} of sentences in the phantom grammar, "
                   f"{quality['distinct_reports']:.1%} distinct; multiple choice {quality['mcq_accuracy']:.2f} "
                   f"(the likeliest of the four), {quality['mcq_accuracy_generated']:.2f} (the generated letter, "
                   f"M3D's protocol), {quality['mcq_questions']} questions")
        prompt = prompt_ids(tok, REPORT_REQUESTS[0])
        compared = list(zip(results["F32"], test))[: cfg.compare_torch]
        same = sum(r.text == tok.decode(vlm.generate(torch.from_numpy(e.slices), prompt)) for r, e in compared)
        click.echo(f"   runtime (F32 GGUF) report == PyTorch report for {same}/{len(compared)} scans")

    total = time.perf_counter() - t_start
    summary = dict(total_s=total, stages_s=stage.times, accuracy=table, quality=quality,
                   runtime_equals_torch=f"{same}/{len(compared)}",
                   onnx_max_abs_diff=manifest["fidelity"]["onnx_max_abs_diff"],
                   timings_ms={k: v * 1000 for k, v in mean_t.items()})
    with atomic_file(os.path.join(cfg.workdir, "demo_summary.json")) as f:
        json.dump(summary, f, indent=2)
    click.secho(f"\ndemo finished in {total / 60:.1f} min; bundle: {bundle}; summary: "
                f"{os.path.join(cfg.workdir, 'demo_summary.json')}", bold=True)
    click.echo(f"try: samf report {os.path.join(data, test[0].image)} --bundle {bundle}")
    return summary


def _share(pairs: list) -> float:
    """The share of (answer, truth) pairs that agree."""
    return sum(a == t for a, t in pairs) / max(1, len(pairs))
