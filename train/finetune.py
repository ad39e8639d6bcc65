"""Fine-tuning: SAMF (+Ao2D) into Phi-3 with LoRA, on reports and multiple-choice questions, resumable and
under torchrun on several GPUs (DDP, optionally ZeRO-1)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time

import numpy as np
import torch

from samf.runtime.atomic import atomic_dir
from samf.runtime.inference.prompt import REPORT_REQUESTS
from samf.runtime.progress import progress_bar

from .configs import TASKS, FinetuneConfig
from .distributed import owns_process_group
from .llm_folder import LLMTokenizer
from .run_files import FINETUNE_DIR, MODULES_CONFIG, MODULES_FILE, WARMUP_FILE
from .run_folder import (
    MetricsLog,
    base_tokenizer,
    build_vlm,
    calibration_sample,
    cosine_lr,
    read_run,
    write_stage_config,
)
from .vlm import ImageConfig, SamfVLM, mcq_sample, prompt_ids


def _task_sample(ex, tok: LLMTokenizer, rng: random.Random, mcq_fraction: float):
    if ex.questions and rng.random() < mcq_fraction:
        return mcq_sample(tok, rng.choice(ex.questions))
    return prompt_ids(tok, rng.choice(REPORT_REQUESTS)), tok.encode(ex.report)


def accumulate_gradients(model, micro_batches: list, autocast, dist, inputs=None, aux_weight: float = 0.0) -> tuple:
    """Forward and backward over the micro-batches of one optimizer step, each a list of (example, prompt ids,
    answer ids); returns the step's (LLM loss, finding loss or None).

    The loss, and so the gradient, is the mean over every answer token of the step, as one batch holding all
    of them gives: each micro-batch's token sum is divided by the step's token count. (A mean of micro-batch
    means would weight the tokens of short answers more.) The finding loss (``aux_weight`` > 0) is the mean over
    the step's scans the same way. Under DDP only the last micro-batch all-reduces. ``inputs(ex)``: what the
    image encoder takes for an example (default: ``ex.model_input``)."""
    inputs = inputs or (lambda ex: ex.model_input)
    n_items = sum(len(answer) + 1 for batch in micro_batches for _, _, answer in batch)  # + the answer end
    n_scans = sum(len(batch) for batch in micro_batches)
    total, total_aux = 0.0, None
    for i, batch in enumerate(micro_batches):
        slices = torch.from_numpy(np.stack([inputs(ex) for ex, _, _ in batch])).to(dist.device)
        kw = {}
        if aux_weight > 0:
            labels, mask = zip(*(finding_labels(ex.findings) for ex, _, _ in batch))
            kw = dict(findings=torch.from_numpy(np.stack(labels)).to(dist.device),
                      findings_known=torch.from_numpy(np.stack(mask)).to(dist.device))
        with autocast, dist.no_sync_unless(model, i == len(micro_batches) - 1):
            out = model(slices, [p for _, p, _ in batch], [a for _, _, a in batch], num_items=n_items, **kw)
            loss, aux = out if aux_weight > 0 else (out, None)
            share = len(batch) / n_scans
            (loss + aux_weight * share * aux if aux is not None else loss).backward()
        total += float(loss.detach())
        if aux is not None:
            total_aux = (total_aux or 0.0) + share * float(aux.detach())
    return total, total_aux


def finding_labels(findings: dict) -> tuple:
    """``(labels, known)``, two float32 ``[18]`` vectors in CT-RATE's label order: a CT-RATE label row as it is,
    a phantom's findings mapped (:func:`samf.train.labels.truth_labels`); ``known`` is 0 where the data has no
    label."""
    from .labels import CTRATE_LABELS, truth_labels

    truth = truth_labels(findings)
    labels = np.array([float(truth.get(k, False)) for k in CTRATE_LABELS], np.float32)
    return labels, np.array([float(k in truth) for k in CTRATE_LABELS], np.float32)


class FrozenViTInputs:
    """The image encoder's input per in-memory example when the ViT is frozen: its raw outputs ``[K, D2]``,
    computed the first time an example is drawn and kept. A frozen ViT gives the same outputs at every draw,
    so fine-tuning then runs the ViT once per scan instead of once per draw (the demo's 3000 steps of 16 draw
    each of its 2000 scans about 24 times). Lazily, so a short run on a large set pays only for what it
    draws. Memory: ``K × D2`` float32 per scan (18 × 64 × 4 B at the tiny preset, 24 × 768 × 4 B at paper)."""

    def __init__(self, vit, device):
        self.vit, self.device, self.memo = vit, device, {}

    @torch.no_grad()
    def __call__(self, ex) -> np.ndarray:
        key = id(ex)
        if key not in self.memo:
            x = torch.from_numpy(ex.model_input).to(self.device)
            self.memo[key] = (ex, self.vit(x).float().cpu().numpy())  # holds ex: its id stays its own
        return self.memo[key][1]


def _cached_embeddings(examples, vlm, cfg: FinetuneConfig, dist):
    """The frozen ViT's embeddings in the cache being trained from (``samf-train embed``), or None: the ViT runs.
    A cache holding embeddings of another ViT is said once, as the step is then several times slower."""
    from .scan_cache import CachedSplit

    if not (isinstance(examples, CachedSplit) and cfg.freeze_vit and cfg.embedding_cache):
        return None
    from .embed_cache import find_embeddings, other_embeddings, vit_fingerprint

    key = vit_fingerprint(vlm.encoder.vit)
    found = find_embeddings(examples.cache, key)
    if found is None and other_embeddings(examples.cache) and dist.is_main:
        print(f"note: {examples.cache.path} has embeddings of ViT(s) {', '.join(other_embeddings(examples.cache))}"
              f", not of this run's ({key}); the ViT runs at every step (samf-train embed makes them)")
    return found


def _model_input(ex, embeddings) -> np.ndarray:
    if embeddings is None:
        return ex.model_input
    return embeddings.read(ex.split_name, ex.row).astype(np.float32)


class _Draw:
    """The examples of each step: drawn at random from an in-memory list (with replacement), or the next ones of
    this rank's stream from a prepared cache, from where a resumed run stopped."""

    def __init__(self, examples, cfg: FinetuneConfig, dist, rng: random.Random, start_step: int, embeddings):
        from .scan_cache import CachedSplit

        self.examples, self.rng, self.stream = examples, rng, None
        if isinstance(examples, CachedSplit):
            from .cache_stream import stream_examples

            per_step = cfg.batch_size * cfg.grad_accum
            self.stream = stream_examples(examples, cfg.seed, dist.rank, dist.world_size, start=start_step * per_step,
                                          workers=cfg.loader_workers, buffer=cfg.shuffle_buffer, embeddings=embeddings)

    def __call__(self, n: int) -> list:
        if self.stream is None:
            return [self.rng.choice(self.examples) for _ in range(n)]
        return [next(self.stream) for _ in range(n)]

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def finetune_image_config(run_dir: str, cfg: FinetuneConfig) -> ImageConfig:
    image_cfg = ImageConfig.from_dict(read_run(run_dir)["image"])
    if cfg.ao2d is not None:
        image_cfg.fusion = dataclasses.replace(image_cfg.fusion, ao2d=bool(cfg.ao2d))
    if cfg.slice_mix is not None:
        image_cfg.aggregator = dataclasses.replace(image_cfg.aggregator, slice_mix=bool(cfg.slice_mix))
    if cfg.fusion is not None:
        image_cfg.fusion = dataclasses.replace(image_cfg.fusion, mode=cfg.fusion)
    return image_cfg


def _autocast(precision: str, device: torch.device):
    """bf16 autocast where asked (or, with "auto", where the GPU supports it); fp32 otherwise."""
    use = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use), use


def check_finetune_data(examples, cfg: FinetuneConfig) -> None:
    """Refuse, in one line and before any model is built, what the data cannot give this configuration."""
    from .data import DataError

    if cfg.tasks == "mcq" and not any(ex.questions for ex in examples):
        raise DataError("finetune --tasks mcq: the training data has no multiple-choice questions (questions.jsonl "
                        "or mcq_train.csv); use --tasks report")


def has_labels(examples) -> bool:
    """Whether any example carries abnormality labels (a phantom's findings or a CT-RATE label row)."""
    from .labels import truth_labels

    return any(truth_labels(ex.findings) for ex in examples)


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

    if cfg.tasks not in TASKS:
        raise ValueError(f"tasks must be {', '.join(TASKS[:-1])} or {TASKS[-1]}, not {cfg.tasks!r}")
    dist = DistributedContext.from_env()
    conf = write_stage_config(run_dir, "finetune", cfg, write=dist.is_main)
    # How many processes read the cache changes neither the order nor the weights: a resume may change it.
    same_run = {k: v for k, v in conf.items() if k != "loader_workers"}
    ckpt = StageCheckpoint(run_dir, "finetune", same_run, every=cfg.save_every, restart=restart and dist.is_main)
    dist.barrier()  # no rank may read a checkpoint that rank 0 is about to clear
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed * 1000 + dist.rank)
    mcq_fraction = {"both": cfg.mcq_fraction, "report": 0.0, "mcq": 1.0}[cfg.tasks]
    check_finetune_data(examples, cfg)
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
    aux_weight = cfg.aux_weight
    if aux_weight > 0 and not has_labels(examples):
        if dist.is_main:
            print("note: the training data carries no abnormality labels: the auxiliary finding loss is off")
        aux_weight = 0.0
    if aux_weight > 0:
        from .labels import CTRATE_LABELS
        from .vlm import FindingHead

        vlm.finding_head = FindingHead(vlm.image_cfg.fusion.d_llm, len(CTRATE_LABELS))
    embeddings = _cached_embeddings(examples, vlm, cfg, dist)
    vlm.to(dist.device)
    from .scan_cache import CachedSplit

    inputs = None
    if embeddings is None and cfg.freeze_vit and not isinstance(examples, CachedSplit):
        inputs = FrozenViTInputs(vlm.encoder.vit, dist.device)
    vlm.encoder.calibrate(torch.from_numpy(inputs(ex) if inputs else _model_input(ex, embeddings)).to(dist.device)
                          for ex in calibration_sample(examples))
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
    draw = _Draw(examples, cfg, dist, rng, start, embeddings)
    model = dist.wrap(vlm)
    vlm.train()
    log = MetricsLog(run_dir)
    bar = progress_bar(range(start, cfg.steps), desc="finetune (SAMF+LoRA)", disable=not (progress and dist.is_main),
               initial=start, total=cfg.steps)
    t0, seen = time.time(), 0
    for step in bar:
        t_step = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, g["base_lr"], max(1, cfg.steps // 20))
        opt.zero_grad(set_to_none=True)
        chosen = draw(cfg.batch_size * cfg.grad_accum)
        samples = [(ex, *_task_sample(ex, tok, rng, mcq_fraction)) for ex in chosen]
        micro_batches = [samples[i: i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
        step_loss, aux = accumulate_gradients(model, micro_batches, autocast, dist, inputs, aux_weight)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step_loss = dist.mean(step_loss)
        losses.append(step_loss)
        seen += cfg.batch_size * cfg.grad_accum * dist.world_size
        bar.set_postfix(loss=f"{step_loss:.3f}", scans_s=f"{seen / (time.time() - t0):.1f}")
        record = {"stage": "finetune", "step": step, "loss": step_loss, "bf16": bf16,
                  "step_s": round(time.perf_counter() - t_step, 4)}
        if aux is not None:
            record["finding_loss"] = dist.mean(aux)
        log(record)
        ckpt.save_from_every_rank(step + 1, dist, opt, lambda: rng_state(rng), lambda: {
            "model": {k: v for k, v in vlm.state_dict().items() if k in trainable}, "losses": losses})

    draw.close()  # the cache's DataLoader workers
    if dist.is_main:
        with atomic_dir(os.path.join(run_dir, FINETUNE_DIR)) as d:
            vlm.llm.save_pretrained(d)
            vlm.save_image_modules(d)
        ckpt.clear()
    dist.barrier()
    return losses


def load_finetuned(run_dir: str) -> SamfVLM:
    """Base LLM + LoRA adapter + fine-tuned image modules, as ``stage_finetune`` left them."""
    from peft import PeftModel

    ft = os.path.join(run_dir, FINETUNE_DIR)
    with open(os.path.join(ft, MODULES_CONFIG)) as f:
        vlm = build_vlm(run_dir, ImageConfig.from_dict(json.load(f)))
    vlm.llm = PeftModel.from_pretrained(vlm.llm, ft)
    state = torch.load(os.path.join(ft, MODULES_FILE), map_location="cpu", weights_only=True)
    vlm.encoder.load_state_dict(state["encoder"])
    vlm.fusion.load_state_dict(state["fusion"])
    return vlm.eval()
