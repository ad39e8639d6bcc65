"""The frozen ViT's slice embeddings, computed once per cache (``samf-train embed``).

With the ViT frozen (the paper's best setting) its outputs never change during fine-tuning, yet the ViT is most
of a step's cost: ViT-B/16 over 24 slices of 224² per scan. ``samf-train embed`` runs it once over every scan of
a cache and keeps the raw CLS outputs (before the standardisation, which fine-tuning measures) as float16, in
shards that line up with the slice shards::

    CACHE/embeddings/<vit>/<split>/emb-00000.npy    [n, 3·S, D] float16, row for row the slice shard's scans
    CACHE/embeddings/<vit>/embeddings.json          which ViT (<vit>: a fingerprint of its weights), sizes

Fine-tuning with a frozen ViT whose fingerprint has embeddings there reads them instead of running the ViT; a
ViT with other weights has another fingerprint, so stale embeddings are never used.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from samf.runtime.atomic import atomic_file, remove_stale_temporaries

from .data import DataError
from .scan_cache import ScanCache, decode, npy_layout, read_row

EMBED_FILE = "embeddings.json"


def vit_fingerprint(vit: torch.nn.Module) -> str:
    """16 hex digits of a SHA-256 over the ViT's weights (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(vit.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def embeddings_dir(cache: ScanCache, key: str) -> str:
    return os.path.join(cache.path, "embeddings", key)


def _shard_path(folder: str, split: str, shard: int) -> str:
    return os.path.join(folder, split, f"emb-{shard:05d}.npy")


class CachedEmbeddings:
    """Reads the embeddings of one ViT from a cache (``read(split, index row)``)."""

    def __init__(self, cache: ScanCache, key: str):
        self.folder = embeddings_dir(cache, key)
        with open(os.path.join(self.folder, EMBED_FILE)) as f:
            self.record = json.load(f)
        self.key = key
        self._offsets: dict = {}

    def read(self, split: str, row: dict) -> np.ndarray:
        return read_row(_shard_path(self.folder, split, row["shard"]), row["row"], self._offsets)


def find_embeddings(cache: ScanCache, key: str) -> CachedEmbeddings | None:
    """The cache's complete embeddings of the ViT with fingerprint ``key``, or None."""
    if os.path.exists(os.path.join(embeddings_dir(cache, key), EMBED_FILE)):
        return CachedEmbeddings(cache, key)
    return None


def other_embeddings(cache: ScanCache) -> list:
    """Fingerprints of the ViTs the cache has embeddings of."""
    root = os.path.join(cache.path, "embeddings")
    return sorted(k for k in os.listdir(root) if os.path.exists(os.path.join(root, k, EMBED_FILE))) \
        if os.path.isdir(root) else []


@torch.no_grad()
def compute_embeddings(cache: ScanCache, vit: torch.nn.Module, device: torch.device, batch_scans: int = 4,
                       progress: bool = True) -> CachedEmbeddings:
    """Run ``vit`` once over every scan of every split of ``cache``; resumable shard by shard."""
    from samf.runtime.progress import progress_bar

    key = vit_fingerprint(vit)
    folder = embeddings_dir(cache, key)
    found = find_embeddings(cache, key)
    if found is not None:
        return found
    vit = vit.to(device).eval()
    splits = {s: cache.split(s) for s in cache.splits}
    total = sum(len(s) for s in splits.values())
    bar = progress_bar(total=total, desc=f"embed (ViT {key})", unit="scan", disable=not progress)
    dim, n_slices, nbytes = None, None, {}
    for name, split in splits.items():
        by_shard: dict = {}
        for i, r in enumerate(split.rows):
            by_shard.setdefault(r["shard"], []).append(i)
        nbytes[name] = 0
        for shard, indices in sorted(by_shard.items()):
            path = _shard_path(folder, name, shard)
            if not os.path.exists(path):
                remove_stale_temporaries(path)
                out = []
                for a in range(0, len(indices), batch_scans):
                    x = torch.from_numpy(np.stack([decode(split.read_stored(i)) for i in indices[a: a + batch_scans]]))
                    z = vit(x.flatten(0, 1).to(device)).reshape(x.shape[0], x.shape[1], -1)
                    out.append(z.float().cpu().numpy().astype(np.float16))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with atomic_file(path, "wb") as f:
                    np.save(f, np.concatenate(out))
            nbytes[name] += os.path.getsize(path)
            n_slices, dim = npy_layout(path)[1][1:]
            bar.update(len(indices))
    bar.close()
    if dim is None:
        raise DataError(f"{cache.path} holds no scans to embed")
    record = dict(vit=key, dtype="float16", slices=int(n_slices), dim=int(dim),
                  splits={s: dict(scans=len(splits[s]), bytes=nbytes[s],
                                  bytes_per_scan=round(nbytes[s] / max(1, len(splits[s])))) for s in splits})
    with atomic_file(os.path.join(folder, EMBED_FILE)) as f:
        json.dump(record, f, indent=1)
    return CachedEmbeddings(cache, key)
