"""Merge: LoRA folded into the LLM's weights, for export (:mod:`samf.export.bundle_writer`)."""

from __future__ import annotations

import json
import os

from samf.runtime.atomic import atomic_dir

from .finetune import load_finetuned
from .run_files import CONFIG_DIR, MERGED_DIR, PREPROCESS_FILE, TRAINING_FILE
from .run_folder import base_tokenizer, read_run, write_json


def stage_merge(run_dir: str) -> str:
    """Fold LoRA into the weights: a plain HF checkpoint that ``AutoModelForCausalLM`` loads, plus the
    image modules, the tokenizer and the preprocessing config beside it.

    The merged LLM keeps the base's dtype (bf16 for Phi-3-mini: 7.6 GB, not 15 GB in fp32)."""
    run = read_run(run_dir)
    vlm = load_finetuned(run_dir)
    vlm.llm = vlm.llm.merge_and_unload()
    out = os.path.join(run_dir, MERGED_DIR)

    with atomic_dir(out) as d:
        vlm.llm.save_pretrained(d, safe_serialization=True)
        vlm.save_image_modules(d)
        base_tokenizer(run_dir).save_to(d)
        write_json(os.path.join(d, PREPROCESS_FILE), run["preprocess"])
        write_json(os.path.join(d, TRAINING_FILE), training_record(run_dir))
    return out


def training_record(run_dir: str) -> dict:
    """What the bundle's manifest says of training: the recipe switches fine-tuning ran with (its auxiliary
    finding loss, Ao2D, what was frozen, the tasks, steps), so a reader can tell the paper's recipe from ours."""
    path = os.path.join(run_dir, CONFIG_DIR, "finetune.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        ft = json.load(f)
    keys = ("aux_weight", "slice_mix", "fusion", "ao2d", "freeze_vit", "freeze_aggregator", "warmup", "tasks", "steps",
            "batch_size", "lr", "seed")
    return {"finetune": {k: ft.get(k) for k in keys if k in ft}}
