"""Training stages over one run folder; each reads what the previous wrote and writes atomically.

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

Multi-GPU: pretrain-2d and finetune, the two stages whose cost grows with the data, run under ``torchrun``
(DDP; see :mod:`samf.train.distributed`); the same code runs single-process on CPU. warmup-3d and pretrain-lm
run in one process (on the GPU where there is one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from samf.runtime.atomic import atomic_dir, atomic_file
from samf.runtime.preprocess import PreprocessConfig
from samf.runtime.progress import progress_bar
from samf.runtime.prompt import REPORT_REQUESTS, mcq_answer, mcq_request

from .distributed import owns_process_group
from .llm_folder import LLMTokenizer, read_llm_config, save_sentencepiece_folder
from .models import AggregatorConfig, FusionConfig, ViTConfig
from .tokenizer import train_tokenizer
from .vlm import ImageConfig, SamfVLM, TinyLLMConfig, build_phi3, load_phi3, prompt_ids

PREPROCESS_FILE = "preprocess.json"


# ------------------------------------------------------------------------------------------ presets

def _llm_width(llm_path: str) -> int:
    return int(read_llm_config(llm_path)["hidden_size"])


def tiny_preset(llm_path: str | None = None) -> dict:
    """Sizes for tests and the demo: minutes on 2 CPU cores, same classes as the paper's model. Without
    ``llm_path`` the LLM is a tiny Phi-3 built in-process; with one, that folder's model (fusion at its width)."""
    pre = PreprocessConfig(image_size=48, pixel_spacing_mm=8.0, slices_per_plane=6)
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
    pre = PreprocessConfig(image_size=224, pixel_spacing_mm=1.5, slices_per_plane=8)
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
    _write_json(os.path.join(run_dir, "run.json"), preset)


def read_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl (rank 0 only under DDP)."""

    def __init__(self, run_dir: str):
        from .distributed import is_main

        self.path = os.path.join(run_dir, "metrics.jsonl")
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
    os.makedirs(os.path.join(run_dir, "config"), exist_ok=True)
    _write_json(os.path.join(run_dir, "config", f"{stage}.json"), d)
    return d


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------- tokenizer

TOKENIZER_DIR = "tokenizer"


def stage_tokenizer(run_dir: str, texts: list, vocab_size: int = 1000):
    """The tiny LLM's SentencePiece tokenizer, as RUN/tokenizer.model and as a Hugging Face tokenizer folder
    (RUN/tokenizer/) that pretrain-lm puts beside the LM base's config, the way the hub ships Phi-3."""
    sp = train_tokenizer(texts, os.path.join(run_dir, "tokenizer.model"), vocab_size)
    with atomic_dir(os.path.join(run_dir, TOKENIZER_DIR)) as d:
        save_sentencepiece_folder(os.path.join(run_dir, "tokenizer.model"), d)
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
    slices = np.concatenate([e.slices for e in examples])
    losses = pretrain_dino(vit, slices, cfg, progress=progress, log=MetricsLog(run_dir), ckpt=ckpt, dist=dist)
    if dist.is_main:
        with atomic_file(os.path.join(run_dir, "vit_dino.pt"), "wb") as f:
            torch.save(vit.state_dict(), f)
        ckpt.clear()
    dist.barrier()
    return losses


# -------------------------------------------------------------------------------------- warmup-3d

CALIBRATION_SCANS = 32


def calibration_sample(examples: list, n: int = CALIBRATION_SCANS) -> list:
    """The scans the slice-embedding standardisation is measured on: ``n`` spread evenly over the data. 32 scans
    give hundreds of slices, plenty for a per-dimension mean and std; the ViT-B/16 pass over 256 scans took
    about 25 minutes on a 2-core CPU."""
    return examples[:: max(1, len(examples) // n)][:n]


WARMUP_FILE = "aggregator_warmup.pt"


def _image_encoder(run_dir: str, image_cfg: ImageConfig | None = None):
    from .models import ImageEncoder

    image_cfg = image_cfg or ImageConfig.from_dict(read_run(run_dir)["image"])
    enc = ImageEncoder(image_cfg.vit, image_cfg.aggregator)
    dino = os.path.join(run_dir, "vit_dino.pt")
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
    enc = _image_encoder(run_dir).eval()
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

@dataclass
class LMConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def _lm_samples(examples, tok: LLMTokenizer) -> list:
    """(prompt ids, answer ids) pairs for every report and question in ``examples``."""
    out = []
    for ex in examples:
        for req in REPORT_REQUESTS:
            out.append((prompt_ids(tok, req), tok.encode(ex.report)))
        for q in ex.questions:
            out.append(_mcq_sample(tok, q))
    return out


def _mcq_sample(tok: LLMTokenizer, q: dict) -> tuple:
    """(prompt ids, answer ids) of a multiple-choice question."""
    return prompt_ids(tok, mcq_request(q["question"], q["choices"])), tok.encode(mcq_answer(q["answer"], q["choices"]))


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
            g["lr"] = _cosine_lr(step, cfg.steps, cfg.lr, max(1, cfg.steps // 20))
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
    with atomic_dir(os.path.join(run_dir, "lm_base")) as d:
        llm.cpu().save_pretrained(d)
        tok.save_to(d)
    return losses


# -------------------------------------------------------------------------------------- finetune

@dataclass
class FinetuneConfig:
    steps: int = 400
    batch_size: int = 16
    grad_accum: int = 1           # micro-batches per optimizer step (effective batch = batch_size × grad_accum × ranks)
    lr: float = 2e-3              # fusion, aggregator and LoRA
    vit_lr: float = 1e-4          # the ViT when trained: at ``lr`` its DINO features are lost in a few hundred
                                  # steps and every scan gets the same report (the ablation showed it)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    freeze_vit: bool = True       # DINO features kept as pretrained (the paper's frozen-ViT setting)
    freeze_aggregator: bool = False
    warmup: bool = False          # start the aggregator from warmup-3d (RUN/aggregator_warmup.pt)
    ao2d: bool | None = None      # override the preset's Ao2D switch (the SAMF vs SAMF+Ao2D ablation)
    tasks: str = "both"           # "both" (reports and multiple choice in one run), "report" or "mcq"
    mcq_fraction: float = 0.3     # with tasks="both": share of samples that are multiple-choice questions
    precision: str = "auto"       # "fp32", "bf16" (autocast) or "auto": bf16 where the GPU has it
    grad_checkpointing: bool = False  # recompute the LLM's activations in backward (memory for time)
    zero: bool = False            # under torchrun: ZeRO stage 1, AdamW state sharded over the ranks
    save_every: int = 100         # steps between resumable checkpoints
    seed: int = 0
    extra: dict = field(default_factory=dict)


def llm_folder(run_dir: str, run: dict | None = None) -> str:
    """The run's base LLM: the LM base pretrain-lm wrote when there is one, else the user's local folder."""
    run = run or read_run(run_dir)
    lm_base = os.path.join(run_dir, "lm_base")
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
    dino = os.path.join(run_dir, "vit_dino.pt")
    if os.path.exists(dino):
        vlm.encoder.vit.load_state_dict(torch.load(dino, map_location="cpu", weights_only=True))
    return vlm


def _task_sample(ex, tok: LLMTokenizer, rng: random.Random, mcq_fraction: float):
    if ex.questions and rng.random() < mcq_fraction:
        return _mcq_sample(tok, rng.choice(ex.questions))
    return prompt_ids(tok, rng.choice(REPORT_REQUESTS)), tok.encode(ex.report)


def finetune_image_config(run_dir: str, cfg: FinetuneConfig) -> ImageConfig:
    image_cfg = ImageConfig.from_dict(read_run(run_dir)["image"])
    if cfg.ao2d is not None:
        image_cfg.fusion = dataclasses.replace(image_cfg.fusion, ao2d=bool(cfg.ao2d))
    return image_cfg


def _autocast(precision: str, device: torch.device):
    """bf16 autocast where asked (or, with "auto", where the GPU supports it); fp32 otherwise."""
    use = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use), use


@owns_process_group
def stage_finetune(run_dir: str, examples: list, cfg: FinetuneConfig, progress: bool = True,
                   restart: bool = False) -> list:
    """SAMF (+Ao2D) into Phi-3 with LoRA (peft); image modules trained fully, ViT/aggregator unless frozen.

    Loss only on answer tokens (:meth:`SamfVLM.forward`). Resumes from RUN/checkpoints/finetune.pt when
    one of the same configuration exists. Under ``torchrun`` each rank draws its own batches and DDP
    averages the gradients; rank 0 writes.
    """
    from peft import LoraConfig, get_peft_model

    from .checkpoint import StageCheckpoint, own_rng_state, rng_state, set_rng_state
    from .distributed import DistributedContext

    if cfg.tasks not in ("both", "report", "mcq"):
        raise ValueError(f"tasks must be both, report or mcq, not {cfg.tasks!r}")
    dist = DistributedContext.from_env()
    conf = write_stage_config(run_dir, "finetune", cfg, write=dist.is_main)
    ckpt = StageCheckpoint(run_dir, "finetune", conf, every=cfg.save_every, restart=restart and dist.is_main)
    dist.barrier()  # no rank may read a checkpoint that rank 0 is about to clear
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed * 1000 + dist.rank)
    mcq_fraction = {"both": cfg.mcq_fraction, "report": 0.0, "mcq": 1.0}[cfg.tasks]
    if cfg.tasks == "mcq" and not any(ex.questions for ex in examples):
        raise ValueError("tasks='mcq' but the training data has no multiple-choice questions")
    tok = base_tokenizer(run_dir)
    vlm = build_vlm(run_dir, finetune_image_config(run_dir, cfg), tok)
    if cfg.warmup:
        path = os.path.join(run_dir, WARMUP_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} (run samf-train warmup-3d first, or finetune without --warmup)")
        vlm.encoder.aggregator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["aggregator"])
    autocast, bf16 = _autocast(cfg.precision, dist.device)
    if not bf16:  # a bf16 base (Phi-3-mini) trains in fp32 unless bf16 autocast was chosen
        vlm.llm.float()
    for p in vlm.llm.parameters():
        p.requires_grad_(False)
    # peft keeps the LoRA weights in fp32 over a bf16 base (autocast_adapter_dtype, its default)
    vlm.llm = get_peft_model(vlm.llm, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))
    if cfg.grad_checkpointing:
        vlm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for frozen, module in ((cfg.freeze_vit, vlm.encoder.vit), (cfg.freeze_aggregator, vlm.encoder.aggregator)):
        if frozen:
            for p in module.parameters():
                p.requires_grad_(False)
    vlm.encoder.calibrate(torch.from_numpy(ex.slices) for ex in calibration_sample(examples))
    vlm.to(dist.device)
    params = [p for p in vlm.parameters() if p.requires_grad]
    vit_ids = {id(p) for p in vlm.encoder.vit.parameters()}
    groups = [{"params": [p for p in params if id(p) not in vit_ids], "base_lr": cfg.lr},
              {"params": [p for p in params if id(p) in vit_ids], "base_lr": cfg.vit_lr}]
    opt = dist.optimizer([g for g in groups if g["params"]], zero=cfg.zero, lr=cfg.lr, weight_decay=0.01)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    losses, start = [], 0
    state = ckpt.load()
    if state is not None:
        vlm.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        losses, start = state["losses"], state["step"]
        own = own_rng_state(state["rng"], dist.rank, dist.world_size)
        if own:  # each rank continues its own stream where it stopped
            set_rng_state(own, rng)
        else:  # saved with another number of ranks: each rank starts a fresh stream, reproducibly
            rng.seed(hash((cfg.seed, dist.rank, start)))
    model = dist.wrap(vlm)
    vlm.train()
    log = MetricsLog(run_dir)
    bar = progress_bar(range(start, cfg.steps), desc="finetune (SAMF+LoRA)", disable=not (progress and dist.is_main),
               initial=start, total=cfg.steps)
    t0, seen = time.time(), 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.steps, g["base_lr"], max(1, cfg.steps // 20))
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            batch = [rng.choice(examples) for _ in range(cfg.batch_size)]
            slices = torch.from_numpy(np.stack([ex.slices for ex in batch])).to(dist.device)
            prompts, answers = zip(*[_task_sample(ex, tok, rng, mcq_fraction) for ex in batch])
            with autocast, dist.no_sync_unless(model, micro == cfg.grad_accum - 1):
                loss = model(slices, list(prompts), list(answers)) / cfg.grad_accum
                loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step_loss = dist.mean(step_loss)
        losses.append(step_loss)
        seen += cfg.batch_size * cfg.grad_accum * dist.world_size
        bar.set_postfix(loss=f"{step_loss:.3f}", scans_s=f"{seen / (time.time() - t0):.1f}")
        log({"stage": "finetune", "step": step, "loss": step_loss, "bf16": bf16})
        ckpt.save_from_every_rank(step + 1, dist, opt, lambda: rng_state(rng), lambda: {
            "model": {k: v for k, v in vlm.state_dict().items() if k in trainable}, "losses": losses})

    if dist.is_main:
        with atomic_dir(os.path.join(run_dir, "finetune")) as d:
            vlm.llm.save_pretrained(d)
            vlm.save_image_modules(d)
        ckpt.clear()
    dist.barrier()
    return losses


def load_finetuned(run_dir: str) -> SamfVLM:
    """Base LLM + LoRA adapter + fine-tuned image modules, as ``stage_finetune`` left them."""
    from peft import PeftModel

    ft = os.path.join(run_dir, "finetune")
    with open(os.path.join(ft, "samf_config.json")) as f:
        vlm = build_vlm(run_dir, ImageConfig.from_dict(json.load(f)))
    vlm.llm = PeftModel.from_pretrained(vlm.llm, ft)
    state = torch.load(os.path.join(ft, "samf_modules.pt"), map_location="cpu", weights_only=True)
    vlm.encoder.load_state_dict(state["encoder"])
    vlm.fusion.load_state_dict(state["fusion"])
    return vlm.eval()


# ----------------------------------------------------------------------------------------- merge

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
        _write_json(os.path.join(d, PREPROCESS_FILE), run["preprocess"])
    return out


# -------------------------------------------------------------------------------------- evaluate
