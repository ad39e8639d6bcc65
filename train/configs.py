"""The stages' configurations: plain dataclasses, no torch.

A field made with :func:`~samf.runtime.options.option` is also the stage's command-line option (``samf-train <stage>
--help``; see :func:`samf.cli.common.config_options`), so each default is written once, here. The run preset's
``stage_defaults`` (the paper preset's batch sizes) come between these defaults and the command line. What a
stage ran with is written to RUN/config/<stage>.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from samf.runtime.options import option
from samf.runtime.scan.preprocess import PreprocessConfig

#: What fine-tuning trains on: reports and multiple-choice questions together, or one of them.
TASKS = ("both", "report", "mcq")
#: How the fusion makes its rows: the paper's SAMF, or one of the ablation's baselines (train/models.py: SAMF).
FUSION_MODES = ("samf", "2d", "3d", "concat")

#: The presets' preprocessing, also what ``samf-train prepare --preset`` caches a dataset with. The tiny preset's
#: 6 slices per plane are 40-50 mm apart: a thin slice misses what lies between, a slab mean sees all of it
#: (default demo, 200 fresh phantoms: effusion 0.93 -> 0.97, emphysema 0.97 -> 0.94, cardiomegaly 0.99 both;
#: benchmarks/learning.md). The paper preset keeps the paper's thin slices; ``samf-train init --slab`` picks.
PRESET_PREPROCESS = {
    "tiny": PreprocessConfig(image_size=48, pixel_spacing_mm=8.0, slices_per_plane=6, slab="mean"),
    "paper": PreprocessConfig(image_size=224, pixel_spacing_mm=1.5, slices_per_plane=8),
}


@dataclass
class TokenizerConfig:
    """The tiny LLM's SentencePiece tokenizer (:func:`samf.train.stages.stage_tokenizer`)."""

    vocab_size: int = option(1000, "pieces in the SentencePiece vocabulary")


@dataclass
class DinoConfig:
    """DINO on slices of all three planes (:func:`samf.train.dino.pretrain_dino`)."""

    steps: int = option(200, "optimizer steps", min=1)
    batch_size: int = option(32, "images per step and rank, each cut into 2 global and n_local_crops local crops "
                                 "(the paper preset sets 8)", min=1)
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup_frac: float = 0.1
    out_dim: int = 1024            # prototypes (DINO uses 65536; lightly's head in the paper code: 2048)
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    n_local_crops: int = 4
    global_scale: tuple = (0.5, 1.0)
    local_scale: tuple = (0.15, 0.5)
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    momentum_start: float = 0.996  # EMA teacher momentum, cosine to 1.0
    seed: int = 0
    save_every: int = option(100, "steps between resumable checkpoints", min=1)
    zero: bool = option(False, "under torchrun: ZeRO stage 1, AdamW state sharded over the ranks", flag="--zero")


@dataclass
class WarmupConfig:
    """InfoNCE warm-up of the aggregator on frozen ViT embeddings (:func:`samf.train.warmup.warmup_aggregator`)."""

    steps: int = option(200, "optimizer steps", min=1)
    batch_size: int = option(32, "scans per step", min=2)
    lr: float = 1e-3
    tau: float = option(0.1, "InfoNCE temperature", min=1e-6)
    proj_dim: int = 64
    seed: int = 0


@dataclass
class LMConfig:
    """The LM base: the LLM taught the report language, text only (:func:`samf.train.stages.stage_pretrain_lm`)."""

    steps: int = option(300, "optimizer steps", min=1)
    batch_size: int = option(32, "sequences per step", min=1)
    lr: float = 3e-3
    seed: int = 0


@dataclass
class FinetuneConfig:
    """SAMF(+Ao2D) into Phi-3 with LoRA (:func:`samf.train.finetune.stage_finetune`)."""

    steps: int = option(400, "optimizer steps", min=1)
    batch_size: int = option(16, "samples per step and rank (the paper preset sets 4)", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch size x this x ranks)",
                             min=1)
    lr: float = option(2e-3, "learning rate of the fusion, the aggregator and LoRA", min=0.0)
    vit_lr: float = option(1e-4, "learning rate of the ViT with --train-vit: at --lr its DINO features are lost in "
                                 "a few hundred steps and every scan gets the same report (the ablation showed it)",
                           min=0.0)
    lora_r: int = option(16, "LoRA rank", min=1)
    lora_alpha: int = option(32, "LoRA alpha", min=1)
    lora_dropout: float = option(0.05, "LoRA dropout", min=0.0, max=1.0)
    lora_targets: tuple = option(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                                 "the LLM's modules LoRA adapts, comma-separated")
    freeze_vit: bool = option(True, "keep the DINO features as pretrained (the paper's frozen-ViT setting)",
                              flag="--freeze-vit/--train-vit")
    freeze_aggregator: bool = option(False, "keep the aggregator as it starts",
                                     flag="--freeze-aggregator/--train-aggregator")
    warmup: bool = option(False, "start the aggregator from warmup-3d (RUN/aggregator_warmup.pt)")
    ao2d: bool | None = option(None, "override the preset's Ao2D switch (the SAMF vs SAMF+Ao2D ablation)")
    slice_mix: bool | None = option(None, "override the preset's aggregator slice mix (each volume token also a "
                                          "learned mix of the slices); --no-slice-mix with --aux-weight 0 is the "
                                          "paper's recipe", flag="--slice-mix/--no-slice-mix")
    fusion: str | None = option(None, "override the fusion: samf (the paper's), or an ablation baseline: 2d (slices "
                                      "alone), 3d (aggregator alone), concat (both, no attention)",
                                choices=FUSION_MODES)
    tasks: str = option("both", "reports and multiple choice in one run, or one of them",
                        choices=TASKS)
    aux_weight: float = option(1.0, "weight of the auxiliary finding loss: a linear head on the averaged fused rows "
                                    "reads the data's abnormality labels (CT-RATE's 18). 0 with --no-slice-mix trains "
                                    "the paper's recipe exactly: the LLM's loss alone", min=0.0)
    mcq_fraction: float = option(0.3, "with --tasks both: the share of samples that are multiple-choice questions",
                                 min=0.0, max=1.0)
    precision: str = option("auto", "bf16 autocast, fp32, or auto: bf16 where the GPU has it",
                            choices=("auto", "fp32", "bf16"))
    grad_checkpointing: bool = option(False, "recompute the LLM's activations in backward (memory for time)",
                                      flag="--grad-checkpointing")
    zero: bool = option(False, "under torchrun: ZeRO stage 1, AdamW state sharded over the ranks", flag="--zero")
    save_every: int = option(100, "steps between resumable checkpoints", min=1)
    seed: int = option(0, "seed of the batches, the new weights and LoRA's dropout")
    loader_workers: int = option(2, "from a prepared cache: DataLoader processes reading scans", min=0)
    shuffle_buffer: int = option(256, "from a prepared cache: scans in each rank's shuffle buffer", min=1)
    embedding_cache: bool = option(True, "from a prepared cache with a frozen ViT: read its embeddings "
                                         "(samf-train embed) instead of running the ViT, when the cache has them",
                                   flag="--embedding-cache/--no-embedding-cache")
    extra: dict = field(default_factory=dict)


@dataclass
class ProbeConfig:
    """What ``samf-train probe`` reads and fits (:func:`samf.train.probe.run_probes`)."""

    train_limit: int = option(400, "training scans the probes are fitted on", min=10)
    test_limit: int = option(200, "held-out scans they are scored on (and the reports generated for)", min=2)
    reports: bool = option(True, "also generate and score the LLM's reports with real, zeroed and swapped image rows "
                                 "(the slowest part); --no-reports probes the image path only",
                           flag="--reports/--no-reports")
    seed: int = 0
