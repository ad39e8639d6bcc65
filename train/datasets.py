"""What a stage reads as ``--data``: a dataset folder (:mod:`samf.train.data`: listed, then read into memory) or a
cache that ``samf-train prepare`` made of one (:mod:`samf.train.scan_cache`: read lazily from disk).

It sits above both: the cache is made from the folder's listing, so ``scan_cache`` imports ``data``, and the choice
between them is made here rather than in ``data``.
"""

from __future__ import annotations

import os

from samf.runtime.scan.preprocess import PreprocessConfig

from .data import SPLITS, dataset_kind, list_dataset, load_entries
from .scan_cache import ScanCache


def load_dataset(data_dir: str, split: str, pre: PreprocessConfig, progress: bool = True,
                 limit: int | None = None):
    """One split of any supported dataset folder, as :class:`~samf.train.data.Example` s in memory; for a cache
    made by ``samf-train prepare``, its split read lazily from disk (:class:`samf.train.scan_cache.CachedSplit`)."""
    if dataset_kind(data_dir) == "cache":
        cache = ScanCache(data_dir)
        cache.check_preprocess(pre)
        return cache.split(SPLITS.get(split, split)).head(limit)
    desc = f"{os.path.basename(os.path.normpath(data_dir))} {split}"
    return load_entries(list_dataset(data_dir, split)[:limit], pre, desc, progress)
