"""The stages before fine-tuning, each over one run folder (:mod:`samf.train.run_folder`): the tokenizer,
DINO on slices (pretrain-2d), the InfoNCE warm-up of the aggregator (warmup-3d) and the LM base
(pretrain-lm). Each reads what the previous wrote and writes atomically.

Multi-GPU: pretrain-2d and finetune, the two stages whose cost grows with the data, run under ``torchrun``
(DDP; see :mod:`samf.train.distributed`); the same code runs single-process on CPU. warmup-3d and pretrain-lm
run in one process (on the GPU where there is one).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict

import numpy as np
import torch

from samf.runtime.atomic import atomic_dir, atomic_file
from samf.runtime.inference.prompt import REPORT_REQUESTS
from samf.runtime.progress import progress_bar

from .configs import LMConfig, TokenizerConfig
from .distributed import owns_process_group
from .llm_folder import LLMTokenizer, save_sentencepiece_folder
from .run_files import DINO_FILE, LM_BASE_DIR, TOKENIZER_DIR, TOKENIZER_MODEL, WARMUP_FILE
from .run_folder import (
    MetricsLog,
    calibration_sample,
    cosine_lr,
    read_run,
    write_stage_config,
)
from .tokenizer import train_tokenizer
from .vlm import ImageConfig, TinyLLMConfig, build_phi3, load_phi3, mcq_sample, prompt_ids

# ------------------------------------------------------------------------------------- tokenizer

def stage_tokenizer(run_dir: str, texts: list, vocab_size: int = TokenizerConfig.vocab_size):
    """The tiny LLM's SentencePiece tokenizer, as RUN/tokenizer.model and as a Hugging Face tokenizer folder
    (RUN/tokenizer/) that pretrain-lm puts beside the LM base's config, the way the hub ships Phi-3."""
    sp = train_tokenizer(texts, os.path.join(run_dir, TOKENIZER_MODEL), vocab_size)
    with atomic_dir(os.path.join(run_dir, TOKENIZER_DIR)) as d:
        save_sentencepiece_folder(os.path.join(run_dir, TOKENIZER_MODEL), d)
    return sp


# ------------------------------------------------------------------------------------ pretrain-2d

@owns_process_group
def stage_pretrain_2d(run_dir: str, examples: list, cfg, dino_weights: str | None = None,
                      progress: bool = True, restart: bool = False) -> list:
    """DINO on every slice of ``examples`` (all three planes); the ViT goes to RUN/vit_dino.pt atomically.

    ``cfg`` is a :class:`samf.train.dino.DinoConfig`; ``dino_weights`` a published DINO checkpoint to start
    from. Returns the loss per step.
    """
    from .checkpoint import StageCheckpoint
    from .dino import pretrain_dino
    from .distributed import DistributedContext
    from .models import VisionTransformer, load_dino_weights

    dist = DistributedContext.from_env()
    torch.manual_seed(cfg.seed)  # the ViT's initial weights, the same on every rank and every run
    vit = VisionTransformer(ImageConfig.from_dict(read_run(run_dir)["image"]).vit)
    if dino_weights:
        load_dino_weights(vit, dino_weights)
    conf = write_stage_config(run_dir, "pretrain-2d", {**asdict(cfg), "dino_weights": dino_weights},
                              write=dist.is_main)
    ckpt = StageCheckpoint(run_dir, "pretrain-2d", conf, every=cfg.save_every, restart=restart and dist.is_main)
    dist.barrier()
    from .scan_cache import CachedSlices, CachedSplit

    cached = isinstance(examples, CachedSplit)  # a cache's slices are read as they are drawn
    slices = CachedSlices(examples) if cached else np.concatenate([e.slices for e in examples])
    losses = pretrain_dino(vit, slices, cfg, progress=progress, log=MetricsLog(run_dir), ckpt=ckpt, dist=dist)
    if dist.is_main:
        with atomic_file(os.path.join(run_dir, DINO_FILE), "wb") as f:
            torch.save(vit.state_dict(), f)
        ckpt.clear()
    dist.barrier()
    return losses


# -------------------------------------------------------------------------------------- warmup-3d

def pretrained_image_encoder(run_dir: str, image_cfg: ImageConfig | None = None):
    """The image encoder with the run's DINO ViT (RUN/vit_dino.pt) when pretrain-2d wrote one."""
    from .models import ImageEncoder

    image_cfg = image_cfg or ImageConfig.from_dict(read_run(run_dir)["image"])
    enc = ImageEncoder(image_cfg.vit, image_cfg.aggregator)
    dino = os.path.join(run_dir, DINO_FILE)
    if os.path.exists(dino):
        enc.vit.load_state_dict(torch.load(dino, map_location="cpu", weights_only=True))
    return enc


def stage_warmup_3d(run_dir: str, examples: list, cfg=None, progress: bool = True) -> list:
    """InfoNCE warm-up of the aggregator on frozen (DINO) ViT embeddings -> RUN/aggregator_warmup.pt.

    See :mod:`samf.train.warmup` for which pairs are positives. Short and cheap (the ViT runs once per
    slice), so it restarts rather than resumes.
    """
    from .distributed import single_process_device
    from .warmup import WarmupConfig, warmup_aggregator

    dev = single_process_device("warmup-3d")
    cfg = cfg or WarmupConfig()
    write_stage_config(run_dir, "warmup-3d", cfg)
    run = read_run(run_dir)
    torch.manual_seed(cfg.seed)  # the aggregator's initial weights (and the ViT's when there is no DINO run)
    enc = pretrained_image_encoder(run_dir).eval()
    enc.calibrate(torch.from_numpy(ex.slices) for ex in calibration_sample(examples))
    enc.to(dev)
    with torch.no_grad():
        z2d = torch.stack([enc.embed_slices(torch.from_numpy(ex.slices).to(dev)) for ex in examples])
    losses = warmup_aggregator(enc.aggregator, z2d, run["preprocess"]["slices_per_plane"], cfg,
                               progress=progress, log=MetricsLog(run_dir))
    with atomic_file(os.path.join(run_dir, WARMUP_FILE), "wb") as f:
        torch.save({"aggregator": enc.aggregator.cpu().state_dict()}, f)
    return losses


# -------------------------------------------------------------------------------------- LM base

def _lm_samples(examples, tok: LLMTokenizer) -> list:
    """(prompt ids, answer ids) pairs for every report and question in ``examples``."""
    out = []
    for ex in examples:
        for req in REPORT_REQUESTS:
            out.append((prompt_ids(tok, req), tok.encode(ex.report)))
        for q in ex.questions:
            out.append(mcq_sample(tok, q))
    return out


def stage_pretrain_lm(run_dir: str, examples: list, cfg: LMConfig, progress: bool = True) -> list:
    """Teach the LLM the report language in the prompt layout (text only, full parameters) -> RUN/lm_base,
    which later stages then start from: the randomly initialised tiny Phi-3, or the run's own LLM folder."""
    from .distributed import single_process_device

    dev = single_process_device("pretrain-lm")
    run = read_run(run_dir)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if run["llm_path"]:  # continue a given model's pretraining on the report language
        llm, tok = load_phi3(run["llm_path"]).float(), LLMTokenizer(run["llm_path"])
    else:
        tok_dir = os.path.join(run_dir, TOKENIZER_DIR)
        llm = build_phi3(len(LLMTokenizer.hf_tokenizer(tok_dir)), TinyLLMConfig(**run["llm"]))
        tok = LLMTokenizer(tok_dir, config=llm.config.to_dict())
    llm.to(dev).train()
    lay = tok.layout
    samples = _lm_samples(examples, tok)
    opt = torch.optim.AdamW(llm.parameters(), lr=cfg.lr, weight_decay=0.01)
    log, losses = MetricsLog(run_dir), []
    bar = progress_bar(range(cfg.steps), desc="pretrain-lm", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, max(1, cfg.steps // 20))
        batch = [rng.choice(samples) for _ in range(cfg.batch_size)]
        seqs = [lay.head() + lay.tail(p) + a + [lay.answer_end] for p, a in batch]  # the layout, no image
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), lay.pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        lab = torch.full_like(ids, -100)
        for i, ((p, a), s) in enumerate(zip(batch, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            lab[i, len(s) - len(a) - 1: len(s)] = torch.tensor(a + [lay.answer_end])
        loss = llm(input_ids=ids.to(dev), attention_mask=att.to(dev), labels=lab.to(dev)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        log({"stage": "pretrain-lm", "step": step, "loss": losses[-1]})
    with atomic_dir(os.path.join(run_dir, LM_BASE_DIR)) as d:
        llm.cpu().save_pretrained(d)
        tok.save_to(d)
    return losses
