"""samf-train: the training stages, each on a data folder and a run folder.

Typical order: make-phantoms, init, tokenizer, pretrain-2d, pretrain-lm, finetune, merge, evaluate.
"""

from __future__ import annotations

import json
import os

import click

from .common import SamfGroup, torch_threads

data_opt = click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
                        help="dataset folder: SAMF CSV / phantoms (train.csv), CT-RATE (radiology_text_reports/) "
                             "or M3D (M3D_Cap.json)")
run_opt = click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="run folder")
steps_opt = click.option("--steps", type=int, default=None, help="optimizer steps (default: the stage's own)")
threads_opt = click.option("--threads", type=int, default=None, help="CPU threads for torch")
quiet_opt = click.option("--quiet", is_flag=True, help="no progress bars")


def _train_examples(run_dir, data_dir, split="train", progress=True):
    from samf.runtime.preprocess import PreprocessConfig
    from samf.train.data import load_dataset
    from samf.train.stages import read_run

    pre = PreprocessConfig.from_dict(read_run(run_dir)["preprocess"])
    return load_dataset(data_dir, split, pre, progress=progress)


@click.group(cls=SamfGroup)
def main():
    """Train SAMF: DINO ViT, aggregator, SAMF(+Ao2D) fusion and Phi-3 with LoRA."""


@main.command("make-phantoms")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--train", "n_train", default=300, show_default=True)
@click.option("--test", "n_test", default=24, show_default=True)
@click.option("--seed", default=0, show_default=True)
@quiet_opt
def make_phantoms(out_dir, n_train, n_test, seed, quiet):
    """Write a synthetic chest-CT dataset (NIfTI + reports + questions)."""
    from samf.train.data import generate_phantom_dataset

    counts = generate_phantom_dataset(out_dir, n_train, n_test, seed=seed, progress=not quiet)
    click.echo(f"wrote {counts['train']} train + {counts['test']} test phantoms to {out_dir}")


@main.command("init")
@run_opt
@click.option("--preset", type=click.Choice(["tiny", "paper"]), default="tiny", show_default=True)
@click.option("--llm-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="local Phi-3 checkpoint (paper preset)")
def init(run_dir, preset, llm_path):
    """Start a run folder with a model/preprocessing preset."""
    from samf.train.stages import init_run, paper_preset, tiny_preset

    if preset == "paper" and not llm_path:
        raise click.UsageError("--preset paper needs --llm-path to a local Phi-3-mini checkpoint")
    init_run(run_dir, tiny_preset() if preset == "tiny" else paper_preset(llm_path))
    click.echo(f"run folder ready: {run_dir} ({preset})")


@main.command("tokenizer")
@data_opt
@run_opt
@click.option("--vocab-size", default=1000, show_default=True)
def tokenizer(data_dir, run_dir, vocab_size):
    """Train the SentencePiece tokenizer of the tiny Phi-3 on the report corpus."""
    from samf.train.data import text_corpus
    from samf.train.stages import stage_tokenizer

    sp = stage_tokenizer(run_dir, text_corpus(_train_examples(run_dir, data_dir, progress=False)), vocab_size)
    click.echo(f"tokenizer: {sp.vocab_size()} pieces -> {os.path.join(run_dir, 'tokenizer.model')}")


@main.command("pretrain-2d")
@data_opt
@run_opt
@steps_opt
@click.option("--dino-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="start from a published DINO ViT checkpoint (local file)")
@threads_opt
@quiet_opt
def pretrain_2d(data_dir, run_dir, steps, dino_weights, threads, quiet):
    """DINO self-supervised pretraining of the ViT on slices of all three planes."""
    from samf.train.dino import DinoConfig
    from samf.train.stages import stage_pretrain_2d

    torch_threads(threads)
    cfg = DinoConfig(**({"steps": steps} if steps else {}))
    losses = stage_pretrain_2d(run_dir, _train_examples(run_dir, data_dir, progress=not quiet), cfg,
                               dino_weights=dino_weights, progress=not quiet)
    click.echo(f"pretrain-2d: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
               f"ViT saved to {os.path.join(run_dir, 'vit_dino.pt')}")


@main.command("pretrain-lm")
@data_opt
@run_opt
@steps_opt
@threads_opt
@quiet_opt
def pretrain_lm(data_dir, run_dir, steps, threads, quiet):
    """Teach the tiny Phi-3 the report language (stands in for Phi-3's own pretraining)."""
    from samf.train.stages import LMConfig, stage_pretrain_lm

    torch_threads(threads)
    cfg = LMConfig(**({"steps": steps} if steps else {}))
    losses = stage_pretrain_lm(run_dir, _train_examples(run_dir, data_dir, progress=not quiet), cfg,
                               progress=not quiet)
    click.echo(f"pretrain-lm: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


@main.command("finetune")
@data_opt
@run_opt
@steps_opt
@click.option("--freeze-vit/--train-vit", default=True, show_default=True)
@click.option("--lora-r", default=16, show_default=True)
@click.option("--lora-alpha", default=32, show_default=True)
@click.option("--lr", type=float, default=None)
@threads_opt
@quiet_opt
def finetune(data_dir, run_dir, steps, freeze_vit, lora_r, lora_alpha, lr, threads, quiet):
    """SAMF(+Ao2D) into Phi-3 with LoRA: reports and multiple-choice answers together."""
    from samf.train.stages import FinetuneConfig, stage_finetune

    torch_threads(threads)
    kw = dict(freeze_vit=freeze_vit, lora_r=lora_r, lora_alpha=lora_alpha)
    if steps:
        kw["steps"] = steps
    if lr:
        kw["lr"] = lr
    losses = stage_finetune(run_dir, _train_examples(run_dir, data_dir, progress=not quiet), FinetuneConfig(**kw),
                            progress=not quiet)
    click.echo(f"finetune: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


@main.command("merge")
@run_opt
def merge(run_dir):
    """Fold LoRA into a plain Hugging Face checkpoint (RUN/merged) with the image modules beside it."""
    from samf.train.stages import stage_merge

    click.echo(f"merged checkpoint: {stage_merge(run_dir)}")


@main.command("evaluate")
@data_opt
@run_opt
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="at most this many scans")
@threads_opt
@quiet_opt
def evaluate(data_dir, run_dir, split, limit, threads, quiet):
    """Per-finding accuracy of the merged model's reports (and with zeroed image embeddings), MCQ accuracy."""
    from samf.train.evaluate import finding_accuracy, format_table, mcq_accuracy
    from samf.train.stages import generate_mcq, generate_reports
    from samf.train.tokenizer import load_tokenizer
    from samf.train.vlm import SamfVLM

    torch_threads(threads)
    exs = _train_examples(run_dir, data_dir, split, progress=not quiet)[:limit]
    vlm = SamfVLM.from_checkpoint(os.path.join(run_dir, "merged"))
    sp = load_tokenizer(os.path.join(run_dir, "merged", "tokenizer.model"))
    truths = [e.findings for e in exs]
    res = {"image": finding_accuracy(generate_reports(vlm, sp, exs, progress=not quiet), truths),
           "zeroed": finding_accuracy(generate_reports(vlm, sp, exs, zero_image=True, progress=not quiet), truths)}
    mcq = {k: mcq_accuracy(*generate_mcq(vlm, sp, exs, zero_image=(k == "zeroed"))) for k in res}
    click.echo(format_table(res))
    click.echo("mcq accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in mcq.items()))
    from samf.runtime.atomic import atomic_file

    with atomic_file(os.path.join(run_dir, f"eval_{split}.json")) as f:
        json.dump({"findings": res, "mcq": mcq, "n": len(exs)}, f, indent=2)


if __name__ == "__main__":
    main()
