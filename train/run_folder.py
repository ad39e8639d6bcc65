"""The run folder: its layout, the model presets, the records every stage writes, and loading what the stages
before wrote into it.

Run folder::

    RUN/run.json           preset: preprocessing, model sizes (written by ``init_run``)
    RUN/tokenizer.model    SentencePiece (tiny LLM only; a real Phi-3 brings its own)
    RUN/vit_dino.pt        pretrain-2d: DINO teacher backbone
    RUN/aggregator_warmup.pt  warmup-3d: the aggregator after InfoNCE on frozen ViT embeddings
    RUN/lm_base/           pretrain-lm: the tiny Phi-3 taught the report language (stands in for Phi-3's
                           own pretraining; real runs start from Phi-3-mini instead)
    RUN/finetune/          finetune: LoRA adapter + image modules
    RUN/merged/            merge: plain HF checkpoint + samf_modules.pt + samf_config.json + preprocess.json
    RUN/metrics.jsonl      one JSON line per logged step or evaluation
    RUN/config/<stage>.json   the configuration each stage last ran with
    RUN/checkpoints/<stage>.pt  while a stage runs: its state every few steps, to resume after an interruption

The names are :mod:`samf.train.run_files`'s (written once there). The stages themselves: :mod:`samf.train.stages`
(tokenizer, pretrain-2d, warmup-3d, pretrain-lm), :mod:`samf.train.finetune` and :mod:`samf.train.merge`;
:mod:`samf.train.recipe` runs them in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict

import numpy as np
import torch

from samf.runtime.atomic import atomic_file

from .configs import PRESET_PREPROCESS
from .llm_folder import LLMTokenizer, read_llm_config
from .models import AggregatorConfig, FusionConfig, ViTConfig
from .run_files import (  # noqa: F401 - the names, importable from here too (the layout above)
    CONFIG_DIR,
    DINO_FILE,
    LM_BASE_DIR,
    METRICS_FILE,
    PREPROCESS_FILE,
    RUN_FILE,
    TRAINING_FILE,
    WARMUP_FILE,
    read_run,
)
from .vlm import ImageConfig, SamfVLM, TinyLLMConfig, load_phi3

# ------------------------------------------------------------------------------------------ presets



def _llm_width(llm_path: str) -> int:
    return int(read_llm_config(llm_path)["hidden_size"])


def tiny_preset(llm_path: str | None = None) -> dict:
    """Sizes for tests and the demo: minutes on 2 CPU cores, same classes as the paper's model. Without
    ``llm_path`` the LLM is a tiny Phi-3 built in-process; with one, that folder's model (fusion at its width)."""
    pre = PRESET_PREPROCESS["tiny"]
    llm = TinyLLMConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    if llm_path:
        llm = dataclasses.replace(llm, hidden_size=_llm_width(llm_path))
    image = ImageConfig(
        vit=ViTConfig(img_size=48, patch_size=8, in_chans=3, embed_dim=64, depth=3, num_heads=4),
        aggregator=AggregatorConfig(n_slices=pre.n_slices, n_tokens=8, dim=64, depth=2, num_heads=4,
                                    mlp_ratio=2.0, out_dim=64),
        fusion=FusionConfig(d2d=64, d3d=64, d_text=llm.hidden_size, d_proj=64, d_llm=llm.hidden_size, ao2d=True),
    )
    return dict(preprocess=pre.to_dict(), image=image.to_dict(), llm=None if llm_path else asdict(llm),
                llm_path=llm_path)


def paper_preset(llm_path: str) -> dict:
    """DINO ViT-B/16 at 224², 3×8 slices, 32 volume tokens, Phi-3-mini (3072 wide) from a local path."""
    pre = PRESET_PREPROCESS["paper"]
    width = _llm_width(llm_path)
    image = ImageConfig(aggregator=AggregatorConfig(n_slices=pre.n_slices),
                        fusion=FusionConfig(d_text=width, d_llm=width))
    # Batches that fit 16 GB at this size on a CPU (DINO's 32 images x 6 crops took 16.8 GB in one step); the
    # command line's --batch-size wins, and on GPUs --grad-accum or more ranks give the paper's batch back.
    stage_defaults = {"pretrain-2d": {"batch_size": 8}, "finetune": {"batch_size": 4}}
    return dict(preprocess=pre.to_dict(), image=image.to_dict(), llm=None, llm_path=llm_path,
                stage_defaults=stage_defaults)


def init_run(run_dir: str, preset: dict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, RUN_FILE), preset)


def write_json(path: str, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl (rank 0 only under DDP)."""

    def __init__(self, run_dir: str):
        from .distributed import is_main

        self.path = os.path.join(run_dir, METRICS_FILE)
        self.enabled = is_main()

    def __call__(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def write_stage_config(run_dir: str, stage: str, cfg, write: bool = True) -> dict:
    """RUN/config/<stage>.json: what this stage ran with (a dataclass or a dict), as JSON reads it back.

    ``write=False`` (the other ranks under torchrun) only returns it."""
    d = asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)
    d = json.loads(json.dumps(d, default=list))
    if not write:
        return d
    write_json(stage_config_path(run_dir, stage), d)
    return d


def stage_config_path(run_dir: str, stage: str) -> str:
    """RUN/config/<stage>.json (its folder made if missing)."""
    os.makedirs(os.path.join(run_dir, CONFIG_DIR), exist_ok=True)
    return os.path.join(run_dir, CONFIG_DIR, f"{stage}.json")


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero: the LM base's and fine-tune's schedule."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------- what earlier stages left

CALIBRATION_SCANS = 32


def calibration_sample(examples: list, n: int = CALIBRATION_SCANS) -> list:
    """The scans the slice-embedding standardisation is measured on: ``n`` spread evenly over the data. 32 scans
    give hundreds of slices, plenty for a per-dimension mean and std; the ViT-B/16 pass over 256 scans took
    about 25 minutes on a 2-core CPU."""
    return examples[:: max(1, len(examples) // n)][:n]


def llm_folder(run_dir: str, run: dict | None = None) -> str:
    """The run's base LLM: the LM base pretrain-lm wrote when there is one, else the user's local folder."""
    run = run or read_run(run_dir)
    lm_base = os.path.join(run_dir, LM_BASE_DIR)
    return lm_base if os.path.isdir(lm_base) or not run["llm_path"] else run["llm_path"]


def base_tokenizer(run_dir: str) -> LLMTokenizer:
    return LLMTokenizer(llm_folder(run_dir))


def build_vlm(run_dir: str, image_cfg: ImageConfig | None = None, tok: LLMTokenizer | None = None) -> SamfVLM:
    """The model before fine-tuning: DINO ViT (if pretrained), fresh aggregator/fusion, base LLM (``tok``: its
    tokenizer, when the caller has it loaded already)."""
    run = read_run(run_dir)
    folder = llm_folder(run_dir, run)
    tok = tok or LLMTokenizer(folder)
    vlm = SamfVLM(image_cfg or ImageConfig.from_dict(run["image"]), load_phi3(folder), tok.layout)
    dino = os.path.join(run_dir, DINO_FILE)
    if os.path.exists(dino):
        vlm.encoder.vit.load_state_dict(torch.load(dino, map_location="cpu", weights_only=True))
    return vlm
