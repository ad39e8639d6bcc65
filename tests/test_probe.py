"""Reading the image: the probes per stage, the auxiliary finding loss, the fusion's ablation baselines, and the
measures of a report's form (the phantom grammar, distinct reports)."""

import json
import os

import numpy as np
import pytest
import torch
from cli_runner import invoke_cli, run_cli

from samf.train import finetune as FT
from samf.train.ablation import copy_shared
from samf.train.run_files import FINETUNE_DIR, MERGED_DIR, METRICS_FILE, RUN_FILE, TRAINING_FILE


def _cell(quick, tmp_path):
    run = str(tmp_path / "run")
    copy_shared(quick.run, run)
    return run


def test_probes_score_every_stage_and_the_reports_of_a_run(quick):
    from samf.train.probe import FEATURE_STAGES, PHANTOM_TARGETS, REPORT_ROWS, ProbeConfig, format_probes, run_probes

    res = run_probes(quick.run, quick.train, quick.test, ProbeConfig(), progress=False)
    assert res["model"] == MERGED_DIR and (res["n_train"], res["n_test"]) == (len(quick.train), len(quick.test))
    assert list(res["stages"]) == list(FEATURE_STAGES) + list(REPORT_ROWS)
    for stage, acc in res["stages"].items():
        assert set(acc) == set(PHANTOM_TARGETS) and all(0.0 <= v <= 1.0 for v in acc.values()), stage
    table = format_probes(res)
    assert "| majority class |" in table and "| report, swapped image |" in table


def test_a_probe_separates_what_a_feature_carries_from_what_it_does_not():
    from samf.train.probe import probe_accuracy

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(str)
    carried = rng.normal(size=(200, 30)) + (y == "1")[:, None] * 1.5
    noise = rng.normal(size=(200, 30))
    assert probe_accuracy(carried[:150], y[:150], carried[150:], y[150:]) > 0.9
    assert probe_accuracy(noise[:150], y[:150], noise[150:], y[150:]) < 0.75


def test_small_slices_average_each_slice_onto_a_12_by_12_grid():
    from samf.train.probe import small_slices

    x = np.arange(2 * 1 * 48 * 48, dtype=np.float32).reshape(2, 1, 48, 48)
    out = small_slices(x).reshape(2, 1, 12, 12)
    assert out[1, 0, 3, 5] == pytest.approx(x[1, 0, 12:16, 20:24].mean())


def test_probe_refuses_what_it_cannot_read_in_one_line(quick, tmp_path):
    empty = tmp_path / "notarun"
    empty.mkdir()
    proc = run_cli("samf-train", "probe", "--run", str(empty), "--data", quick.data)
    assert proc.returncode != 0 and "not a run folder" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    run = str(tmp_path / "fresh")
    os.makedirs(run)
    json.dump(json.load(open(os.path.join(quick.run, RUN_FILE))), open(os.path.join(run, RUN_FILE), "w"))
    proc = invoke_cli("samf-train", "probe", "--run", run, "--data", quick.data)  # in this process: torch is here
    assert proc.returncode != 0 and "no trained model yet" in proc.stderr and "Traceback" not in proc.stderr


def test_probe_refuses_data_without_labels(quick):
    from samf.train.data import DataError
    from samf.train.probe import targets_of

    unlabelled = [type(quick.train[0])(image="x", slices=quick.train[0].slices, report="r", findings={})] * 3
    with pytest.raises(DataError, match="no finding labels"):
        targets_of(unlabelled)


def test_finetune_mcq_on_data_without_questions_is_one_line_before_training(quick, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(quick.data, data)
    os.remove(data / "questions.jsonl")
    run = _cell(quick, tmp_path)
    # In this process: a fresh one spends 4 s of CPU importing torch, transformers and peft before the one line.
    proc = invoke_cli("samf-train", "finetune", "--run", run, "--data", str(data), "--tasks", "mcq", "--steps", "1",
                      "--quiet")
    assert proc.returncode != 0 and "no multiple-choice questions" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(os.path.join(run, FINETUNE_DIR))


def test_the_finding_loss_is_trained_logged_and_carried_into_the_manifest(quick, tmp_path):
    from samf.train.merge import stage_merge

    run = _cell(quick, tmp_path)
    FT.stage_finetune(run, quick.train[:8], FT.FinetuneConfig(steps=3, batch_size=4, aux_weight=2.0), progress=False)
    rows = [json.loads(ln) for ln in open(os.path.join(run, METRICS_FILE))]
    assert len([r for r in rows if "finding_loss" in r]) == 3 and all(r["finding_loss"] > 0 for r in rows)
    merged = stage_merge(run)
    assert json.load(open(os.path.join(merged, TRAINING_FILE)))["finetune"]["aux_weight"] == 2.0
    manifest = json.load(open(os.path.join(quick.bundle, "manifest.json")))
    assert manifest["training"]["finetune"]["aux_weight"] == FT.FinetuneConfig().aux_weight


def test_the_papers_recipe_has_no_finding_loss(quick, tmp_path):
    run = _cell(quick, tmp_path)
    FT.stage_finetune(run, quick.train[:8], FT.FinetuneConfig(steps=2, batch_size=4, aux_weight=0.0), progress=False)
    rows = [json.loads(ln) for ln in open(os.path.join(run, METRICS_FILE))]
    assert rows and not any("finding_loss" in r for r in rows)


def test_finding_labels_follow_ctrate_order_and_mark_what_is_unknown():
    from samf.train.labels import CTRATE_LABELS

    labels, known = FT.finding_labels({"Cardiomegaly": 1, "Emphysema": 0})
    assert known.sum() == 2 and labels[CTRATE_LABELS.index("Cardiomegaly")] == 1.0
    labels, known = FT.finding_labels({})
    assert known.sum() == 0


def test_a_frozen_vit_run_once_per_scan_trains_as_the_vit_run_every_step(quick, tmp_path, monkeypatch):
    """The memo of a frozen ViT's outputs changes how often the ViT runs, not the losses."""
    cfg = FT.FinetuneConfig(steps=3, batch_size=4)
    with_memo = FT.stage_finetune(_cell(quick, tmp_path / "a"), quick.train[:8], cfg, progress=False)
    monkeypatch.setattr(FT.FrozenViTInputs, "__call__", lambda self, ex: ex.model_input)
    without = FT.stage_finetune(_cell(quick, tmp_path / "b"), quick.train[:8], cfg, progress=False)
    assert np.allclose(with_memo, without, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["samf", "2d", "3d", "concat"])
def test_each_fusion_reads_only_what_its_row_of_the_ablation_says(mode):
    from samf.train.models import SAMF, FusionConfig

    torch.manual_seed(0)
    f = SAMF(FusionConfig(d2d=12, d3d=10, d_text=14, d_proj=8, d_llm=20, mode=mode), n_rows=5).eval()
    z2d, z3d, text, mask = torch.randn(2, 18, 12), torch.randn(2, 5, 10), torch.randn(2, 7, 14), torch.ones(2, 7)
    out = f(z2d, z3d, text, mask)
    assert out.shape == (2, 5, 20)
    moved_2d = not torch.allclose(out, f(z2d + 1.0 * torch.randn_like(z2d), z3d, text, mask))
    moved_3d = not torch.allclose(out, f(z2d, z3d + torch.randn_like(z3d), text, mask))
    assert (moved_2d, moved_3d) == {"samf": (True, True), "2d": (True, False), "3d": (False, True),
                                    "concat": (True, True)}[mode]
    with pytest.raises(ValueError, match="not one of"):
        SAMF(FusionConfig(mode="mean"))


def test_the_phantom_grammar_holds_every_reference_sentence_and_no_broken_one():
    from samf.runtime.tools.phantom import is_grammatical, make_phantom, report_sentences
    from samf.train.evaluate import distinct_share, sentence_share

    # Small volumes (1/64 of the voxels, 3.4 s of CPU less): the findings are drawn before the volume, whose size
    # changes which phrasings are drawn, not what a report can say.
    reports = [make_phantom(900_000 + i, shape=(16, 24, 24)).report for i in range(200)]
    assert sentence_share(reports) == 1.0
    assert all(is_grammatical(t) for r in reports for t in report_sentences(r))
    for broken in ("There is a left upper lobe.", "right pleural effusion.", "A 12 mm nodule is seen in the left",
                   "No pleural effusion. No pleural effusion"):
        assert not is_grammatical(broken), broken
    assert distinct_share(reports) > 0.9 and distinct_share(["a"] * 9 + ["b"]) == 0.2


def test_majority_class_is_the_held_out_scans_most_common_value():
    from samf.train.evaluate import majority_accuracy

    truths = [dict(nodule=True, nodule_side="left", nodule_lobe="upper", effusion="none", cardiomegaly=False,
                   emphysema=True)] * 3 + [dict(nodule=False, nodule_side="none", nodule_lobe="none",
                                                effusion="left", cardiomegaly=True, emphysema=False)]
    acc = majority_accuracy(truths)
    assert acc["effusion"] == 0.75 and acc["nodule_side"] == 1.0 and acc["nodule"] == 0.75
