"""The three image-side modules: 2D ViT, 3D slice aggregator, SAMF (+Ao2D) fusion.

One class per module, sized by a config dataclass, so the same code builds the tiny test model and the
paper's (DINO ViT-B/16 at 224², Phi-3-mini width). The ViT's parameter names follow DINO's
``vision_transformer.py`` so published DINO checkpoints load with a strict key check.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import FUSION_MODES

# ----------------------------------------------------------------------------------------------- configs

@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3        # one channel per HU window (lung, mediastinum, bone) -- DINO's RGB slot
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class AggregatorConfig:
    n_slices: int = 24       # 3 planes × S slices
    n_tokens: int = 32       # N distinct volume tokens handed to the fusion (the official code: 1, repeated)
    dim: int = 768
    depth: int = 2
    num_heads: int = 8
    mlp_ratio: float = 1.34  # 768 → 1024 feed-forward, as in the official aggregator
    out_dim: int = 256
    slice_mix: bool = True   # each volume token also a learned mix of the slices' outputs (False: the paper's)


@dataclass
class FusionConfig:
    d2d: int = 768           # ViT width
    d3d: int = 256           # aggregator output width
    d_text: int = 3072       # LLM embedding width (Phi-3-mini)
    d_proj: int = 256
    d_llm: int = 3072
    ao2d: bool = True        # add the text→2D attention term (Ao2D)
    mode: str = "samf"       # "samf" (eqs. 3-12); the ablation's baselines: "2d", "3d", "concat" (FUSION_MODES)


# FUSION_MODES: how the fusion makes its N rows. "samf": the paper's fusion (with Ao2D when ``ao2d``). The
# ablation's baselines, each with the same number of rows and width: "2d", the slices alone, no aggregator (row
# n: the slice embeddings pooled by a learned query of its own); "3d", the aggregator alone (row n: volume token
# n); "concat", the two side by side without SAMF's attention (row n: volume token n and the slices' mean).


def config_dict(cfg) -> dict:
    return asdict(cfg)


# ------------------------------------------------------------------------------------------ ViT blocks

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (DINO/timm layout)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT returning one CLS embedding per image, ``[B, C, H, W] -> [B, D]``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.embed_dim))
        self.blocks = nn.ModuleList([Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Positional embedding for an ``h×w`` patch grid; interpolated for DINO's smaller local crops."""
        n = self.pos_embed.shape[1] - 1
        if h * w == n:
            return self.pos_embed
        side = int(math.sqrt(n))
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, 1 + patches, D]``: the CLS token, then every patch's (what a probe of another
        pooling reads)."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self._pos_embed(H // p, W // p)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]


def _init_linear(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def load_dino_weights(vit: VisionTransformer, path: str) -> None:
    """Load a published DINO ViT checkpoint (``dino_vitbase16_pretrain.pth`` style) from a local file.

    Accepts the bare state dict or DINO's training checkpoint (``teacher``/``student`` with ``backbone.``
    or ``module.`` prefixes); the head is dropped; every ViT key must match (strict).
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "teacher" in sd:
        sd = sd["teacher"]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head."):
            continue
        out[k] = v
    vit.load_state_dict(out, strict=True)


# ----------------------------------------------------------------------------------------- aggregator

class SliceAggregator(nn.Module):
    """Slice embeddings ``[B, K, D2]`` -> N volume tokens ``[B, N, out_dim]``.

    Learned queries attend jointly with the slices (which carry a learned plane+position embedding) in a
    small transformer encoder; the N query outputs are the volume tokens.
    """

    def __init__(self, cfg: AggregatorConfig, d_in: int):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(d_in, cfg.dim)
        self.slice_pos = nn.Parameter(torch.zeros(1, cfg.n_slices, cfg.dim))
        self.queries = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.out = nn.Linear(cfg.dim, cfg.out_dim)
        nn.init.trunc_normal_(self.slice_pos, std=0.02)
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.apply(_init_linear)
        # Token n += Σ_k W[n, k] · slice k's output. Which slice shows a finding is where a side is (an effusion's
        # side is which sagittal slices hold the fluid); queries that start out attending evenly average it away
        # (probes: slices 1.00, the query tokens 0.74 on effusion with its side). A learned mix over the slice
        # positions keeps it, linearly. Zero at the start: the tokens begin as the queries alone.
        self.slice_mix = nn.Linear(cfg.n_slices, cfg.n_tokens, bias=False) if cfg.slice_mix else None
        if self.slice_mix is not None:
            nn.init.zeros_(self.slice_mix.weight)

    def forward(self, z2d: torch.Tensor) -> torch.Tensor:
        B, N = z2d.shape[0], self.cfg.n_tokens
        x = torch.cat([self.queries.expand(B, -1, -1), self.in_proj(z2d) + self.slice_pos], dim=1)
        for blk in self.blocks:
            x = blk(x)
        tokens = x[:, :N]
        if self.slice_mix is not None:
            tokens = tokens + self.slice_mix(x[:, N:].transpose(1, 2)).transpose(1, 2)
        return self.out(self.norm(tokens))


# ---------------------------------------------------------------------------------------------- SAMF

class SAMF(nn.Module):
    """Slice-Attentive Multimodal Fusion (eqs. 3–12), with the Ao2D text→2D term when ``cfg.ao2d``.

    ``z2d [B,S,D2]``, ``z3d [B,N,D3]``, ``text [B,T,d_text]``, ``text_mask [B,T]`` (1 = real prompt token)
    -> ``[B, N, d_llm]``. Dot products are scaled by 1/sqrt(d_proj); padded text tokens get no weight. ``n_rows``
    (N, the aggregator's tokens) sizes only the "2d" baseline's queries.
    """

    def __init__(self, cfg: FusionConfig, n_rows: int = 32):
        super().__init__()
        self.cfg = cfg
        self.proj_2d = nn.Linear(cfg.d2d, cfg.d_proj)
        self.proj_3d = nn.Linear(cfg.d3d, cfg.d_proj)
        self.proj_text = nn.Linear(cfg.d_text, cfg.d_proj)
        if cfg.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {cfg.mode!r}: not one of {', '.join(FUSION_MODES)}")
        n_parts = {"samf": 4 if cfg.ao2d else 3, "2d": 1, "3d": 1, "concat": 2}[cfg.mode]
        self.fusion = nn.Linear(n_parts * cfg.d_proj, cfg.d_llm)
        self.scale = cfg.d_proj ** -0.5
        if cfg.mode == "2d":  # N learned queries over the slices: the rows see no aggregator
            self.queries_2d = nn.Parameter(torch.randn(1, n_rows, cfg.d_proj) * 0.02)

    def forward(self, z2d, z3d, text, text_mask):
        return self.attend(z2d, z3d, text, text_mask)[0]

    def baseline(self, z2d, z3d):
        """The ablation's baselines (``cfg.mode`` "2d", "3d", "concat"): ``[B, N, d_llm]``; no attention to show."""
        mode, F2d = self.cfg.mode, self.proj_2d(z2d)
        if mode == "2d":
            w = torch.softmax(self.queries_2d @ F2d.transpose(1, 2) * self.scale, dim=2)   # [B, N, S]
            return self.fusion(w @ F2d)
        F3d = self.proj_3d(z3d)
        if mode == "3d":
            return self.fusion(F3d)
        return self.fusion(torch.cat([F3d, F2d.mean(1, keepdim=True).expand(-1, F3d.shape[1], -1)], dim=-1))

    def attend(self, z2d, z3d, text, text_mask):
        """``(fused [B, N, d_llm], alpha [B, S], gamma [B, S] or None)``: the fused rows and the attention that made
        them. α weighs the slices in the volume summary (eq. 6); γ (Ao2D) is each prompt token's attention over
        the slices, averaged over the real prompt tokens. They are what the runtime shows as the slices that
        mattered, and ``fusion.onnx`` outputs them next to the fused rows. The ablation's baselines have neither."""
        if self.cfg.mode != "samf":
            return self.baseline(z2d, z3d), None, None
        F2d, F3d, Ft = self.proj_2d(z2d), self.proj_3d(z3d), self.proj_text(text)
        f3d = F3d.mean(dim=1)                                                    # [B, P]
        valid = text_mask.to(Ft.dtype)                                           # [B, T]
        n_valid = valid.sum(1, keepdim=True).clamp(min=1.0)                      # [B, 1]
        neg = torch.finfo(Ft.dtype).min
        alpha = torch.softmax((F2d @ f3d.unsqueeze(-1)).squeeze(-1) * self.scale, dim=1)       # [B, S]
        beta_logits = (Ft @ f3d.unsqueeze(-1)).squeeze(-1) * self.scale                         # [B, T]
        beta = torch.softmax(beta_logits.masked_fill(valid == 0, neg), dim=1) * valid
        A2d3d = (alpha.unsqueeze(-1) * F2d).sum(dim=1)                          # [B, P]
        At3d = (beta.unsqueeze(-1) * Ft).sum(dim=1)                             # [B, P]
        parts, gamma_mean = [F3d, A2d3d, At3d], None
        if self.cfg.ao2d:
            gamma = torch.softmax((Ft @ F2d.transpose(1, 2)) * self.scale, dim=2)   # [B, T, S]
            per_tok = gamma @ F2d                                                   # [B, T, P]
            At2d = (per_tok * valid.unsqueeze(-1)).sum(1) / n_valid
            parts.append(At2d)
            gamma_mean = (gamma * valid.unsqueeze(-1)).sum(1) / n_valid              # [B, S]
        N = F3d.shape[1]
        expanded = [parts[0]] + [p.unsqueeze(1).expand(-1, N, -1) for p in parts[1:]]
        return self.fusion(torch.cat(expanded, dim=-1)), alpha, gamma_mean


class ImageEncoder(nn.Module):
    """ViT over every slice, then the aggregator: ``[B, K, C, H, W] -> (z2d [B,K,D2], z3d [B,N,D3])``.

    Slice embeddings are standardised per feature with statistics measured on the training slices
    (:meth:`calibrate`). CLS vectors of CT slices share a large common component; the findings live in
    small deviations from it, and without this the fusion and the LLM learn to ignore the image (measured
    on phantoms: no gap between real and zeroed image embeddings after fine-tuning).
    """

    def __init__(self, vit_cfg: ViTConfig, agg_cfg: AggregatorConfig):
        super().__init__()
        self.vit = VisionTransformer(vit_cfg)
        self.aggregator = SliceAggregator(agg_cfg, vit_cfg.embed_dim)
        self.register_buffer("slice_mean", torch.zeros(vit_cfg.embed_dim))
        self.register_buffer("slice_std", torch.ones(vit_cfg.embed_dim))

    def embed_slices(self, x: torch.Tensor) -> torch.Tensor:
        """``[K, C, H, W] -> [K, D2]``: standardised CLS embeddings (what ``vit.onnx`` computes)."""
        return (self.vit(x) - self.slice_mean) / self.slice_std

    @torch.no_grad()
    def calibrate(self, slice_batches) -> None:
        """Set the standardisation from an iterable of ``[K, C, H, W]`` slice tensors, or of ``[K, D2]`` ViT
        outputs already computed (the embedding cache). No graph is kept: at ViT-B/16 size the activations of a
        few scans would fill the memory."""
        z = torch.cat([x.float() if x.dim() == 2 else self.vit(x) for x in slice_batches])
        self.slice_mean.copy_(z.mean(0))
        self.slice_std.copy_(z.std(0).clamp(min=1e-4))

    def forward(self, slices: torch.Tensor):
        """``[B, K, C, H, W]`` slices, or ``[B, K, D2]`` outputs of this (frozen) ViT computed beforehand by
        ``samf-train embed``: the standardisation and the aggregator are the same for both."""
        B, K = slices.shape[:2]
        if slices.dim() == 3:
            z2d = (slices.to(self.slice_mean.dtype) - self.slice_mean) / self.slice_std
        else:
            z2d = self.embed_slices(slices.flatten(0, 1)).reshape(B, K, -1)
        return z2d, self.aggregator(z2d)
