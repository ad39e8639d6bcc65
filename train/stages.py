"""Training stages over one run folder; each reads what the previous wrote and writes atomically.

Run folder::

    RUN/run.json           preset: preprocessing, model sizes (written by ``init_run``)
    RUN/tokenizer.model    SentencePiece (tiny LLM only; a real Phi-3 brings its own)
    RUN/vit_dino.pt        pretrain-2d: DINO teacher backbone
    RUN/lm_base/           pretrain-lm: the tiny Phi-3 taught the report language (stands in for Phi-3's
                           own pretraining; real runs start from Phi-3-mini instead)
    RUN/finetune/          finetune: LoRA adapter + image modules
    RUN/merged/            merge: plain HF checkpoint + samf_modules.pt + samf_config.json + preprocess.json
    RUN/metrics.jsonl      one JSON line per logged step or evaluation
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from samf.runtime.atomic import atomic_dir, atomic_file
from samf.runtime.preprocess import PreprocessConfig
from samf.runtime.prompt import REPORT_REQUESTS, format_prompt, mcq_answer, mcq_prompt, report_prompt

from .models import AggregatorConfig, FusionConfig, ViTConfig
from .tokenizer import BOS, EOS, load_tokenizer, train_tokenizer
from .vlm import ImageConfig, SamfVLM, TinyLLMConfig, build_phi3, load_phi3

PREPROCESS_FILE = "preprocess.json"


# ------------------------------------------------------------------------------------------ presets

def tiny_preset() -> dict:
    """Sizes for tests and the demo: minutes on 2 CPU cores, same classes as the paper's model."""
    pre = PreprocessConfig(image_size=48, pixel_spacing_mm=8.0, slices_per_plane=6)
    llm = TinyLLMConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    image = ImageConfig(
        vit=ViTConfig(img_size=48, patch_size=8, in_chans=3, embed_dim=64, depth=3, num_heads=4),
        aggregator=AggregatorConfig(n_slices=pre.n_slices, n_tokens=8, dim=64, depth=2, num_heads=4,
                                    mlp_ratio=2.0, out_dim=64),
        fusion=FusionConfig(d2d=64, d3d=64, d_text=llm.hidden_size, d_proj=64, d_llm=llm.hidden_size, ao2d=True),
    )
    return dict(preprocess=pre.to_dict(), image=image.to_dict(), llm=asdict(llm), llm_path=None)


def paper_preset(llm_path: str) -> dict:
    """DINO ViT-B/16 at 224², 3×8 slices, 32 volume tokens, Phi-3-mini (3072 wide) from a local path."""
    pre = PreprocessConfig(image_size=224, pixel_spacing_mm=1.5, slices_per_plane=8)
    image = ImageConfig(aggregator=AggregatorConfig(n_slices=pre.n_slices))
    return dict(preprocess=pre.to_dict(), image=image.to_dict(), llm=None, llm_path=llm_path)


def init_run(run_dir: str, preset: dict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, "run.json"), preset)


def read_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")

    def __call__(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------- tokenizer

def stage_tokenizer(run_dir: str, texts: list, vocab_size: int = 1000):
    return train_tokenizer(texts, os.path.join(run_dir, "tokenizer.model"), vocab_size)


# ------------------------------------------------------------------------------------ pretrain-2d

def stage_pretrain_2d(run_dir: str, examples: list, cfg, dino_weights: str | None = None,
                      progress: bool = True) -> list:
    """DINO on every slice of ``examples`` (all three planes); the ViT goes to RUN/vit_dino.pt atomically.

    ``cfg`` is a :class:`samf.train.dino.DinoConfig`; ``dino_weights`` a published DINO checkpoint to start
    from. Returns the loss per step.
    """
    from .dino import pretrain_dino
    from .models import VisionTransformer, load_dino_weights

    vit = VisionTransformer(ImageConfig.from_dict(read_run(run_dir)["image"]).vit)
    if dino_weights:
        load_dino_weights(vit, dino_weights)
    slices = np.concatenate([e.slices for e in examples])
    losses = pretrain_dino(vit, slices, cfg, progress=progress, log=MetricsLog(run_dir))
    with atomic_file(os.path.join(run_dir, "vit_dino.pt"), "wb") as f:
        torch.save(vit.state_dict(), f)
    return losses


# -------------------------------------------------------------------------------------- LM base

@dataclass
class LMConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def _lm_samples(examples, sp) -> list:
    """(prompt ids, answer ids) pairs for every report and question in ``examples``."""
    out = []
    for ex in examples:
        for req in REPORT_REQUESTS:
            out.append((sp.encode(format_prompt(req)), sp.encode(ex.report)))
        for q in ex.questions:
            out.append((sp.encode(mcq_prompt(q["question"], q["choices"])),
                        sp.encode(mcq_answer(q["answer"], q["choices"]))))
    return out


def stage_pretrain_lm(run_dir: str, examples: list, cfg: LMConfig, progress: bool = True) -> list:
    """Teach the randomly initialised tiny Phi-3 the report language (text only), full parameters."""
    run = read_run(run_dir)
    sp = load_tokenizer(os.path.join(run_dir, "tokenizer.model"))
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    llm = build_phi3(sp.vocab_size(), TinyLLMConfig(**run["llm"]))
    llm.train()
    samples = _lm_samples(examples, sp)
    opt = torch.optim.AdamW(llm.parameters(), lr=cfg.lr, weight_decay=0.01)
    log, losses = MetricsLog(run_dir), []
    bar = tqdm(range(cfg.steps), desc="pretrain-lm", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.steps, cfg.lr, max(1, cfg.steps // 20))
        batch = [rng.choice(samples) for _ in range(cfg.batch_size)]
        seqs = [[BOS] + p + a + [EOS] for p, a in batch]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), EOS, dtype=torch.long)
        att = torch.zeros_like(ids)
        lab = torch.full_like(ids, -100)
        for i, ((p, a), s) in enumerate(zip(batch, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            lab[i, 1 + len(p): len(s)] = torch.tensor(a + [EOS])
        loss = llm(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        log({"stage": "pretrain-lm", "step": step, "loss": losses[-1]})
    with atomic_dir(os.path.join(run_dir, "lm_base")) as d:
        llm.save_pretrained(d)
    return losses


# -------------------------------------------------------------------------------------- finetune

@dataclass
class FinetuneConfig:
    steps: int = 400
    batch_size: int = 16
    lr: float = 2e-3              # image modules and LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    freeze_vit: bool = True       # DINO features kept as pretrained (the paper's frozen-ViT setting)
    mcq_fraction: float = 0.3     # share of samples that are multiple-choice questions
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _base_llm(run_dir: str, run: dict):
    return load_phi3(run["llm_path"] or os.path.join(run_dir, "lm_base"))


def build_vlm(run_dir: str) -> SamfVLM:
    """The model before fine-tuning: DINO ViT (if pretrained), fresh aggregator/fusion, base LLM."""
    run = read_run(run_dir)
    vlm = SamfVLM(ImageConfig.from_dict(run["image"]), _base_llm(run_dir, run))
    dino = os.path.join(run_dir, "vit_dino.pt")
    if os.path.exists(dino):
        vlm.encoder.vit.load_state_dict(torch.load(dino, map_location="cpu", weights_only=True))
    return vlm


def _task_sample(ex, sp, rng: random.Random, mcq_fraction: float):
    if ex.questions and rng.random() < mcq_fraction:
        q = rng.choice(ex.questions)
        return sp.encode(mcq_prompt(q["question"], q["choices"])), sp.encode(mcq_answer(q["answer"], q["choices"]))
    return sp.encode(format_prompt(rng.choice(REPORT_REQUESTS))), sp.encode(ex.report)


def stage_finetune(run_dir: str, examples: list, cfg: FinetuneConfig, progress: bool = True) -> list:
    """SAMF (+Ao2D) into Phi-3 with LoRA (peft); image modules trained fully, ViT unless frozen."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    sp = load_tokenizer(os.path.join(run_dir, "tokenizer.model"))
    vlm = build_vlm(run_dir)
    for p in vlm.llm.parameters():
        p.requires_grad_(False)
    vlm.llm = get_peft_model(vlm.llm, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))
    if cfg.freeze_vit:
        for p in vlm.encoder.vit.parameters():
            p.requires_grad_(False)
    vlm.encoder.calibrate(torch.from_numpy(ex.slices) for ex in examples[:256])
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    vlm.train()
    log, losses = MetricsLog(run_dir), []
    bar = tqdm(range(cfg.steps), desc="finetune (SAMF+LoRA)", disable=not progress)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.steps, cfg.lr, max(1, cfg.steps // 20))
        batch = [rng.choice(examples) for _ in range(cfg.batch_size)]
        slices = torch.from_numpy(np.stack([ex.slices for ex in batch]))
        prompts, answers = zip(*[_task_sample(ex, sp, rng, cfg.mcq_fraction) for ex in batch])
        loss = vlm(slices, list(prompts), list(answers))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        rate = (step + 1) * cfg.batch_size / (time.time() - t0)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", scans_s=f"{rate:.1f}")
        log({"stage": "finetune", "step": step, "loss": losses[-1]})

    with atomic_dir(os.path.join(run_dir, "finetune")) as d:
        vlm.llm.save_pretrained(d)
        vlm.save_image_modules(d)
    return losses


def load_finetuned(run_dir: str) -> SamfVLM:
    """Base LLM + LoRA adapter + fine-tuned image modules, as ``stage_finetune`` left them."""
    from peft import PeftModel

    vlm = build_vlm(run_dir)
    ft = os.path.join(run_dir, "finetune")
    vlm.llm = PeftModel.from_pretrained(vlm.llm, ft)
    state = torch.load(os.path.join(ft, "samf_modules.pt"), map_location="cpu", weights_only=True)
    vlm.encoder.load_state_dict(state["encoder"])
    vlm.fusion.load_state_dict(state["fusion"])
    return vlm.eval()


# ----------------------------------------------------------------------------------------- merge

def stage_merge(run_dir: str) -> str:
    """Fold LoRA into the weights: a plain HF checkpoint that ``AutoModelForCausalLM`` loads, plus the
    image modules, the tokenizer and the preprocessing config beside it."""
    run = read_run(run_dir)
    vlm = load_finetuned(run_dir)
    vlm.llm = vlm.llm.merge_and_unload()
    out = os.path.join(run_dir, "merged")

    with atomic_dir(out) as d:
        vlm.llm.save_pretrained(d, safe_serialization=True)
        vlm.save_image_modules(d)
        tok = os.path.join(run_dir, "tokenizer.model")
        if os.path.exists(tok):
            shutil.copy(tok, os.path.join(d, "tokenizer.model"))
        _write_json(os.path.join(d, PREPROCESS_FILE), run["preprocess"])
    return out


# -------------------------------------------------------------------------------------- evaluate

def generate_reports(vlm: SamfVLM, sp, examples: list, zero_image: bool = False, progress: bool = True,
                     max_new_tokens: int = 96) -> list:
    """Greedy reports from the PyTorch model (the reference pipeline) for each example."""
    prompt = sp.encode(report_prompt(0))
    out = []
    for ex in tqdm(examples, desc="generate (torch)", disable=not progress):
        ids = vlm.generate(torch.from_numpy(ex.slices), prompt, max_new_tokens, zero_image=zero_image)
        out.append(sp.decode(ids))
    return out


def generate_mcq(vlm: SamfVLM, sp, examples: list, zero_image: bool = False) -> tuple:
    answers, letters = [], []
    for ex in examples:
        for q in ex.questions:
            ids = vlm.generate(torch.from_numpy(ex.slices), sp.encode(mcq_prompt(q["question"], q["choices"])),
                               24, zero_image=zero_image)
            answers.append(sp.decode(ids))
            letters.append(q["answer"])
    return answers, letters
