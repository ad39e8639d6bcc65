"""Training examples streamed from a prepared cache (:mod:`.scan_cache`): DataLoader workers read the scans,
each rank gets its own share of every epoch, and nothing grows with the dataset but its index.

The order is decided on indices alone, before anything is read. For each epoch the shards are shuffled (seeded
by the seed and the epoch), the scans laid out shard after shard, and rank ``r`` of ``w`` takes every ``w``-th
of them from ``r`` (the last ``n mod w`` are left out, so every rank makes the same number of steps, as DDP
needs). Each rank then shuffles its share through a buffer of ``buffer`` scans, as a streaming loader does:
reads stay near each other on disk, and the order still mixes scans of many shards. Because the order is a
function of (seed, epoch, rank, position), a resumed run continues at the position it stopped at, and the
number of DataLoader workers does not change what a rank sees: worker ``k`` of ``K`` reads positions
``k, k + K, ...`` and the DataLoader takes one from each worker in turn.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import torch

from samf.runtime.workers import DieWithParent

from .data import DataError
from .scan_cache import CachedSplit, decode


def buffer_shuffle(items: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """``items`` in the order a shuffle buffer of ``buffer`` slots gives: each new item takes the place of one
    drawn at random, which is emitted."""
    if buffer <= 1 or len(items) <= 1:
        return items.copy()
    out, slots = [], list(items[:buffer])
    for item in items[buffer:]:
        j = int(rng.integers(len(slots)))
        out.append(slots[j])
        slots[j] = item
    out.extend(slots[k] for k in rng.permutation(len(slots)))
    return np.asarray(out, dtype=np.int64)


def rank_order(shard_rows: list, epoch: int, seed: int, rank: int = 0, world: int = 1,
               buffer: int = 256) -> np.ndarray:
    """The scan indices rank ``rank`` of ``world`` reads in ``epoch`` (see the module's docstring)."""
    starts = np.concatenate([[0], np.cumsum(shard_rows)[:-1]]).astype(np.int64)
    perm = np.random.default_rng([seed, epoch]).permutation(len(shard_rows))
    laid = np.concatenate([np.arange(starts[s], starts[s] + shard_rows[s]) for s in perm]) if len(perm) else \
        np.zeros(0, dtype=np.int64)
    per_rank = len(laid) // world
    mine = laid[rank: per_rank * world: world]
    return buffer_shuffle(mine, buffer, np.random.default_rng([seed, epoch, rank, 1]))


class ScanStream(torch.utils.data.IterableDataset):
    """A rank's endless stream of a cache split's scans, epoch after epoch, from position ``start``; each item is
    ``{"index": i, "image": stored rows}`` (the slices as stored, or the ViT embeddings when ``embeddings``)."""

    def __init__(self, split: CachedSplit, seed: int = 0, rank: int = 0, world: int = 1, buffer: int = 256,
                 start: int = 0, embeddings=None):
        self.split, self.seed, self.rank, self.world = split, seed, rank, world
        self.buffer, self.start, self.embeddings = buffer, start, embeddings
        self.shard_rows = split.shard_rows
        self.per_rank = len(split) // world
        if self.per_rank < 1:
            raise DataError(f"the cache's {split.split} split has {len(split)} scan(s), fewer than the {world} ranks")

    def positions(self):
        """(position, scan index) from ``start`` on, for ever."""
        epoch, offset = divmod(self.start, self.per_rank)
        pos = self.start
        while True:
            order = rank_order(self.shard_rows, epoch, self.seed, self.rank, self.world, self.buffer)
            for i in order[offset:]:
                yield pos, int(i)
                pos += 1
            epoch, offset = epoch + 1, 0

    def read(self, i: int) -> np.ndarray:
        if self.embeddings is not None:
            return self.embeddings.read(self.split.split, self.split.rows[i])
        return self.split.read_stored(i)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for pos, i in self.positions():
            if (pos - self.start) % workers == worker:
                yield {"index": i, "image": self.read(i)}


class StreamedScan:
    """A scan as training takes it from the stream: its texts and its model input (``slices`` as float32, or
    ``vit_embeddings``: the frozen ViT's outputs, cached)."""

    def __init__(self, split: CachedSplit, index: int, image: torch.Tensor, embedded: bool):
        row = split.rows[index]
        self.index, self.image, self.report = index, row["image"], row["report"]
        self.findings, self.questions = row["findings"], row["questions"]
        array = image.numpy()
        self.slices = None if embedded else decode(array)
        self.vit_embeddings = array.astype(np.float32) if embedded else None

    @property
    def model_input(self) -> np.ndarray:
        return self.vit_embeddings if self.vit_embeddings is not None else self.slices


def stream_examples(split: CachedSplit, seed: int, rank: int, world: int, start: int = 0, workers: int = 2,
                    buffer: int = 256, embeddings=None):
    """An endless iterator of :class:`StreamedScan` for one rank, read by ``workers`` DataLoader processes."""
    stream = ScanStream(split, seed, rank, world, buffer, start, embeddings)
    # The DataLoader draws its workers' base seed from a generator: its own, so that starting the loader does
    # not advance torch's global RNG (LoRA's dropout), which a resumed run restores from its checkpoint.
    # Its workers end with this process, even by kill -9 (DieWithParent, which needs them to be this process's
    # children: the platform's fork or spawn, never forkserver, whose workers are the server's children).
    context = multiprocessing.get_context()
    if context.get_start_method() == "forkserver":
        context = multiprocessing.get_context("spawn")
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         prefetch_factor=2 if workers else None,
                                         generator=torch.Generator().manual_seed(seed),
                                         worker_init_fn=DieWithParent() if workers else None,
                                         multiprocessing_context=context if workers else None)
    for item in loader:
        yield StreamedScan(split, int(item["index"]), item["image"], embeddings is not None)
