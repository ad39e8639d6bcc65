"""Merge: LoRA folded into the LLM's weights, for export (:mod:`samf.export.bundle_writer`)."""

from __future__ import annotations

import os

from samf.runtime.atomic import atomic_dir

from .finetune import load_finetuned
from .run_folder import PREPROCESS_FILE, base_tokenizer, read_run, write_json


def stage_merge(run_dir: str) -> str:
    """Fold LoRA into the weights: a plain HF checkpoint that ``AutoModelForCausalLM`` loads, plus the
    image modules, the tokenizer and the preprocessing config beside it.

    The merged LLM keeps the base's dtype (bf16 for Phi-3-mini: 7.6 GB, not 15 GB in fp32)."""
    run = read_run(run_dir)
    vlm = load_finetuned(run_dir)
    vlm.llm = vlm.llm.merge_and_unload()
    out = os.path.join(run_dir, "merged")

    with atomic_dir(out) as d:
        vlm.llm.save_pretrained(d, safe_serialization=True)
        vlm.save_image_modules(d)
        base_tokenizer(run_dir).save_to(d)
        write_json(os.path.join(d, PREPROCESS_FILE), run["preprocess"])
    return out
