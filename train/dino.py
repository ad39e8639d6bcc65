"""DINO self-supervised pretraining of the ViT on CT slices of all three planes (Caron et al., 2021).

Student and EMA teacher share the ViT architecture; each gets a projection head ending in a weight-normed
prototype layer. Teacher sees the global crops, student all crops (global + local); teacher outputs are
centred (running mean) and sharpened (low temperature); teacher momentum and learning rate follow
cosine schedules.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samf.runtime.progress import progress_bar

from .configs import DinoConfig
from .models import VisionTransformer


class DinoHead(nn.Module):
    def __init__(self, in_dim: int, cfg: DinoConfig):
        super().__init__()
        # BatchNorm in the head (DINO's ``use_bn``): CLS vectors of CT slices start nearly identical, so
        # without it the centred teacher is uniform from the first steps and the loss sits at ln(out_dim).
        self.mlp = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.BatchNorm1d(cfg.hidden_dim), nn.GELU(),
                                 nn.Linear(cfg.hidden_dim, cfg.hidden_dim), nn.BatchNorm1d(cfg.hidden_dim), nn.GELU(),
                                 nn.Linear(cfg.hidden_dim, cfg.bottleneck_dim))
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        # DINO's norm_last_layer: unit-norm prototypes, so logits are cosines and temperatures mean what they say.
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class _Net(nn.Module):
    def __init__(self, vit: VisionTransformer, head: DinoHead):
        super().__init__()
        self.vit, self.head = vit, head

    def forward(self, crops: list):
        # Crops of one size go through the backbone together (DINO's multi-res forward).
        outs, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
                j += 1
            outs.append(self.vit(torch.cat(crops[i:j])))
            i = j
        return self.head(torch.cat(outs))


def random_crops(x: torch.Tensor, n: int, size: int, scale: tuple, gen: torch.Generator) -> list:
    """``n`` random resized crops of each image in ``x [B, C, H, W]``, each ``size``², plus contrast jitter."""
    B = x.shape[0]
    crops = []
    for _ in range(n):
        s = torch.empty(B).uniform_(*scale, generator=gen).sqrt()           # side fraction
        tx = (torch.rand(B, generator=gen) * 2 - 1) * (1 - s)
        ty = (torch.rand(B, generator=gen) * 2 - 1) * (1 - s)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, tx, ty
        grid = F.affine_grid(theta, (B, x.shape[1], size, size), align_corners=False)
        c = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        gain = 1.0 + (torch.rand(B, 1, 1, 1, generator=gen) - 0.5) * 0.4
        crops.append((c * gain).clamp(-1, 1))
    return crops


def _cosine(step: int, total: int, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def pretrain_dino(vit: VisionTransformer, slices: np.ndarray, cfg: DinoConfig, progress: bool = True,
                  log=None, ckpt=None, dist=None) -> list:
    """Train ``vit`` in place (it ends as the teacher backbone, as DINO ships); returns the loss per step.

    ``slices [M, C, H, W]``: single slices pooled from all planes of the training scans (an array, or a
    :class:`samf.train.scan_cache.CachedSlices` that reads each drawn slice from a prepared cache). ``ckpt``: a
    :class:`samf.train.checkpoint.StageCheckpoint` to resume from and save to. ``dist``: a
    :class:`samf.train.distributed.DistributedContext` (default: from the environment). Under torchrun, as in
    DINO's own code, each rank crops its own batch, the student is DDP-wrapped with synchronised BatchNorm
    on GPUs, and the teacher centre is the mean over all ranks' batches, so every rank's teacher stays equal.
    """
    from .checkpoint import own_rng_state, rng_state, set_rng_state
    from .distributed import DistributedContext

    dist = dist or DistributedContext.from_env()
    dev = dist.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + dist.rank)  # crops stay on the CPU generator, per rank
    size = vit.cfg.img_size
    local = max(vit.cfg.patch_size * 2, size // 2 // vit.cfg.patch_size * vit.cfg.patch_size)
    student = _Net(vit, DinoHead(vit.cfg.embed_dim, cfg))
    if dist.world_size > 1 and dev.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(dev)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = dist.optimizer(student.parameters(), zero=cfg.zero, lr=cfg.lr, weight_decay=cfg.weight_decay)
    center = torch.zeros(1, cfg.out_dim, device=dev)
    data = torch.from_numpy(slices) if isinstance(slices, np.ndarray) else slices  # or a cache's slice pool
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    losses, start = [], 0
    state = ckpt.load() if ckpt else None
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        center = state["center"].to(dev)
        losses, start = state["losses"], state["step"]
        own = own_rng_state(state["rng"], dist.rank, dist.world_size)
        if own:  # each rank continues its own crop stream where it stopped
            set_rng_state(own, gen=gen)
        else:  # saved with another number of ranks: each rank starts a fresh stream, reproducibly
            gen.manual_seed(cfg.seed + dist.rank + 1000 * start)
    model = dist.wrap(student)
    bar = progress_bar(range(start, cfg.steps), desc="pretrain-2d (DINO)", disable=not (progress and dist.is_main),
               initial=start, total=cfg.steps)
    for step in bar:
        lr = cfg.lr * (step + 1) / warm if step < warm else _cosine(step - warm, cfg.steps - warm, cfg.lr, 1e-6)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        x = data[idx] if torch.is_tensor(data) else torch.from_numpy(data[idx.numpy()])
        g_crops = [c.to(dev) for c in random_crops(x, 2, size, cfg.global_scale, gen)]
        l_crops = [c.to(dev) for c in random_crops(x, cfg.n_local_crops, local, cfg.local_scale, gen)]
        s_out = model(g_crops + l_crops).chunk(2 + cfg.n_local_crops)
        with torch.no_grad():
            t_raw = teacher(g_crops)
            t_out = F.softmax((t_raw - center) / cfg.teacher_temp, dim=-1).chunk(2)
        loss, terms = 0.0, 0
        for ti, t in enumerate(t_out):
            for si, s in enumerate(s_out):
                if si == ti:
                    continue
                loss = loss + torch.sum(-t * F.log_softmax(s / cfg.student_temp, dim=-1), dim=-1).mean()
                terms += 1
        loss = loss / terms
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        opt.step()
        with torch.no_grad():
            m = _cosine(step, cfg.steps, cfg.momentum_start, 1.0)
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            batch_center = dist.mean_tensor(t_raw.mean(0, keepdim=True))
            center.mul_(cfg.center_momentum).add_(batch_center, alpha=1 - cfg.center_momentum)
        losses.append(dist.mean(float(loss.detach())))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if log:
            log({"stage": "pretrain-2d", "step": step, "loss": losses[-1], "lr": lr})
        if ckpt:
            ckpt.save_from_every_rank(step + 1, dist, opt, lambda: rng_state(gen=gen), lambda: {
                "student": student.state_dict(), "teacher": teacher.state_dict(), "center": center.cpu(),
                "losses": losses})
    vit.load_state_dict(teacher.vit.state_dict())
    vit.to("cpu")
    return losses
