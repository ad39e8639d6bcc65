"""A dataset read and preprocessed once into a cache that training streams from (``samf-train prepare``).

CT-RATE is about 50,000 volumes and a terabyte of NIfTI; preprocessed at the paper preset a scan is 3.6 MB of
uint8, so the data cannot sit in memory, and reading and preprocessing it at every epoch would cost more than
the training. Layout::

    CACHE/samf-cache.json                 what the cache holds (written first as a plan, last as complete)
    CACHE/<split>/slices-00000.npy         [n, 3·S, C, H, W] uint8 (or float16), one row per scan, n ≤ shard size
    CACHE/<split>/slices-00000.json        that shard's scans (texts, findings, questions) and rejects
    CACHE/<split>/index.jsonl              the split's kept scans in the dataset's order, with (shard, row)
    CACHE/<split>/rejects.jsonl            the scans not kept, each with its one-line reason
    CACHE/embeddings/<vit>/...             frozen-ViT slice embeddings (``samf-train embed``, :mod:`.embed_cache`)
    CACHE/prepare.log                      timings: the one file that differs between two runs

Why numpy ``.npy`` shards with a JSON index, not WebDataset tars or zarr: an ``.npy`` is a fixed header then
raw rows, so a scan is one read at a computed offset: random access without a tar index, nothing to decode,
no file per scan, bytes that are the same on every run, and readable by anything that reads numpy. WebDataset's
tars are made for sequential streaming from object stores and decode every sample; zarr's chunk files add a
dependency and nothing a row-major array lacks here. Rows are read into fresh arrays (``np.fromfile`` at an
offset), not memory-mapped: pages of a mapping stay in the process's resident set, so a long run over a large
cache would look like it grows.

Storage: ``uint8`` keeps each window's [0, 1] value at 1/255 (the model sees it within 1/255 of what the
runtime computes, i.e. 0.004 on its [-1, 1] scale); ``float16`` keeps it within 2^-11 at twice the disk.

Resumable and deterministic: the dataset's listing fixes which scans go into which shard; a shard is written
(atomically) when all its scans are read, its ``.json`` last, so a shard with its ``.json`` is done. After a
kill at any moment, running the same command again finishes the rest and the cache is byte for byte what one
uninterrupted run writes, ``prepare.log`` aside.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass

import numpy as np

from samf.errors import SamfError
from samf.runtime.atomic import atomic_file, remove_stale_temporaries
from samf.runtime.scan.preprocess import PreprocessConfig
from samf.runtime.workers import DieWithParent

from .data import DataError, Example, ScanEntry, dataset_kind, list_splits

CACHE_FILE = "samf-cache.json"
CACHE_FORMAT = "samf-scan-cache"
CACHE_VERSION = 1
STORAGES = ("uint8", "float16")
DEFAULT_SHARD_SIZE = 32          # 115 MB of uint8 at the paper preset: a few seconds of reading per shard


def encode(slices: np.ndarray, storage: str) -> np.ndarray:
    """Preprocessed slices in [-1, 1] (float32) as the cache stores them."""
    if storage == "uint8":
        return np.rint((slices + 1.0) * 127.5).astype(np.uint8)
    return slices.astype(np.float16)


def decode(stored: np.ndarray) -> np.ndarray:
    """The cache's rows back to the model's float32 in [-1, 1]."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return stored.astype(np.float32)


def listing_sha256(entries: list, root: str) -> str:
    """A fingerprint of a split's listing: which scans, from where under ``root``, with which texts. A resumed
    prepare whose listing differs (the dataset changed) would mix two datasets in one cache, so it is refused;
    the dataset's folder itself may move."""
    h = hashlib.sha256()
    for e in entries:
        where = os.path.relpath(e.path, root)
        h.update(json.dumps([e.image, where, e.texts(), e.ctrate_meta], sort_keys=True, default=list).encode())
    return h.hexdigest()


def shard_name(i: int) -> str:
    return f"slices-{i:05d}"


# ------------------------------------------------------------------------------------------ prepare

def _read_one(entry: ScanEntry, pre: PreprocessConfig, storage: str):
    """In a worker process: (stored slices, None) or (None, the one-line reason the scan is rejected)."""
    try:
        return encode(entry.slices(pre), storage), None
    except (SamfError, OSError, MemoryError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__


@dataclass
class _Shard:
    split: str
    number: int
    entries: list

    def paths(self, out: str) -> tuple:
        base = os.path.join(out, self.split, shard_name(self.number))
        return base + ".npy", base + ".json"


def _plan(data_dir: str, pre: PreprocessConfig, listings: dict, storage: str, shard_size: int) -> dict:
    plan = dict(format=CACHE_FORMAT, version=CACHE_VERSION, kind=dataset_kind(data_dir), preprocess=pre.to_dict(),
                storage=storage, shard_size=shard_size,
                listing={s: dict(scans=len(e), sha256=listing_sha256(e, data_dir)) for s, e in listings.items()})
    return plan


def _start(out: str, plan: dict) -> dict | None:
    """The cache's record when ``out`` already holds this plan complete; None when there is work to do. A
    folder holding anything else is refused: nothing a user had is overwritten."""
    path = os.path.join(out, CACHE_FILE)
    if os.path.isdir(out):
        remove_stale_temporaries(path)  # a plan whose writing was cut short
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        if have.get("plan") != plan:
            diff = sorted(k for k in set(plan) | set(have.get("plan", {}))
                          if plan.get(k) != have.get("plan", {}).get(k))
            raise DataError(f"{out} holds a cache prepared with other settings or data (differs in: "
                            f"{', '.join(diff)}); give a new --out folder")
        return have if have.get("complete") else None
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"{out} is not empty and is not a samf cache; give a new --out folder")
    os.makedirs(out, exist_ok=True)
    with atomic_file(path) as f:
        json.dump(dict(plan=plan, complete=False), f, indent=1)
    return None


def _write_shard(out: str, shard: _Shard, rows: list, storage: str, pre: PreprocessConfig) -> None:
    """A shard's rows then its record, each atomically: the record's presence says the shard is done."""
    npy, rec = shard.paths(out)
    os.makedirs(os.path.dirname(npy), exist_ok=True)
    kept = [(e, r) for e, (r, _) in zip(shard.entries, rows) if r is not None]
    shape = (len(kept), pre.n_slices, pre.channels, pre.image_size, pre.image_size)
    data = np.stack([r for _, r in kept]) if kept else np.zeros(shape, dtype=np.dtype(storage))
    with atomic_file(npy, "wb") as f:
        np.save(f, data)
    record = dict(scans=[e.texts() for e, _ in kept],
                  rejects=[dict(image=e.image, reason=why) for e, (r, why) in zip(shard.entries, rows) if r is None])
    with atomic_file(rec) as f:
        json.dump(record, f, indent=1)


def _finish(out: str, plan: dict, shards: list) -> dict:
    """The split indexes and the complete record, from the shard records (all deterministic)."""
    splits: dict = {}
    for split in plan["listing"]:
        mine = [s for s in shards if s.split == split]
        index, rejects, shard_rows, disk = [], [], [], 0
        for s in mine:
            npy, rec = s.paths(out)
            with open(rec) as f:
                record = json.load(f)
            for row, texts in enumerate(record["scans"]):
                index.append(dict(texts, shard=s.number, row=row))
            rejects += record["rejects"]
            shard_rows.append(len(record["scans"]))
            disk += os.path.getsize(npy)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        with atomic_file(os.path.join(out, split, "index.jsonl")) as f:
            f.writelines(json.dumps(r) + "\n" for r in index)
        with atomic_file(os.path.join(out, split, "rejects.jsonl")) as f:
            f.writelines(json.dumps(r) + "\n" for r in rejects)
        splits[split] = dict(scans=len(index), rejected=len(rejects), shard_rows=shard_rows, slice_bytes=disk,
                             bytes_per_scan=round(disk / max(1, len(index))))
    record = dict(plan=plan, complete=True, splits=splits)
    with atomic_file(os.path.join(out, CACHE_FILE)) as f:
        json.dump(record, f, indent=1)
    return record


def prepare_cache(data_dir: str, out: str, pre: PreprocessConfig, splits: list | None = None, workers: int = 1,
                  storage: str = "uint8", shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True,
                  echo=print) -> dict:
    """Read every scan of ``data_dir`` (any layout :func:`samf.train.data.list_dataset` knows) once with the
    runtime's loader and preprocessing, in ``workers`` processes, into a cache at ``out``; returns the cache's
    record (``samf-cache.json``). Resumes where a killed run stopped; a scan that cannot be read is rejected
    with its reason and the rest go on."""
    from samf.runtime.progress import progress_bar

    if storage not in STORAGES:
        raise DataError(f"storage must be one of {', '.join(STORAGES)}, not {storage!r}")
    listings = list_splits(data_dir, splits)
    if not listings:
        raise DataError(f"{data_dir} has no train, valid or test split")
    plan = _plan(data_dir, pre, listings, storage, shard_size)
    done = _start(out, plan)
    if done is not None:
        echo(f"{out}: already complete")
        return done
    shards = [_Shard(s, i, entries[a: a + shard_size])
              for s, entries in listings.items() for i, a in enumerate(range(0, len(entries), shard_size))]
    todo = [s for s in shards if not os.path.exists(s.paths(out)[1])]
    for s in todo:
        for p in s.paths(out):
            remove_stale_temporaries(p)
    total = sum(len(e) for e in listings.values())
    left = sum(len(s.entries) for s in todo)
    with open(os.path.join(out, "prepare.log"), "a") as log:
        log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} start: {left} of {total} scans to read, {workers} worker(s)\n")
        t0 = time.perf_counter()
        _read_shards(out, todo, pre, storage, workers, log, t0,
                     progress_bar(total=total, initial=total - left, desc="prepare", unit="scan", disable=not progress))
        record = _finish(out, plan, shards)
        took = time.perf_counter() - t0
        log.write(f"done: {left} scans in {took:.1f} s ({left / max(took, 1e-9):.2f} scans/s)\n")
    return record


def _read_shards(out: str, todo: list, pre, storage: str, workers: int, log, t0: float, bar) -> None:
    """Read the scans of the ``todo`` shards (in worker processes when ``workers`` > 1) and write each shard as
    soon as its last scan is read."""
    # The workers end with this process, even by kill -9, even during their start-up (DieWithParent), instead
    # of lingering with a scan's gigabyte.
    pool = None if workers <= 1 else cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                            initializer=DieWithParent())
    try:
        jobs = ((s, e) for s in todo for e in s.entries)
        rows: dict = {}
        for shard, result in _bounded(jobs, pool, pre, storage, 2 * max(1, workers)):
            key = (shard.split, shard.number)
            rows.setdefault(key, []).append(result)
            bar.update(1)
            if len(rows[key]) == len(shard.entries):
                _write_shard(out, shard, rows.pop(key), storage, pre)
                log.write(f"{shard.split}/{shard_name(shard.number)}: {time.perf_counter() - t0:.1f} s\n")
                log.flush()
    except cf.BrokenExecutor:
        raise DataError(f"a prepare worker died (out of memory?): the shards written so far are kept; run the same "
                        f"command again, with fewer --workers than {workers} if it recurs") from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _bounded(jobs, pool, pre, storage, ahead: int):
    """Each job's (shard, (stored, reason)) in job order, with at most ``ahead`` jobs in flight (the results that
    are read ahead wait in memory: a few scans, not a dataset)."""
    jobs, window = iter(jobs), []

    def submit():
        job = next(jobs, None)
        if job is None:
            return False
        shard, entry = job
        fut = pool.submit(_read_one, entry, pre, storage) if pool else None
        window.append((shard, entry, fut))
        return True

    while len(window) < ahead and submit():
        pass
    while window:
        shard, entry, fut = window.pop(0)
        result = fut.result() if fut is not None else _read_one(entry, pre, storage)
        submit()
        yield shard, result


# ------------------------------------------------------------------------------------------ read

class CachedExample:
    """One scan of a cache: its texts at hand, its slices read from disk when asked for (so listing a split,
    building a corpus or choosing questions reads no image)."""

    def __init__(self, split: "CachedSplit", i: int):
        self._split, self.index = split, i
        self.split_name, self.row = split.split, split.rows[i]
        row = self.row
        self.image, self.report = row["image"], row["report"]
        self.findings, self.questions = row["findings"], row["questions"]

    @property
    def slices(self) -> np.ndarray:
        return decode(self._split.read_stored(self.index))

    model_input = slices

    def example(self) -> Example:
        return Example(image=self.image, slices=self.slices, report=self.report, findings=self.findings,
                       questions=self.questions)


class CachedSplit:
    """A split of a cache as a sequence of :class:`CachedExample` (what training stages take in place of a list
    of in-memory examples)."""

    def __init__(self, cache: "ScanCache", split: str, rows: list | None = None):
        self.cache, self.split = cache, split
        if rows is None:
            with open(os.path.join(cache.path, split, "index.jsonl")) as f:
                rows = [json.loads(line) for line in f]
        self.rows = rows
        self._offsets: dict = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [CachedExample(self, j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return CachedExample(self, i)

    def __iter__(self):
        return (CachedExample(self, i) for i in range(len(self)))

    def head(self, limit: int | None) -> "CachedSplit":
        return self if limit is None else CachedSplit(self.cache, self.split, self.rows[:limit])

    @property
    def shard_rows(self) -> list:
        """Scans per shard, in shard order (the streaming order shuffles shards, then scans within a buffer)."""
        counts: dict = {}
        for r in self.rows:
            counts[r["shard"]] = counts.get(r["shard"], 0) + 1
        return [counts[k] for k in sorted(counts)]

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.cache.path, self.split, shard_name(shard) + ".npy")

    def read_stored(self, i: int, slice_: int | None = None) -> np.ndarray:
        """Scan ``i``'s slices as stored (uint8 or float16), or only its ``slice_``-th, read from its shard."""
        r = self.rows[i]
        return read_row(self.shard_path(r["shard"]), r["row"], self._offsets, slice_)


class CachedSlices:
    """Every slice of a cached split as one pool indexed like an array ``[scans · 3·S, C, H, W]`` (DINO draws
    single slices from it), each read from disk when drawn."""

    def __init__(self, split: CachedSplit):
        self.split, self.per_scan = split, split.cache.preprocess.n_slices

    def __len__(self) -> int:
        return len(self.split) * self.per_scan

    def __getitem__(self, indices) -> np.ndarray:
        return np.stack([decode(self.split.read_stored(int(i) // self.per_scan, int(i) % self.per_scan))
                         for i in np.asarray(indices).ravel()])


def npy_layout(path: str) -> tuple:
    """(offset of the data, shape, dtype) of the ``.npy`` at ``path``, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        return f.tell(), shape, dtype


def read_row(path: str, row: int, offsets: dict, part: int | None = None) -> np.ndarray:
    """Row ``row`` of the ``.npy`` at ``path`` (only its ``part``-th element along the next axis, when given): one
    read at its offset into a fresh array (``offsets`` keeps each file's header once read)."""
    if path not in offsets:
        offsets[path] = npy_layout(path)
    start, shape, dtype = offsets[path]
    if not 0 <= row < shape[0]:
        raise DataError(f"{path}: no row {row} (has {shape[0]}); the cache is damaged, prepare it again")
    per = int(np.prod(shape[1:], dtype=np.int64))
    offset = start + row * per * dtype.itemsize
    if part is None:
        return np.fromfile(path, dtype=dtype, count=per, offset=offset).reshape(shape[1:])
    each = per // shape[1]
    return np.fromfile(path, dtype=dtype, count=each, offset=offset + part * each * dtype.itemsize
                       ).reshape(shape[2:])


class ScanCache:
    """A cache folder written by :func:`prepare_cache`, checked complete and of this format."""

    def __init__(self, path: str):
        self.path = path
        record = os.path.join(path, CACHE_FILE)
        if not os.path.exists(record):
            raise DataError(f"{path} is not a samf cache (no {CACHE_FILE}); make one with samf-train prepare")
        try:
            with open(record) as f:
                self.record = json.load(f)
        except ValueError:
            raise DataError(f"{record} is not valid JSON; prepare the cache again") from None
        plan = self.record.get("plan", {})
        if plan.get("format") != CACHE_FORMAT or plan.get("version") != CACHE_VERSION:
            raise DataError(f"{path}: cache format {plan.get('format')} v{plan.get('version')}, this samf reads "
                            f"{CACHE_FORMAT} v{CACHE_VERSION}; prepare it again")
        if not self.record.get("complete"):
            raise DataError(f"{path}: an unfinished cache; run the same samf-train prepare command again to "
                            "finish it")
        self.preprocess = PreprocessConfig.from_dict(plan["preprocess"])
        self.storage = plan["storage"]

    @property
    def splits(self) -> list:
        return list(self.record["splits"])

    def check_preprocess(self, pre: PreprocessConfig) -> None:
        """Refuse a cache prepared with other preprocessing than the run's: the model would train on slices
        that the runtime never makes."""
        if pre != self.preprocess:
            a, b = pre.to_dict(), self.preprocess.to_dict()
            diff = ", ".join(f"{k} {b[k]} (run: {a[k]})" for k in a if a[k] != b.get(k))
            raise DataError(f"{self.path} was prepared with other preprocessing than the run's: {diff}; "
                            "prepare a cache with this run (samf-train prepare --run RUN)")

    def split(self, name: str) -> CachedSplit:
        if name == "test" and self.record["plan"].get("kind") == "ctrate":
            name = "valid"  # CT-RATE has no other test split, as when it is read directly
        if name not in self.record["splits"]:
            raise DataError(f"{self.path} has no {name!r} split (has: {', '.join(self.splits)})")
        return CachedSplit(self, name)
