"""warmup-3d: InfoNCE warm-up of the 3D aggregator on frozen ViT slice embeddings.

Which pairs are positives, and why
----------------------------------
Each scan's ``3·S`` slice embeddings (S per plane: axial, coronal, sagittal, each plane's slices evenly
spaced over the body) are split into two *views* of the same scan:

- view A keeps the slices with an even index within their plane, view B those with an odd index;
- the slices a view drops are replaced by zeros, the mean of the standardised embeddings (no information),
  so both views keep the aggregator's plane+position slots.

Every slice of view A has its adjacent slices (one slab step away, same plane) in view B, and both views
hold all three planes. So the two views show the same organs and the same findings through different,
disjoint pixels, and the aggregator can only match them by encoding what the scan shows, fusing the planes
rather than copying any one slice. The positive pair is (view A, view B) of one scan; every other scan's
views in the batch are negatives. The volume feature is the mean of the N volume tokens through a small
projection head (dropped after warm-up, as in SimCLR); the loss is symmetric InfoNCE at temperature ``tau``.

The ViT is frozen throughout (its DINO features are the input); only the aggregator and the head learn.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from samf.runtime.progress import progress_bar

from .configs import WarmupConfig


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE for ``[B, D]`` features where row i of ``a`` and row i of ``b`` are the positive pair."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.t() / tau
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def split_views(z2d: torch.Tensor, slices_per_plane: int) -> tuple:
    """``[B, 3·S, D]`` -> (view A, view B): even/odd slices of every plane, the rest zeroed."""
    idx = torch.arange(z2d.shape[1], device=z2d.device) % slices_per_plane
    even = (idx % 2 == 0).to(z2d.dtype)[None, :, None]
    return z2d * even, z2d * (1.0 - even)


def warmup_aggregator(aggregator: nn.Module, z2d: torch.Tensor, slices_per_plane: int, cfg: WarmupConfig,
                      progress: bool = True, log=None) -> list:
    """Train ``aggregator`` with InfoNCE on precomputed slice embeddings ``z2d [M, 3·S, D]``; loss per step."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    d_out = aggregator.cfg.out_dim
    head = nn.Sequential(nn.Linear(d_out, d_out), nn.GELU(), nn.Linear(d_out, cfg.proj_dim)).to(z2d.device)
    params = list(aggregator.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    aggregator.train()
    batch = min(cfg.batch_size, z2d.shape[0])
    losses = []
    bar = progress_bar(range(cfg.steps), desc="warmup-3d (InfoNCE)", disable=not progress)
    for step in bar:
        pick = torch.tensor(rng.sample(range(z2d.shape[0]), batch), device=z2d.device)
        a, b = split_views(z2d[pick], slices_per_plane)
        loss = info_nce(head(aggregator(a).mean(1)), head(aggregator(b).mean(1)), cfg.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if log:
            log({"stage": "warmup-3d", "step": step, "loss": losses[-1]})
    aggregator.eval()
    return losses
