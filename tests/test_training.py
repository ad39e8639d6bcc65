"""Training stages beyond the fixture's defaults: InfoNCE, the ablation switches, resume, bf16/accumulation,
the offline metrics and the evaluation record."""

import os

import numpy as np
import pytest
import torch

from samf.train import finetune as FT
from samf.train import run_folder as R
from samf.train import stages as S
from samf.train.ablation import copy_shared
from samf.train.run_files import (
    CHECKPOINTS_DIR,
    CONFIG_DIR,
    DINO_FILE,
    FINETUNE_DIR,
    METRICS_FILE,
    RUN_FILE,
    TOKENIZER_MODEL,
    WARMUP_FILE,
)


def _cell(quick, tmp_path):
    """A run folder with the fixture's shared stages (tokenizer, DINO, LM base, warm-up), for a fresh finetune."""
    run = str(tmp_path / "run")
    copy_shared(quick.run, run)
    return run


def test_info_nce_matches_its_definition():
    from samf.train.warmup import info_nce

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    s = an @ bn.T / 0.1
    row = -(torch.diag(s) - torch.logsumexp(s, 1)).mean()
    col = -(torch.diag(s) - torch.logsumexp(s, 0)).mean()
    assert torch.allclose(info_nce(a, b, 0.1), 0.5 * (row + col), atol=1e-5)
    assert info_nce(a, a, 0.1) < info_nce(a, b, 0.1)      # matching pairs score lower


def test_views_split_adjacent_slices_of_every_plane():
    from samf.train.warmup import split_views

    z = torch.ones(1, 12, 2)                              # 3 planes × 4 slices
    a, b = split_views(z, 4)
    assert a[0, :, 0].tolist() == [1, 0, 1, 0] * 3 and torch.equal(a + b, z)


def test_warmup_saves_the_aggregator_and_its_config(quick):
    """(That its InfoNCE falls is a learning test, in test_learning.py.)"""
    import json

    assert os.path.exists(os.path.join(quick.run, WARMUP_FILE))
    assert json.load(open(os.path.join(quick.run, CONFIG_DIR, "warmup-3d.json")))["tau"] == 0.1


def test_stage_options_are_the_config_fields_and_the_preset_comes_between(quick, tmp_path):
    """samf-train's stage options are generated from the config dataclasses (each default written once): one
    option per field with help, None unless given, so a value comes from the command line, else the run
    preset's stage_defaults, else the dataclass."""
    import dataclasses
    import json

    from click.testing import CliRunner

    from samf.cli.train_cli import _config, main
    from samf.train.configs import DinoConfig, FinetuneConfig, LMConfig, WarmupConfig

    for command, cls in (("pretrain-2d", DinoConfig), ("warmup-3d", WarmupConfig), ("pretrain-lm", LMConfig),
                         ("finetune", FinetuneConfig)):
        params = {p.name: p for p in main.commands[command].params}
        fields = {f.name for f in dataclasses.fields(cls) if "help" in f.metadata}
        assert fields <= set(params) and all(params[n].default is None for n in fields), command
    run = _cell(quick, tmp_path)
    preset = json.load(open(os.path.join(run, RUN_FILE)))
    json.dump({**preset, "stage_defaults": {"finetune": {"batch_size": 3, "lr": 0.01}}},
              open(os.path.join(run, RUN_FILE), "w"))
    cfg = _config(FinetuneConfig, run, "finetune", lr=0.5, steps=None)
    assert (cfg.lr, cfg.batch_size, cfg.steps) == (0.5, 3, FinetuneConfig().steps)

    res = CliRunner().invoke(main, ["finetune", "--data", quick.data, "--run", run, "--steps", "1",
                                    "--lora-targets", "qkv_proj, o_proj", "--train-vit", "--tasks", "report",
                                    "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ran = json.load(open(os.path.join(run, CONFIG_DIR, "finetune.json")))
    assert ran["lora_targets"] == ["qkv_proj", "o_proj"] and ran["freeze_vit"] is False
    assert (ran["steps"], ran["batch_size"], ran["lr"], ran["tasks"]) == (1, 3, 0.01, "report")
    assert ran["mcq_fraction"] == FinetuneConfig().mcq_fraction


def test_ablation_switches_freeze_and_override(quick, tmp_path):
    run = _cell(quick, tmp_path)
    cfg = FT.FinetuneConfig(steps=2, batch_size=2, warmup=True, freeze_aggregator=True, ao2d=False, tasks="report")
    FT.stage_finetune(run, quick.train[:8], cfg, progress=False)
    vlm = FT.load_finetuned(run)
    assert vlm.image_cfg.fusion.ao2d is False             # the override reaches the saved model
    warm = torch.load(os.path.join(run, WARMUP_FILE), weights_only=True)["aggregator"]
    for k, v in vlm.encoder.aggregator.state_dict().items():
        assert torch.equal(v, warm[k]), k                 # frozen: exactly the warm-up's weights
    dino = torch.load(os.path.join(run, DINO_FILE), weights_only=True)
    assert all(torch.equal(v, dino[k]) for k, v in vlm.encoder.vit.state_dict().items())
    with pytest.raises(FileNotFoundError, match="warmup-3d"):
        os.remove(os.path.join(run, WARMUP_FILE))
        FT.stage_finetune(run, quick.train[:8], cfg, progress=False)


def test_interrupted_finetune_resumes_to_the_same_weights(quick, tmp_path, monkeypatch):
    cfg = FT.FinetuneConfig(steps=6, batch_size=2, save_every=2)
    exs = quick.train[:8]
    ref_run = _cell(quick, tmp_path / "a")
    ref = FT.stage_finetune(ref_run, exs, cfg, progress=False)

    run = _cell(quick, tmp_path / "b")
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def crash_on_fifth(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        FT.stage_finetune(run, exs, cfg, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert os.path.exists(os.path.join(run, CHECKPOINTS_DIR, "finetune.pt"))
    assert not os.path.exists(os.path.join(run, FINETUNE_DIR))        # nothing half-written
    resumed = FT.stage_finetune(run, exs, cfg, progress=False)
    assert resumed == pytest.approx(ref, abs=1e-6)
    a = FT.load_finetuned(ref_run).state_dict()
    b = FT.load_finetuned(run).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not os.path.exists(os.path.join(run, CHECKPOINTS_DIR, "finetune.pt"))
    from samf.train.checkpoint import ResumeError, StageCheckpoint

    ck = StageCheckpoint(run, "finetune", {"steps": 6}, every=1)
    ck.maybe_save(1, lambda: {})
    with pytest.raises(ResumeError, match="--restart"):
        FT.stage_finetune(run, exs, cfg, progress=False)


def test_image_stages_start_from_their_seed_not_the_global_rng(quick, tmp_path):
    """Two runs of pretrain-2d and warmup-3d give the same weights whatever the process drew before."""
    from samf.train.dino import DinoConfig
    from samf.train.warmup import WarmupConfig

    weights = []
    for i, name in enumerate("ab"):
        run = _cell(quick, tmp_path / name)
        torch.manual_seed(1234 + i)                       # what an earlier stage or test left behind
        S.stage_pretrain_2d(run, quick.train[:4], DinoConfig(steps=2, batch_size=4), progress=False)
        torch.rand(7)
        S.stage_warmup_3d(run, quick.train[:8], WarmupConfig(steps=2, batch_size=4), progress=False)
        weights.append([torch.load(os.path.join(run, f), weights_only=True)
                        for f in (DINO_FILE, WARMUP_FILE)])
    (vit_a, agg_a), (vit_b, agg_b) = weights
    assert all(torch.equal(v, vit_b[k]) for k, v in vit_a.items())
    assert all(torch.equal(v, agg_b["aggregator"][k]) for k, v in agg_a["aggregator"].items())


def test_single_process_stages_refuse_torchrun(tmp_path, monkeypatch):
    from samf.errors import SamfError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for stage in (S.stage_warmup_3d, S.stage_pretrain_lm):
        with pytest.raises(SamfError, match="without torchrun"):
            stage(str(tmp_path), [], S.LMConfig() if stage is S.stage_pretrain_lm else None, progress=False)
    assert os.listdir(tmp_path) == []                     # refused before writing anything


def test_bf16_accumulation_and_checkpointing_run(quick, tmp_path):
    run = _cell(quick, tmp_path)
    cfg = FT.FinetuneConfig(steps=2, batch_size=2, grad_accum=2, precision="bf16", grad_checkpointing=True,
                           tasks="mcq")
    losses = FT.stage_finetune(run, quick.train[:8], cfg, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    rows = [ln for ln in open(os.path.join(run, METRICS_FILE)) if '"finetune"' in ln]
    assert '"bf16": true' in rows[-1]


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(quick):
    """--grad-accum 2 with batches of 2 is a batch of 4: the same loss and gradient in fp32, and in bf16 autocast
    the same up to bf16's rounding (other padding, other matmul shapes). The mean of the micro-batches' means,
    which accumulation used to take, is measurably another gradient when answers differ in length."""
    import random

    from samf.train.distributed import DistributedContext
    from samf.train.finetune import _autocast, _task_sample, accumulate_gradients
    from samf.train.run_folder import base_tokenizer, build_vlm

    tok = base_tokenizer(quick.run)
    torch.manual_seed(0)
    vlm = build_vlm(quick.run, tok=tok).eval()  # dropout off; every weight takes a gradient
    rng = random.Random(3)
    samples = [(ex, *_task_sample(ex, tok, rng, 0.5)) for ex in quick.train[:4]]
    assert len({len(a) for _, _, a in samples}) > 1
    dist = DistributedContext.from_env()

    def gradient(micro_batches, precision):
        vlm.zero_grad(set_to_none=True)
        loss, _ = accumulate_gradients(vlm, micro_batches, _autocast(precision, torch.device("cpu"))[0], dist)
        return loss, torch.cat([p.grad.flatten() for p in vlm.parameters() if p.grad is not None])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    whole_loss, whole = gradient([samples], "fp32")
    split_loss, split = gradient([samples[:2], samples[2:]], "fp32")
    assert split_loss == pytest.approx(whole_loss, rel=1e-6) and rel(split, whole) < 1e-5
    bf16_loss, bf16 = gradient([samples[:2], samples[2:]], "bf16")
    assert bf16_loss == pytest.approx(whole_loss, rel=2e-2) and rel(bf16, whole) < 0.05

    vlm.zero_grad(set_to_none=True)
    for part in (samples[:2], samples[2:]):
        slices = torch.from_numpy(np.stack([ex.slices for ex, _, _ in part]))
        (vlm(slices, [p for _, p, _ in part], [a for _, _, a in part]) / 2).backward()
    mean_of_means = torch.cat([p.grad.flatten() for p in vlm.parameters() if p.grad is not None])
    print(f"fp32 {rel(split, whole):.1e}, bf16 {rel(bf16, whole):.1e}, mean of means {rel(mean_of_means, whole):.1e}")
    assert rel(mean_of_means, whole) > 100 * rel(split, whole) and rel(mean_of_means, whole) > 1e-3


REFS = ["There is a left pleural effusion. Heart size is normal.", "Cardiomegaly is noted. No nodule."]


def test_report_metrics_of_identical_and_unrelated_reports(monkeypatch):
    """Without Java (hidden here: METEOR 1.5's JVM takes 5-8 s to start; the slow test below runs it) METEOR is
    absent with its reason, and the rest is scored."""
    import shutil

    from samf.train import metrics

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    same = metrics.report_metrics(REFS, REFS, bertscore_model=None)
    assert same["bleu1"] == pytest.approx(100) and same["bleu4"] == pytest.approx(100)
    assert same["rougeL"] == pytest.approx(1.0)
    assert same["meteor"] is None and "needs Java" in same["notes"]["meteor"]
    other = metrics.report_metrics(["No acute findings.", "Normal study."], REFS, bertscore_model=None)
    assert other["bleu4"] < 10 and other["rougeL"] < 0.3
    assert other["bertscore_f1"] is None and "absent" in other["notes"]["bertscore_f1"]


@pytest.mark.slow
def test_meteor_and_bertscore_through_their_libraries():
    """METEOR 1.5 (Java) and BERTScore (all-MiniLM-L6-v2 from its package): 1 for identical reports, low for
    unrelated ones. Slow: their start takes 12-15 s."""
    from samf.train.metrics import report_metrics

    same = report_metrics(REFS, REFS)
    assert same["meteor"] == pytest.approx(1.0, abs=1e-3) and same["bertscore_f1"] == pytest.approx(1.0, abs=1e-3)
    other = report_metrics(["No acute findings.", "Normal study."], REFS)
    assert other["meteor"] < 0.1 and other["bertscore_f1"] < 0.9


def test_mcq_and_label_metrics():
    from samf.train.metrics import label_metrics, mcq_metrics

    m = mcq_metrics(["A. yes.", "B. no.", "I am not sure"], ["A", "C", "B"])
    assert m["accuracy"] == pytest.approx(1 / 3)
    # Macro over A-D: A is right (P = R = F = 1); B, C and D score 0 (B predicted for a C, C never predicted,
    # D absent, the unparseable answer counts for no letter).
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((0.25, 0.25, 0.25))
    lab = label_metrics(REFS, [{"Pleural effusion": True, "Cardiomegaly": False},
                               {"Pleural effusion": False, "Cardiomegaly": True}])
    assert lab["macro"]["f1"] == pytest.approx(1.0)


def test_evaluation_record_has_every_metric(quick, monkeypatch):
    from samf.train.evaluate import evaluate_model, format_summary, summary_row
    from samf.train.llm_folder import LLMTokenizer
    from samf.train.vlm import SamfVLM

    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)  # no METEOR JVM (see above)
    vlm = SamfVLM.from_checkpoint(quick.merged)
    tok = LLMTokenizer(quick.merged)
    res = evaluate_model(vlm, tok, quick.test[:3], bertscore_model=None, progress=False)
    reports, mcq = res["image"]["reports"], res["image"]["mcq"]
    assert 0 <= reports["bleu1"] <= 100 and 0 <= reports["bleu4"] <= reports["bleu1"]
    assert 0 <= reports["rougeL"] <= 1
    assert reports["meteor"] is None and "needs Java" in reports["notes"]["meteor"]
    assert reports["bertscore_f1"] is None and "absent" in reports["notes"]["bertscore_f1"]  # no model given
    assert mcq["n"] > 0 and all(0 <= mcq[k] <= 1 for k in ("accuracy", "precision", "recall", "f1"))
    assert len(res["image"]["labels"]["per_label"]) == 18 and "findings" in res["zeroed"]
    assert "| image |" in format_summary({"image": summary_row(res)})


WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def _launch(quick, tmp_path, stage, name, *args, ranks=2, fresh=True, data=None):
    """Run the worker (under torchrun with ``ranks`` 2) in its own run folder, on ``data`` (the quick run's
    phantoms by default); its per-rank records."""
    import json
    import subprocess
    import sys

    base = tmp_path / name
    run, out = base / "run", base / f"out{len(list(base.glob('out*')))}"
    if fresh:
        copy_shared(quick.run, str(run))
    out.mkdir(parents=True)
    launcher = [sys.executable, *(TORCHRUN if ranks == 2 else ())]
    proc = subprocess.run([*launcher, WORKER, stage, str(run), data or quick.data, str(out), *args],
                          capture_output=True, text=True, timeout=600)
    return proc, [json.load(open(out / f)) for f in sorted(os.listdir(out))]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain-2d"])
def test_two_ranks_average_their_gradients(quick, tmp_path, stage):
    """torchrun with two CPU ranks (gloo): the ranks draw different batches yet keep identical weights, and
    rank 0 -- which draws what a single process draws -- ends elsewhere than that process."""
    proc, (single,) = _launch(quick, tmp_path, stage, "single", ranks=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, (r0, r1) = _launch(quick, tmp_path, stage, "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(r0["sums"]) == len(r1["sums"]) == 4
    assert r0["sums"] == pytest.approx(r1["sums"], rel=1e-12)      # gradients averaged: same weights
    assert r0["losses"] == r1["losses"]                              # the logged loss is the mean over ranks
    assert r0["sums"][0] != pytest.approx(single["sums"][0], rel=1e-9)  # rank 1's batch counted
    assert r0["losses"][0] != pytest.approx(single["losses"][0], rel=1e-6)


@pytest.mark.slow
def test_two_ranks_stream_disjoint_shares_of_a_cache_and_resume_in_it(quick, tmp_path):
    """finetune from a prepared cache under torchrun: in each epoch the two ranks are given different scans,
    together all of them; the weights stay equal; killed after its checkpoint, the run resumes at its place in
    the stream, to the weights and the scans of a run never stopped."""
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.train.run_folder import read_run
    from samf.train.scan_cache import prepare_cache

    cache = str(tmp_path / "cache")
    pre = PreprocessConfig.from_dict(read_run(quick.run)["preprocess"])
    prepare_cache(quick.data, cache, pre, splits=["train"], progress=False, echo=lambda m: None)
    proc, (r0, r1) = _launch(quick, tmp_path, "finetune", "ddp", "--cache", data=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r0["sums"] == pytest.approx(r1["sums"], rel=1e-12)
    n = len(quick.train)                       # 16 scans: an epoch is 8 per rank, the 4 steps × 2 take 8
    assert len(r0["scans"]) == len(r1["scans"]) == n // 2
    assert sorted(r0["scans"] + r1["scans"]) == list(range(n))

    proc, _ = _launch(quick, tmp_path, "finetune", "killed", "--cache", "--crash-at", "4", data=cache)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    proc, (k0, k1) = _launch(quick, tmp_path, "finetune", "killed", "--cache", fresh=False, data=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert k0["scans"] == r0["scans"][4:] and k1["scans"] == r1["scans"][4:]   # steps 3-4: where it stopped
    assert k0["sums"] == pytest.approx(r0["sums"][2:], rel=1e-9) and k0["losses"] == pytest.approx(r0["losses"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain-2d"])
def test_zero_shards_adamw_and_a_killed_run_resumes_exactly(quick, tmp_path, stage):
    """--zero: each rank keeps the AdamW moments of part of the weights only, the weights follow plain DDP's,
    and a two-rank run killed after its checkpoint resumes (gathered moments, every rank's RNG) to the same
    weights as one never stopped."""
    proc, (d0, _) = _launch(quick, tmp_path, stage, "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, (z0, z1) = _launch(quick, tmp_path, stage, "zero", "--zero")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert z0["sums"] == pytest.approx(z1["sums"], rel=1e-12)
    assert z0["sums"] == pytest.approx(d0["sums"], rel=1e-9) and z0["losses"] == pytest.approx(d0["losses"])
    assert 0 < z0["moments"][-1] < d0["moments"][-1] and z0["moments"][-1] + z1["moments"][-1] == d0["moments"][-1]

    proc, _ = _launch(quick, tmp_path, stage, "killed", "--zero", "--crash-at", "4")
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    proc, (k0, k1) = _launch(quick, tmp_path, stage, "killed", "--zero", fresh=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(k0["sums"]) == 2                                      # resumed after the step-2 checkpoint
    assert k0["sums"] == k1["sums"] == z0["sums"][2:]
    assert k0["losses"] == z0["losses"]


def test_a_stage_tears_down_the_process_group_it_brought_up(monkeypatch):
    """Every way out of a torchrun stage destroys the group it created (gloo's threads alive at interpreter
    exit made ranks die with SIGABRT now and then), leaves alone a group its caller owns, and turns a
    collective broken by a dead peer into PeerRankFailed, so that rank does not print a traceback."""
    import torch.distributed as dist

    from samf.errors import PeerRankFailed
    from samf.train.distributed import owns_process_group

    def up():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    @owns_process_group
    def stage(fail=None):
        if not dist.is_initialized():
            up()
        assert dist.is_initialized()
        if fail:
            raise fail
        return "done"

    assert stage() == "done" and not dist.is_initialized()
    with pytest.raises(KeyboardInterrupt):
        stage(KeyboardInterrupt())
    assert not dist.is_initialized()
    with pytest.raises(PeerRankFailed, match="another rank failed"):
        stage(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234"))
    assert not dist.is_initialized()
    with pytest.raises(ValueError):
        stage(ValueError("a bug"))
    assert not dist.is_initialized()
    up()
    try:
        assert stage() == "done" and dist.is_initialized()        # the caller's group is the caller's to end
    finally:
        dist.destroy_process_group()


FAILING_RANK = os.path.join(os.path.dirname(__file__), "ddp_failing_rank.py")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain-2d"])
@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_rank_ends_the_run_with_its_error_once(quick, tmp_path, stage, failing):
    """One rank's error, raised while the other waits in a collective: the run exits non-zero well within the
    time limit (no rank hangs), the error is printed once as one line, and no rank prints a traceback."""
    import subprocess
    import sys

    from samf.runtime.tools.phantom import generate_phantom_dataset

    data, run = tmp_path / "data", tmp_path / "run"
    generate_phantom_dataset(str(data), 6, 1, seed=3, progress=False)
    copy_shared(quick.run, str(run))
    extra = ["--batch-size", "2"] if stage == "finetune" else []
    proc = subprocess.run([sys.executable, *TORCHRUN, FAILING_RANK, str(failing), "2", "--", stage,
                           "--data", str(data), "--run", str(run), "--steps", "4", "--quiet", *extra],
                          capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(f"injected failure on rank {failing}") == 1, out[-3000:]
    assert out.count(f"error: rank {failing}: injected failure") == 1
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert f'File "{repo}' not in out, out[-3000:]                  # torchrun's own summary aside, no traceback
    assert "terminate called" not in out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain-2d"])
def test_two_rank_runs_exit_cleanly_ten_times_in_a_row(quick, tmp_path, stage):
    """The SIGABRT at exit ("terminate called without an active exception") came now and then: ten two-rank runs
    of each stage in a row must all exit 0 with nothing of the kind on stderr."""
    for i in range(10):
        proc, ranks = _launch(quick, tmp_path, stage, f"run{i}")
        assert proc.returncode == 0 and len(ranks) == 2, f"run {i + 1}/10: {proc.stderr[-3000:]}"
        assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr


@pytest.mark.slow
def test_ablation_grid_is_one_command_and_a_rerun_keeps_its_cells(tmp_path):
    import json

    from samf.train.ablation import GRID, ZEROED, AblationConfig, run_ablation

    cfg = AblationConfig(out_dir=str(tmp_path / "abl"), n_train=12, n_test=3, dino_steps=2, lm_steps=2,
                         finetune_steps=2, seeds=(0, 1), bootstrap=50, progress=False)
    first = run_ablation(cfg, echo=lambda m: None)
    table = open(tmp_path / "abl" / "ablation.md").read()
    for name, _ in GRID:
        assert f"| {name} |" in table
    assert f"| {ZEROED} |" in table and "| majority class |" in table and "2 seeds" in table
    for row in first["rows"].values():
        for k, r in row.items():
            assert 0 <= r["ci95"][0] <= r["ci95"][1] <= 1 and 0 <= r["mean"] <= 1, k
    cells = tmp_path / "abl" / "cells"
    mtimes = {c: os.path.getmtime(cells / c / "result.json") for c in os.listdir(cells)}
    assert len(mtimes) == len(GRID) * 2
    again = run_ablation(cfg, echo=lambda m: None)
    assert again["table"] == first["table"]
    assert {c: os.path.getmtime(cells / c / "result.json") for c in os.listdir(cells)} == mtimes
    fusions = {json.load(open(cells / c / "result.json"))["switches"]["fusion"] for c in os.listdir(cells)}
    assert fusions == {"2d", "3d", "concat", "samf"}


def test_the_recipe_runs_its_stages_in_one_order_and_refuses_unknown_ones(quick, tmp_path):
    import contextlib

    from samf.train.recipe import RecipeSteps, run_recipe

    run = str(tmp_path / "run")
    R.init_run(run, R.tiny_preset())
    with pytest.raises(ValueError, match="unknown stages"):
        run_recipe(run, quick.train, stages=("finetune", "pretrain-3d"))
    entered, ended = [], []
    out = run_recipe(run, quick.train[:40], RecipeSteps(warmup=0), stages=("warmup-3d", "tokenizer"),
                     on_stage=lambda name: entered.append(name) or contextlib.nullcontext(),
                     after=lambda name, result: ended.append((name, result.vocab_size())), progress=False)
    assert entered == ["tokenizer"] and list(out) == ["tokenizer"]  # a zero-step warm-up is skipped
    assert ended == [("tokenizer", out["tokenizer"].vocab_size())]
    assert os.path.exists(os.path.join(run, TOKENIZER_MODEL))
