"""Many scans on one load: the same greedy reports as one at a time, bounded memory, a resumable worklist."""

import json
import os
import shutil

import numpy as np
import pytest
from cli_runner import invoke_cli, run_cli

from samf.runtime.inference.pipeline import RECORD_FIELDS
from samf.runtime.scan.ct import Volume, save_nifti
from samf.runtime.tools.phantom import make_phantom


@pytest.fixture(scope="module")
def scan_paths(quick):
    return [os.path.join(quick.data, ex.image) for ex in quick.test]


def test_batch_reports_equal_one_at_a_time(quick, scan_paths):
    """Continuous batching (3 sequences for 8 scans, so slots are reused) changes no greedy report (F32 GGUF)."""
    from samf.runtime.inference.pipeline import ReportPipeline

    with ReportPipeline(quick.bundle, quant="F32", encoders="fp32", parallel=1) as pipe:
        single = {s: pipe.report(s, max_new_tokens=40) for s in scan_paths}
    with ReportPipeline(quick.bundle, quant="F32", encoders="fp32", parallel=3, prefetch=2) as pipe:
        batch = dict(pipe.report_many(scan_paths, max_new_tokens=40))
        assert pipe.llm.step_stats["tokens"] > 0
    assert set(batch) == set(scan_paths)
    for s in scan_paths:
        assert batch[s].token_ids == single[s].token_ids and batch[s].text == single[s].text
        assert batch[s].scan == single[s].scan and batch[s].timings["wall"] >= batch[s].timings["llm_decode"]


def test_fixed_length_batches_cut_every_sequence_at_the_same_length(quick, scan_paths):
    from samf.runtime.inference.pipeline import ReportPipeline

    with ReportPipeline(quick.bundle, quant="F32", encoders="fp32", parallel=4) as pipe:
        out = list(pipe.report_many(scan_paths[:5], max_new_tokens=7, stop_at_end=False))
    assert len(out) == 5 and all(len(r.token_ids) == 7 and r.decode_steps == 6 for _, r in out)


def test_memory_stays_bounded_whatever_the_queue(quick):
    """100 scans made on demand: at most parallel + prefetch are held at once, and the peak of Python-tracked
    memory (numpy's arrays included) is that of a few scans, not of the queue."""
    import tracemalloc

    from samf.runtime.inference.pipeline import ReportPipeline

    alive, most, shape = set(), [0], (64, 96, 96)
    p = make_phantom(3, shape=shape)

    def scans():
        for i in range(100):
            yield Volume(p.volume.copy(), p.spacing, f"scan-{i}")

    with ReportPipeline(quick.bundle, quant="F32", encoders="fp32", parallel=4, prefetch=2) as pipe:
        slices = pipe._slices

        def counting(scan, load=None):
            alive.add(scan.source)
            most[0] = max(most[0], len(alive))
            return slices(scan, load)

        pipe._slices = counting
        tracemalloc.start()
        n = 0
        for scan, res in pipe.report_many(scans(), max_new_tokens=4, stop_at_end=False):
            alive.discard(scan.source)
            n += 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    one_scan = np.prod(shape) * 4
    assert n == 100 and most[0] <= 4 + 2 + 1
    assert peak < 12 * one_scan, f"peak {peak / 1e6:.0f} MB for scans of {one_scan / 1e6:.1f} MB"


def test_a_worklist_runs_resumes_and_keeps_going_past_bad_scans(quick, scan_paths, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for s in scan_paths[:3]:
        shutil.copy(s, scans / os.path.basename(s))
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    other = tmp_path / "elsewhere"
    other.mkdir()
    p = make_phantom(11)
    save_nifti(str(other / "extra.nii.gz"), p.volume, p.spacing)
    worklist = tmp_path / "worklist.csv"
    worklist.write_text("path,note\nelsewhere/extra.nii.gz,x\nmissing.nii.gz,y\n")
    out = tmp_path / "out"

    def run(*args):
        return invoke_cli("samf", "report", str(scans), "--worklist", str(worklist), "--bundle", quick.bundle,
                       "--out", str(out), "--max-tokens", "16", "--parallel", "2", *args)

    proc = run()
    assert proc.returncode == 1, proc.stderr  # some scans failed
    assert "Traceback" not in proc.stderr
    assert "4 reported, 0 already done, 2 failed" in proc.stderr
    rows = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [os.path.basename(r["path"]) for r in rows] == [
        "broken.nii.gz", *[os.path.basename(s) for s in scan_paths[:3]], "extra.nii.gz", "missing.nii.gz"]
    bad = {os.path.basename(r["path"]): r for r in rows if r["status"] == "failed"}
    assert set(bad) == {"broken.nii.gz", "missing.nii.gz"}
    assert all(len(r["error"].splitlines()) == 1 and "report" not in r for r in bad.values())
    good = [r for r in rows if r["status"] == "ok"]
    for r in good:
        name = os.path.basename(r["path"]).removesuffix(".nii.gz")
        assert (out / f"{name}.txt").read_text() == r["report"] + "\n"
        assert json.loads((out / f"{name}.json").read_text()) == r
        # The batch's own fields, then the result record (Result.to_record) under its names.
        assert list(r) == ["path", "input", "sha256", "finished", "status",
                           *(f for f in RECORD_FIELDS if f != "choice_nll")]
        assert r["identity"]["llm"] and r["encoders"] in ("fp32", "int8", "bf16") and r["scan"]["shape"]
        assert r["sha256"] and set(r["timings"]) >= {"load", "vit", "llm_decode", "wall"} and r["new_tokens"] > 0

    # Rerun: the reported scans are skipped; a changed file is reported again; the failures are tried again.
    p = make_phantom(12)
    save_nifti(str(other / "extra.nii.gz"), p.volume, p.spacing)
    proc = run()
    assert proc.returncode == 1 and "1 reported, 3 already done, 2 failed" in proc.stderr, proc.stderr
    assert len((out / "reports.jsonl").read_text().splitlines()) == 6

    # All good: exit 0.
    os.remove(scans / "broken.nii.gz")
    worklist.write_text("path\nelsewhere/extra.nii.gz\n")
    proc = run()
    assert proc.returncode == 0 and "0 reported, 4 already done, 0 failed" in proc.stderr, proc.stderr


def test_several_scans_without_out_print_one_json_line_each(quick, scan_paths):
    proc = run_cli("samf", "report", *scan_paths[:2], "--bundle", quick.bundle, "--max-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["input"] for r in rows) == sorted(scan_paths[:2]) and all(r["status"] == "ok" for r in rows)
    assert all(r["path"] == os.path.abspath(r["input"]) and r["scan"]["format"] == "nifti" for r in rows)


def test_a_worklist_is_files_series_folders_folders_of_scans_and_lists(tmp_path):
    from samf.runtime.service.worklist import expand_worklist

    scans = tmp_path / "scans"
    (scans / "series_b").mkdir(parents=True)
    (scans / "series_b" / "1.dcm").write_bytes(b"x")
    for name in ("a.nii.gz", "c.npy", "notes.md", ".hidden.nii.gz"):
        (scans / name).write_bytes(b"x")
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001").write_bytes(b"x")
    studies = tmp_path / "studies"
    (studies / "s1").mkdir(parents=True)
    (studies / "s2").mkdir()
    lst = tmp_path / "list.txt"
    lst.write_text("# today\n\nscans/a.nii.gz\n/abs/x.nii\n")
    got = expand_worklist([str(scans), str(series), str(studies), str(scans / "c.npy")], [str(lst)])
    assert got == [str(scans / "a.nii.gz"), str(scans / "c.npy"), str(scans / "series_b"), str(series),
                   str(studies / "s1"), str(studies / "s2"), "/abs/x.nii"]


def test_a_worklist_csv_without_a_path_column_is_refused(tmp_path, quick):
    bad = tmp_path / "list.csv"
    bad.write_text("file\na.nii.gz\n")
    proc = invoke_cli("samf", "report", "--worklist", str(bad), "--bundle", quick.bundle)
    assert proc.returncode == 2 and "needs a column named path" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bench_measures_each_concurrency(quick):
    from samf.runtime.tools.bench import format_bench, run_bench

    out = run_bench(quick.bundle, quick.data, n_scans=3, quants=["F32"], new_tokens=5, encoders=("fp32",),
                    concurrency=(1, 2))
    rows = out["concurrency"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert r["scans"] == 3 and r["new_tokens"] == 15 and r["decode_tok_s"] > 0 and r["scans_per_hour"] > 0
        assert r["same_report_as_first"] == 1.0 and r["latency_p90_s"] >= r["latency_p50_s"] > 0
    assert "| 2 | llm-F32.gguf | fp32 |" in format_bench(out)


def test_llama_threads_follow_the_cores_other_programs_leave(tmp_path):
    """Other processes' CPU time, read from /proc/stat between two samples, takes cores away from llama.cpp's
    threads (at least one is kept); an idle machine gives them all back."""
    from samf.engines.native import CoreShare

    cpus = sorted(os.sched_getaffinity(0))
    stat = tmp_path / "stat"

    def write(ticks):
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{c} {ticks} 0 0 1000 0 0 0 0 0 0" for c in cpus]
        stat.write_text("\n".join(lines) + "\n")

    write(0)
    share = CoreShare(cores=len(cpus), min_interval_s=0.0, stat_path=str(stat))
    assert share.threads() == len(cpus)  # no second sample yet: all cores
    write(10**9)  # every core busy for ages (in clock ticks) since the last sample: someone else's
    assert share.threads() == 1
    write(10**9)  # nothing more since: all cores free again
    assert share.threads() == len(cpus)
