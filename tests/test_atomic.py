"""Replacing a folder leaves no moment without a complete one at its path; a killed writer's leftovers go."""

import os

import pytest

from samf.runtime import atomic
from samf.runtime.atomic import atomic_dir, atomic_file, remove_stale_temporaries

DEAD_PID = 4194305  # above Linux's largest pid: no process has it


def _write(d, text):
    with open(os.path.join(d, "manifest.json"), "w") as f:
        f.write(text)


def _read(path):
    return open(os.path.join(path, "manifest.json")).read()


@pytest.fixture()
def old_bundle(tmp_path):
    path = str(tmp_path / "bundle")
    with atomic_dir(path) as d:
        _write(d, "old")
    return path


def test_a_folder_is_swapped_in_one_step(old_bundle, monkeypatch):
    results, real = [], atomic.exchange
    monkeypatch.setattr(atomic, "exchange", lambda a, b: results.append(real(a, b)) or results[-1])
    with atomic_dir(old_bundle) as d:
        _write(d, "new")
    assert results == [True]  # renameat2(RENAME_EXCHANGE) on this filesystem, not the two-rename fallback
    assert _read(old_bundle) == "new"
    assert os.listdir(os.path.dirname(old_bundle)) == ["bundle"]


def test_a_fault_before_the_swap_leaves_the_old_folder_and_after_it_the_new(old_bundle, monkeypatch):
    def fail(*a):
        raise KeyboardInterrupt  # a kill just before the swap

    monkeypatch.setattr(atomic, "exchange", fail)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(old_bundle) as d:
            _write(d, "new")
    assert _read(old_bundle) == "old"
    monkeypatch.undo()

    swapped, real_exchange, real_rmtree = [], atomic.exchange, atomic.shutil.rmtree

    def swap(a, b):
        swapped.append(real_exchange(a, b))
        return swapped[-1]

    def killed_after_swap(*a, **k):
        if swapped:
            raise KeyboardInterrupt  # the swap happened; the clean-up of the old folder never does
        return real_rmtree(*a, **k)

    monkeypatch.setattr(atomic, "exchange", swap)
    monkeypatch.setattr(atomic.shutil, "rmtree", killed_after_swap)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(old_bundle) as d:
            _write(d, "new")
    assert _read(old_bundle) == "new"
    left = [n for n in os.listdir(os.path.dirname(old_bundle)) if n != "bundle"]
    assert left == [f"bundle.tmp-{os.getpid()}"] and _read(os.path.join(os.path.dirname(old_bundle), left[0])) == "old"


def test_without_a_swap_two_renames_still_replace_the_folder(old_bundle, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    with atomic_dir(old_bundle) as d:
        _write(d, "new")
    assert _read(old_bundle) == "new" and os.listdir(os.path.dirname(old_bundle)) == ["bundle"]


def test_leftovers_of_a_killed_writer_are_removed_the_next_time_and_a_live_ones_are_not(old_bundle, tmp_path):
    for name in (f"bundle.tmp-{DEAD_PID}", f"bundle.old-{DEAD_PID}", f"bundle.tmp-{os.getpid() + 0}x"):
        os.makedirs(tmp_path / name)
        _write(str(tmp_path / name), "junk")
    (tmp_path / f"notes.txt.tmp-{DEAD_PID}").write_text("half")
    live = tmp_path / f"bundle.tmp-{os.getppid()}"  # a running process's
    os.makedirs(live)
    with atomic_dir(old_bundle) as d:
        _write(d, "new")
    assert sorted(os.listdir(tmp_path)) == sorted(["bundle", live.name, f"bundle.tmp-{os.getpid()}x",
                                                   f"notes.txt.tmp-{DEAD_PID}"])
    with atomic_file(str(tmp_path / "notes.txt")) as f:
        f.write("whole")
    assert not (tmp_path / f"notes.txt.tmp-{DEAD_PID}").exists() and (tmp_path / "notes.txt").read_text() == "whole"
    assert remove_stale_temporaries(old_bundle) == []
