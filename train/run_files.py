"""The names of what a run folder and a checkpoint folder hold, written once: every module that builds one of these
paths (training, the export, the command lines, the tests) takes the name from here, and
``tests/test_config_defaults.py`` checks that none writes it again.

No imports but the standard library's: :mod:`samf.train.run_folder` (the layout, described there),
:mod:`samf.train.vlm` and :mod:`samf.train.llm_folder`, which it imports, all read these.
"""

import json
import os

# RUN/: what the stages write.
RUN_FILE = "run.json"                  # the preset: preprocessing, model sizes (init)
TOKENIZER_MODEL = "tokenizer.model"    # SentencePiece: RUN/ (tokenizer), and any LLM folder's own
TOKENIZER_DIR = "tokenizer"            # RUN/tokenizer/: the same tokenizer as a Hugging Face folder
DINO_FILE = "vit_dino.pt"              # pretrain-2d: the DINO teacher's backbone
WARMUP_FILE = "aggregator_warmup.pt"   # warmup-3d: the aggregator after InfoNCE
LM_BASE_DIR = "lm_base"                # pretrain-lm: the tiny Phi-3 taught the report language
FINETUNE_DIR = "finetune"              # finetune: the LoRA adapter and the image modules
MERGED_DIR = "merged"                  # merge: the plain checkpoint the export reads
METRICS_FILE = "metrics.jsonl"         # one JSON line per logged step
CONFIG_DIR = "config"                  # config/<stage>.json: what each stage last ran with
CHECKPOINTS_DIR = "checkpoints"        # checkpoints/<stage>.pt: a running stage's state
PROBE_FILE = "probe.json"              # samf-train probe

# RUN/finetune/ and RUN/merged/: the image modules beside the LLM; merged/ also the preprocessing and the switches.
MODULES_FILE = "samf_modules.pt"
MODULES_CONFIG = "samf_config.json"
PREPROCESS_FILE = "preprocess.json"
TRAINING_FILE = "training.json"        # the recipe's switches, carried into the bundle's manifest


def eval_file(split: str) -> str:
    """RUN/eval_<split>.json: samf-train evaluate's results on that split."""
    return f"eval_{split}.json"


def read_run(run_dir: str) -> dict:
    """RUN/run.json: the preset the run started with (read without torch: `samf-train prepare` starts fast)."""
    with open(os.path.join(run_dir, RUN_FILE)) as f:
        return json.load(f)
