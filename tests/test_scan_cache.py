"""samf-train prepare / embed and training from the cache: what is stored, resuming after kill -9, the
streaming order under DDP, the embedding cache's losses, CT-RATE's layout, and memory that does not grow."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from samf.runtime.scan.preprocess import PreprocessConfig
from samf.train.data import DataError
from samf.train.datasets import load_dataset
from samf.train.run_folder import PRESET_PREPROCESS
from samf.train.scan_cache import ScanCache, prepare_cache

PRE = PRESET_PREPROCESS["tiny"]


def _phantoms(root, n_train=12, n_test=4, seed=3):
    from samf.runtime.tools.phantom import generate_phantom_dataset

    data = str(root / "data")
    generate_phantom_dataset(data, n_train, n_test, seed=seed, shape=(32, 48, 48), spacing=(8.0, 7.5, 7.5),
                             progress=False)
    return data


def _files(folder) -> dict:
    """Every file under ``folder`` but the log, by relative path."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), folder)
            if rel != "prepare.log":
                out[rel] = os.path.join(d, n)
    return out


def _same_tree(a, b) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    different = [rel for rel in fa if not filecmp.cmp(fa[rel], fb[rel], shallow=False)]
    assert different == []


def test_cache_holds_what_the_runtime_computes_and_rejects_bad_scans(tmp_path):
    data = _phantoms(tmp_path)
    broken = os.path.join(data, "scans", "phantom_00003.nii.gz")
    with open(broken, "wb") as f:
        f.write(b"\x1f\x8b not a gzip stream")
    os.remove(os.path.join(data, "scans", "phantom_00005.nii.gz"))
    out = str(tmp_path / "cache")
    record = prepare_cache(data, out, PRE, workers=2, shard_size=5, progress=False, echo=lambda m: None)
    assert record["splits"]["train"]["scans"] == 10 and record["splits"]["train"]["rejected"] == 2
    with open(os.path.join(out, "train", "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    assert [r["image"] for r in rejects] == ["scans/phantom_00003.nii.gz", "scans/phantom_00005.nii.gz"]
    assert "cannot read NIfTI" in rejects[0]["reason"] and "not found" in rejects[1]["reason"]
    assert all("\n" not in r["reason"] for r in rejects)

    cached = load_dataset(out, "train", PRE)
    fresh = load_dataset(data, "train", PRE, progress=False, limit=3)
    assert [c.image for c in cached[:3]] == [e.image for e in fresh]
    for c, e in zip(cached[:3], fresh):
        assert c.report == e.report and c.questions == e.questions and c.findings == e.findings
        assert np.abs(c.slices - e.slices).max() <= 0.5 / 127.5 + 1e-6   # uint8 keeps each value within 1/255
    assert record["splits"]["train"]["bytes_per_scan"] < cached[0].slices.nbytes / 3.9  # uint8, not float32

    half = str(tmp_path / "fp16")
    prepare_cache(data, half, PRE, splits=["test"], storage="float16", progress=False, echo=lambda m: None)
    c, e = load_dataset(half, "test", PRE)[0], load_dataset(data, "test", PRE, progress=False, limit=1)[0]
    assert np.abs(c.slices - e.slices).max() <= 2.0 ** -11 + 1e-7


def test_same_bytes_whatever_the_worker_count(tmp_path):
    data = _phantoms(tmp_path, n_train=9, n_test=3)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    prepare_cache(data, one, PRE, workers=1, shard_size=4, progress=False, echo=lambda m: None)
    prepare_cache(data, two, PRE, workers=2, shard_size=4, progress=False, echo=lambda m: None)
    _same_tree(one, two)


def _prepare_cmd(data, out):
    return [sys.executable, "-m", "samf.cli.train_cli", "prepare", "--data", data, "--out", out, "--preset", "tiny",
            "--workers", "2", "--shard-size", "3", "--quiet"]


def _group(pgid: int) -> list:
    """The live processes of process group ``pgid``: a killed run's workers (and their resource tracker) stay in
    its group when they are reparented, so this sees what the run left and nothing of anyone else's."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state, _, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state not in "ZX":
            out.append(int(pid))
    return out


def _workers(pids) -> list:
    """The spawned workers among ``pids``."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def _start(cmd) -> subprocess.Popen:
    """``cmd`` in a session (and process group) of its own, whose id is its pid."""
    return subprocess.Popen(cmd, start_new_session=True)


def _left_behind(groups, grace: float = 15.0) -> dict:
    """{group: its processes} for the killed runs' ``groups`` that still have some ``grace`` s from now (at
    most); those are then killed: a failing test leaves nothing running."""
    deadline = time.monotonic() + grace
    while True:
        left = {g: pids for g in groups if (pids := _group(g))}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for g in left:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return left


def _kill_when(cmd, ready, groups: list) -> bool:
    """Start ``cmd`` and kill -9 it as soon as ``ready()`` holds (polling the files it writes); False when it
    finished first. Its process group goes into ``groups``."""
    proc = _start(cmd)
    groups.append(proc.pid)
    while proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def test_kill_9_at_any_moment_then_rerun_gives_the_clean_cache(tmp_path):
    """Killed as the plan is written, after some shards, in the middle of writing a file, and while the indexes
    are written, alone or several times in a row: the rerun's cache is byte for byte the uninterrupted run's."""
    data = _phantoms(tmp_path, n_train=20, n_test=4)  # 8 shards of 3: the kill "after 5 shards" leaves 3 to write
    clean = str(tmp_path / "clean")  # the uninterrupted run, in this process on one worker (the same bytes)
    prepare_cache(data, clean, PRE, workers=1, shard_size=3, progress=False, echo=lambda m: None)

    def shards(out):
        return len([f for f in _files(out) if f.endswith(".json") and "slices-" in f]) if os.path.isdir(out) else 0

    moments = {
        "plan": lambda out: os.path.exists(os.path.join(out, "samf-cache.json")),
        "shards": lambda out: shards(out) >= 5,
        "mid-write": lambda out: os.path.isdir(out) and any(".tmp-" in f for f in _files(out)),
        "indexes": lambda out: os.path.exists(os.path.join(out, "train", "index.jsonl")),
    }
    killed, groups = [], []
    for name, kills in (("plan", ["plan"]), ("shards", ["shards"]), ("mid", ["mid-write"]),
                        ("indexes", ["indexes"]), ("twice", ["shards", "mid-write", "shards"])):
        out = str(tmp_path / f"killed-{name}")
        for moment in kills:
            killed.append(_kill_when(_prepare_cmd(data, out), lambda: moments[moment](out), groups))
        subprocess.run(_prepare_cmd(data, out), check=True)
        _same_tree(clean, out)
        assert not [f for f in _files(out) if ".tmp-" in f]
    assert sum(killed) >= 5   # most moments were caught (a fast write can finish before it is seen)
    assert not _left_behind(groups), "processes outlived a killed prepare"


def _kill_early(cmd, delays, groups: list, after_workers: bool = True) -> list:
    """For each delay, start ``cmd(k)`` (the k-th kill's command) and kill -9 it ``delay`` s after its first
    worker process appears (after its start when not ``after_workers``): while its workers start up, before they
    ask to end with it. Returns how many workers each kill found alive (0 when the run had none yet or had
    finished)."""
    found = []
    for k, delay in enumerate(delays):
        proc = _start(cmd(k))
        groups.append(proc.pid)
        while after_workers and proc.poll() is None and not _workers(_group(proc.pid)):
            time.sleep(0.002)
        t = time.monotonic()
        while proc.poll() is None and time.monotonic() - t < delay:
            time.sleep(0.002)
        alive = _workers(_group(proc.pid)) if proc.poll() is None else []
        proc.kill()
        proc.wait()
        found.append(len(alive))
    return found


def test_kill_9_while_the_workers_start_leaves_no_process(tmp_path):
    """Issue 31: a worker that arms its parent-death signal after its parent is gone gets no signal; it must see
    that its parent is not the one that started it and end. Killed 0-0.3 s after the workers appear, mostly in
    their start-up, every run's process group is empty soon after."""
    data = _phantoms(tmp_path, n_train=12, n_test=2)
    groups: list = []
    found = _kill_early(lambda k: _prepare_cmd(data, str(tmp_path / f"cache-{k}")), (0.02, 0.1, 0.2), groups)
    left = _left_behind(groups)
    assert sum(n > 0 for n in found) >= 2, found    # the kills found workers starting
    assert not left, f"{len(left)} of {len(groups)} prepares killed while their workers started left processes"


@pytest.mark.slow
def test_many_early_kills_leave_no_process_and_the_rerun_gives_the_clean_cache(tmp_path):
    """The user's runs of issue 31, many times: kill -9 from 0.1 s after the start every 0.15 s (one folder,
    resumed each time), and 0-0.6 s after the workers appear (a fresh folder each); no process of any run is
    left, and the resumed folder's rerun gives the uninterrupted run's cache."""
    data = _phantoms(tmp_path, n_train=24, n_test=3)
    out, groups = str(tmp_path / "killed"), []
    _kill_early(lambda k: _prepare_cmd(data, out), [0.1 + 0.15 * k for k in range(20)], groups, after_workers=False)
    found = _kill_early(lambda k: _prepare_cmd(data, str(tmp_path / f"fresh-{k}")), [0.03 * k for k in range(20)],
                        groups)
    left = _left_behind(groups)
    assert sum(n > 0 for n in found) >= 15, found
    assert not left, f"{len(left)} of {len(groups)} prepares killed early left processes (kills " \
        f"{[k for k, g in enumerate(groups) if g in left]})"
    subprocess.run(_prepare_cmd(data, out), check=True)
    clean = str(tmp_path / "clean")
    prepare_cache(data, clean, PRE, shard_size=3, progress=False, echo=lambda m: None)
    _same_tree(clean, out)


def test_refusals_are_one_line(tmp_path):
    data = _phantoms(tmp_path, n_train=4, n_test=2)
    out = str(tmp_path / "cache")
    prepare_cache(data, out, PRE, progress=False, echo=lambda m: None)
    other = PreprocessConfig.from_dict({**PRE.to_dict(), "slices_per_plane": 4})
    with pytest.raises(DataError, match="slices_per_plane 6 \\(run: 4\\)"):
        load_dataset(out, "train", other)
    with pytest.raises(DataError, match="other settings"):  # resuming with other settings would mix two caches
        prepare_cache(data, out, other, progress=False, echo=lambda m: None)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prepare_cache(data, str(notes), PRE, progress=False, echo=lambda m: None)
    assert (notes / "mine.txt").read_text() == "keep me"
    # An unfinished cache is refused by training, with what to do.
    record = json.loads((tmp_path / "cache" / "samf-cache.json").read_text())
    (tmp_path / "cache" / "samf-cache.json").write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(DataError, match="unfinished cache"):
        ScanCache(out)
    # From the command line: a run whose preprocessing differs gets one line and a non-zero exit.
    from samf.train.run_folder import init_run, tiny_preset

    run = str(tmp_path / "run")
    init_run(run, {**tiny_preset(), "preprocess": other.to_dict()})
    prepare_cache(data, str(tmp_path / "cache2"), PRE, progress=False, echo=lambda m: None)
    r = subprocess.run(["samf-train", "tokenizer", "--data", str(tmp_path / "cache2"), "--run", run],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "other preprocessing" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------- the stream

def test_each_rank_sees_its_own_equal_share_once_per_epoch():
    from samf.train.cache_stream import rank_order

    shard_rows = [5, 5, 5, 3]
    for world in (1, 2, 3, 4):
        for epoch in (0, 1):
            shares = [rank_order(shard_rows, epoch, seed=7, rank=r, world=world, buffer=4) for r in range(world)]
            assert len({len(s) for s in shares}) == 1 and len(shares[0]) == 18 // world
            seen = np.concatenate(shares)
            assert len(set(seen.tolist())) == len(seen)                 # no scan twice in an epoch
            assert len(seen) > 18 - world                               # every scan but the remainder
    a, b = rank_order(shard_rows, 0, 7), rank_order(shard_rows, 1, 7)
    assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(18)) and a.tolist() != b.tolist()
    assert rank_order(shard_rows, 0, 7).tolist() == a.tolist()          # a function of (seed, epoch, rank)


def test_stream_order_does_not_depend_on_workers_and_resumes_where_it_stopped(tmp_path):
    from samf.train.cache_stream import stream_examples

    data = _phantoms(tmp_path, n_train=10, n_test=2)
    out = str(tmp_path / "cache")
    prepare_cache(data, out, PRE, shard_size=3, progress=False, echo=lambda m: None)
    split = ScanCache(out).split("train")

    def take(n, **kw):
        it = stream_examples(split, seed=1, rank=0, world=1, buffer=4, **kw)
        got = [next(it) for _ in range(n)]
        it.close()
        return got

    inline, two = take(25, workers=0), take(25, workers=2)
    assert [s.index for s in inline] == [s.index for s in two]
    assert sorted(s.index for s in inline[:10]) == list(range(10))      # the first epoch holds every scan once
    assert all(np.array_equal(a.slices, b.slices) for a, b in zip(inline, two))
    assert np.array_equal(inline[3].slices, split[inline[3].index].slices)
    assert [s.index for s in take(12, workers=0, start=13)] == [s.index for s in inline[13:25]]


# --------------------------------------------------------------------------------------- fine-tuning

def _small_run(quick, tmp_path):
    """A tiny run with a DINO ViT and an LM base: the quick recipe's shared stages (as an ablation cell starts)."""
    from samf.train.ablation import copy_shared

    run = str(tmp_path / "run")
    copy_shared(quick.run, run)
    return run


def test_finetune_from_embeddings_matches_running_the_vit(quick, tmp_path, monkeypatch):
    import torch

    from samf.train.configs import FinetuneConfig
    from samf.train.embed_cache import compute_embeddings, find_embeddings, vit_fingerprint
    from samf.train.finetune import stage_finetune
    from samf.train.models import VisionTransformer
    from samf.train.stages import pretrained_image_encoder

    data = _phantoms(tmp_path, n_train=10, n_test=2)
    cache_dir = str(tmp_path / "cache")
    prepare_cache(data, cache_dir, PRE, shard_size=4, progress=False, echo=lambda m: None)
    run = _small_run(quick, tmp_path)
    cache = ScanCache(cache_dir)
    vit = pretrained_image_encoder(run).vit
    emb = compute_embeddings(cache, vit, torch.device("cpu"), progress=False)
    assert emb.record["dim"] == 64 and emb.record["slices"] == PRE.n_slices
    first = cache.split("train")[0]
    with torch.no_grad():
        ref = vit(torch.from_numpy(first.slices))
    got = emb.read("train", first.row).astype(np.float32)
    assert np.abs(got - ref.numpy()).max() <= 1e-3 * max(1.0, float(ref.abs().max()))

    calls = {"n": 0}
    original = VisionTransformer.forward

    def counted(self, x):
        calls["n"] += 1
        return original(self, x)

    monkeypatch.setattr(VisionTransformer, "forward", counted)
    cfg = dict(steps=5, batch_size=3, loader_workers=0, save_every=100)
    train = load_dataset(cache_dir, "train", PRE)
    with_vit = stage_finetune(run, train, FinetuneConfig(embedding_cache=False, **cfg), progress=False, restart=True)
    ran = calls["n"]
    calls["n"] = 0
    from_cache = stage_finetune(run, train, FinetuneConfig(**cfg), progress=False, restart=True)
    assert ran >= 5 and calls["n"] == 0                            # the ViT ran at every step, then not once
    np.testing.assert_allclose(from_cache, with_vit, rtol=2e-3)    # fp16 embeddings: the same losses
    # Other ViT weights have another fingerprint: their embeddings are not this ViT's.
    with torch.no_grad():
        vit.pos_embed.add_(1e-3)
    assert find_embeddings(cache, vit_fingerprint(vit)) is None


# --------------------------------------------------------------------------------------- CT-RATE

def test_ctrate_release_layout_200_volumes(tmp_path):
    """CT-RATE's tree (raw unsigned volumes whose spacing and rescale live only in the metadata CSV, reports and
    the 18 labels, train and valid) is cached in full, and the cache holds what the runtime reads."""
    from samf.runtime.scan.ct import load_scan
    from samf.runtime.scan.ctrate import ctrate_path, read_metadata
    from samf.runtime.scan.preprocess import preprocess
    from samf.train.labels import CTRATE_LABELS
    from samf.train.synthetic_ctrate import write_ctrate_release

    root = str(tmp_path / "CT-RATE")
    names = write_ctrate_release(root, 160, 40, seed=2, progress=False)
    out = str(tmp_path / "cache")
    record = prepare_cache(root, out, PRE, workers=2, progress=False, echo=lambda m: None)
    assert {s: record["splits"][s]["scans"] for s in ("train", "valid")} == {"train": 160, "valid": 40}
    assert set(record["splits"]) == {"train", "valid"}     # CT-RATE's test is its valid: not cached twice
    valid = load_dataset(out, "valid", PRE)
    assert [ex.image for ex in valid] == names["valid"]
    ex = valid[17]
    assert set(ex.findings) == set(CTRATE_LABELS) and ex.report.endswith("Correlate clinically.")
    meta = read_metadata(os.path.join(root, "metadata", "validation_metadata.csv"))[ex.image]
    vol = load_scan(ctrate_path(root, "valid", ex.image), ctrate_meta=meta)
    assert vol.spacing == (8.0, 7.5, 7.5) and vol.hu.min() < -900          # rescaled to HU, spaced by the CSV
    assert np.abs(ex.slices - preprocess(vol, PRE)).max() <= 0.5 / 127.5 + 1e-6
    assert load_dataset(out, "test", PRE)[0].image == names["valid"][0]    # --split test reads valid, as before


# --------------------------------------------------------------------------------------- memory

_PEAK = """
import resource, sys
from samf.train.configs import FinetuneConfig
from samf.train.datasets import load_dataset
from samf.train.finetune import stage_finetune
from samf.train.run_folder import PRESET_PREPROCESS
stage_finetune(sys.argv[1], load_dataset(sys.argv[2], "train", PRESET_PREPROCESS["tiny"]),
               FinetuneConfig(steps=12, batch_size=4, loader_workers=1, embedding_cache=False), progress=False,
               restart=True)
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(me.ru_maxrss + kids.ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_cache(quick, tmp_path):
    """The same fine-tuning steps from a 50-scan and a 500-scan cache: peak RSS (the process and its loader
    worker) within 10%. In memory, the 500 scans' slices alone would add 230 MB."""
    data = _phantoms(tmp_path, n_train=500, n_test=1)
    big, small = str(tmp_path / "big"), str(tmp_path / "small")
    prepare_cache(data, big, PRE, splits=["train"], workers=2, progress=False, echo=lambda m: None)
    import shutil

    shutil.copytree(data, str(tmp_path / "data50"))
    rows = open(os.path.join(data, "train.csv")).read().splitlines()
    with open(str(tmp_path / "data50" / "train.csv"), "w") as f:
        f.write("\n".join(rows[:51]) + "\n")
    prepare_cache(str(tmp_path / "data50"), small, PRE, splits=["train"], progress=False, echo=lambda m: None)
    run = _small_run(quick, tmp_path)
    peaks = {}
    for name, cache in (("50", small), ("500", big)):
        r = subprocess.run([sys.executable, "-c", _PEAK, run, cache], capture_output=True, text=True, check=True)
        peaks[name] = int(r.stdout.split()[-1])
    assert abs(peaks["500"] - peaks["50"]) <= 0.10 * peaks["50"], peaks
