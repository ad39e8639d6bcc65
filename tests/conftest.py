"""Shared fixtures: the whole recipe (phantoms -> tokenizer -> DINO -> tiny Phi-3 language base -> InfoNCE
warm-up -> SAMF+Ao2D+LoRA fine-tune -> merge -> bundle with ONNX, GGUF F32 and Q8_0), run once per session at
two lengths by the same code:

- ``quick``: a few steps of each stage (about 12 s on one core). Nearly random weights, every file real: the
  bundle, CLI, error, export and fidelity tests, which check that each hand-over keeps what it was given, run
  on it.
- ``trained``: long enough to learn (about two minutes); only the tests of what training learned use it, and
  they are marked slow.
"""

from __future__ import annotations

import gc
import os
import pickle
import shutil
from dataclasses import dataclass

import pytest

# 48 held-out scans: on 16 one scan moves an accuracy by 0.06, which was the learning test's whole margin.
# Every stage is seeded, so this run is the same on every machine with the same thread count.
SMALL = dict(n_train=200, n_test=48, dino_steps=20, warmup_steps=60, lm_steps=200, finetune_steps=600,
             check_scans=20, check_tokens=256)
# A few steps of each stage; 20 LM steps so that generation ends and reads like the report language. The
# encoder variants are checked on 6 held-out scans, reports up to 64 tokens (the export's default: 20, 256).
QUICK = dict(n_train=16, n_test=8, dino_steps=2, warmup_steps=2, lm_steps=20, finetune_steps=4,
             check_scans=6, check_tokens=64)


#: Torch threads for a test process's own work. Under pytest-xdist (``make test``: two workers on two cores) each
#: worker runs on one: two workers' OpenMP teams on two cores wait at every barrier for each other's descheduled
#: threads (measured: an evaluation of 2 s alone took 45 s beside another worker). CLIs the tests start choose
#: their own threads.
ALL_CORES = max(1, os.cpu_count() or 1)
TORCH_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else ALL_CORES


#: The test files that take ten seconds or more of ``make test`` (2 cores), longest first: the order they are
#: handed to its two workers (pytest-xdist would order the files by their number of tests, and a long file with
#: few tests came last). The first builds the ``quick`` run; the second needs none, so the other worker has work
#: meanwhile instead of waiting for it. The short files follow in collection order. (Ordering every file by its
#: time was slower, 131-133 s: the training tests then ran beside the service tests, and took 17 s instead of 4.)
LONG_FILES = ("test_cli_errors.py", "test_synthetic_bundle.py", "test_service_ops.py", "test_scan_cache.py",
              "test_encoder_precision.py", "test_dicom_net.py", "test_orthanc.py", "test_service.py",
              "test_fuzz.py", "test_service_tls.py", "test_probe.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's ordering by number of tests: ours instead
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest as collected


def pytest_collection_finish(session):
    """What the imports and the collection made (about 700 000 objects in a worker: torch, transformers, the
    test modules) lives to the end: frozen out of the garbage collector's full passes, which otherwise scan it
    again and again (``make test``: 116 s instead of 119-126 s, with the same freeze at the end)."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
    """Before pytest's last collections and the interpreter's exit, each a pass over every object (2-3 s)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """Under xdist, torch and the BLAS libraries (numpy's, scipy's: scikit-learn's fits) of the worker on one thread
    each: the probes' logistic regressions took 35 s of CPU beside another worker on two BLAS threads, 14 s alone.
    threadpoolctl limits only the libraries loaded when it is called, so scipy's is loaded first (without it, the
    probes of the quick run took 6-80 s of CPU beside a busy core instead of 1.6 s)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import scipy.linalg  # noqa: F401  (loaded now, so limited: scipy has an OpenBLAS of its own, numpy's is another)
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(TORCH_THREADS)
        with threadpool_limits(limits=TORCH_THREADS, user_api="blas"):
            yield
    else:
        yield


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The bundle-verification cache goes to a session folder, never into the user's ~/.cache (CLIs inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@dataclass
class Trained:
    data: str
    run: str
    merged: str
    bundle: str
    train: list
    test: list


def _recipe_run(root, sizes: dict) -> Trained:
    import torch

    from samf.export.bundle_writer import write_bundle
    from samf.export.encoder_variants import VariantCheck
    from samf.runtime.tools.phantom import generate_phantom_dataset
    from samf.train.recipe import RecipeSteps, run_recipe, start_run

    torch.set_num_threads(TORCH_THREADS)
    data, run = str(root / "data"), str(root / "run")
    generate_phantom_dataset(data, sizes["n_train"], sizes["n_test"], seed=1, progress=False)
    train, test = start_run(run, data, progress=False)
    steps = RecipeSteps(dino=sizes["dino_steps"], warmup=sizes["warmup_steps"], lm=sizes["lm_steps"],
                        finetune=sizes["finetune_steps"])
    merged = run_recipe(run, train, steps, progress=False)["merge"]
    bundle = str(root / "bundle")
    write_bundle(merged, bundle, quants=("Q8_0",), keep_unquantized="F32", log=lambda m: None,
                 check=VariantCheck(scans=sizes["check_scans"], report_tokens=sizes["check_tokens"]))
    return Trained(data=data, run=run, merged=merged, bundle=bundle, train=train, test=test)


def _shared_run(request, tmp_path_factory, name: str, sizes: dict) -> Trained:
    """One recipe run per ``pytest`` command: under pytest-xdist (``make test`` runs two workers) the first worker
    to ask builds it in the run's common temporary folder and the others wait for it and read where it is, rather
    than each training its own copy on the same cores. Tests only read it (those that change a run copy it)."""
    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        return _recipe_run(tmp_path_factory.mktemp(name), sizes)
    from filelock import FileLock

    common = tmp_path_factory.getbasetemp().parent
    done = common / f"{name}.pickle"  # its examples hold arrays
    with FileLock(str(common / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(common / name, ignore_errors=True)  # what a worker that failed building left
            (common / name).mkdir()
            # On the worker's one thread: the other worker is busy meanwhile (LONG_FILES), and two threads beside
            # it took 14.4 s instead of 12.2 s for the quick run.
            done.write_bytes(pickle.dumps(_recipe_run(common / name, sizes)))
    return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def quick(request, tmp_path_factory) -> Trained:
    return _shared_run(request, tmp_path_factory, "quick", QUICK)


@pytest.fixture(scope="session")
def trained(request, tmp_path_factory) -> Trained:
    return _shared_run(request, tmp_path_factory, "trained", SMALL)


@pytest.fixture(scope="session")
def scans(quick) -> list:
    """The first 20 scans of the quick fixture's dataset (train, then test): the service tests' inputs."""
    import csv

    out = []
    for split in ("train", "test"):
        with open(os.path.join(quick.data, f"{split}.csv")) as f:
            out += [os.path.join(quick.data, r["image"]) for r in csv.DictReader(f)]
    return out[:20]
