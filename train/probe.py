"""Linear probes per stage: where a run's model keeps the findings and where it loses them (``samf-train probe``).

For each stage of the image path a logistic regression is fitted on the training split's features and scored on
held-out scans, per finding:

    slices       the preprocessed slices, each area-averaged to 12×12 per window, concatenated
    vit          the ViT's standardised per-slice outputs, concatenated over the 3·S slices
    vit_mean     the same, averaged over the slices (what a pooling aggregator starts from)
    aggregator   the aggregator's N volume tokens, concatenated
    fusion       the fused rows averaged over the N image tokens (what the finding head reads)

and the LLM's generated reports are scored with the image rows as they are, zeroed, and swapped with another
scan's (scored against this scan's truth: what the report owes to the image). A finding a probe reads at one
stage and not at the next is lost between the two. Phantom data is probed on its four core findings; any
other dataset with labels (CT-RATE's 18) on each label it carries.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from samf.runtime.inference.prompt import REPORT_REQUESTS

from .configs import ProbeConfig
from .data import DataError
from .run_files import FINETUNE_DIR, MERGED_DIR, MODULES_FILE, RUN_FILE

FEATURE_STAGES = ("slices", "vit", "vit_mean", "aggregator", "fusion")
REPORT_ROWS = ("report", "report, zeroed image", "report, swapped image")
PHANTOM_TARGETS = ("effusion", "cardiomegaly", "emphysema", "nodule")
SMALL_SIDE = 12


def targets_of(examples: list) -> dict:
    """``{finding: [value per example]}``: a phantom's four core findings, else every CT-RATE label that the
    examples carry. Refused in one line when the data carries neither."""
    from .labels import truth_labels

    if all("effusion" in ex.findings for ex in examples):
        return {k: [str(ex.findings[k]) for ex in examples] for k in PHANTOM_TARGETS}
    labels = [truth_labels(ex.findings) for ex in examples]
    keys = sorted({k for t in labels for k in t})
    if not keys or any(not t for t in labels):
        raise DataError("probe: the data carries no finding labels for every scan (phantom findings or CT-RATE's "
                        "multi_abnormality_labels CSV); nothing to probe")
    return {k: [str(bool(t.get(k))) for t in labels] for k in keys}


def small_slices(slices: np.ndarray, side: int = SMALL_SIDE) -> np.ndarray:
    """``[K, C, H, W]`` -> ``[K·C·side²]``: each slice area-averaged onto a ``side × side`` grid."""
    K, C, H, W = slices.shape
    hs, ws = H // side, W // side
    crop = slices[:, :, : hs * side, : ws * side].reshape(K, C, side, hs, side, ws)
    return crop.mean(axis=(3, 5)).ravel()


@torch.no_grad()
def stage_features(vlm, examples: list, prompt: list) -> dict:
    """``{stage: [n, features]}`` for every stage of :data:`FEATURE_STAGES` the model has."""
    out = {k: [] for k in FEATURE_STAGES}
    pid = torch.tensor([prompt])
    for ex in examples:
        x = torch.from_numpy(ex.slices)
        z2d, z3d = vlm.encoder(x[None])
        text = vlm.token_embeddings(pid).to(vlm.fusion_dtype)
        fused = vlm.fusion(z2d, z3d, text, torch.ones_like(pid))
        out["slices"].append(small_slices(ex.slices))
        out["vit"].append(z2d[0].flatten().numpy())
        out["vit_mean"].append(z2d[0].mean(0).numpy())
        out["aggregator"].append(z3d[0].flatten().numpy())
        out["fusion"].append(fused[0].float().mean(0).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def probe_accuracy(x_train, y_train, x_test, y_test) -> float:
    """Held-out accuracy of a standardised, L2-regularised logistic regression (C chosen by 3-fold
    cross-validation on the training features alone). Newton-CG, not scikit-learn's default L-BFGS: on the
    demo run's 400 scans (up to 7776 features) it took 10 CPU-s instead of 42.5, with the same accuracies but one
    (one scan of 200, at chance)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(y_train)) < 2:  # one class in training: the probe can only say it
        return float(np.mean(np.asarray(y_test) == y_train[0]))
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0], cv=3, max_iter=3000,
                                                                   solver="newton-cg"))
    clf.fit(x_train, y_train)
    return float(clf.score(x_test, y_test))


def majority_rate(y_test) -> float:
    """What always answering the held-out scans' most common class scores on them (the best constant answer)."""
    _, counts = np.unique(y_test, return_counts=True)
    return float(counts.max() / counts.sum())


def report_accuracy(reports: list, truths: dict) -> dict:
    """Per target, the fraction of reports that state it as the truth does (phantom grammar, or the labeller)."""
    from samf.runtime.tools.phantom import parse_report

    from .labels import report_labels

    phantom = set(truths) == set(PHANTOM_TARGETS)
    read = [parse_report(r) if phantom else {k: str(v) for k, v in report_labels(r).items()} for r in reports]
    return {k: float(np.mean([str(r[k]) == t for r, t in zip(read, ys)])) for k, ys in truths.items()}


def load_probe_model(run_dir: str):
    """(model, tokenizer, what it is): the merged checkpoint, else the fine-tuned run, else the model before
    fine-tuning (the DINO ViT with fresh aggregator and fusion: only the ViT's rows then mean anything)."""
    from . import run_folder as R
    from .finetune import load_finetuned
    from .llm_folder import LLMTokenizer
    from .vlm import SamfVLM

    if not os.path.exists(os.path.join(run_dir, RUN_FILE)):
        raise DataError(f"probe: {run_dir} is not a run folder (no {RUN_FILE}; samf-train init makes one)")
    merged = os.path.join(run_dir, MERGED_DIR)
    if os.path.exists(os.path.join(merged, MODULES_FILE)):
        return SamfVLM.from_checkpoint(merged), LLMTokenizer(merged), MERGED_DIR
    if os.path.exists(os.path.join(run_dir, FINETUNE_DIR, MODULES_FILE)):
        return load_finetuned(run_dir), R.base_tokenizer(run_dir), FINETUNE_DIR
    if not os.path.exists(os.path.join(run_dir, R.DINO_FILE)):
        raise DataError(f"probe: {run_dir} has no trained model yet (neither merged/, finetune/ nor "
                        f"{R.DINO_FILE}); run pretrain-2d or finetune first")
    return R.build_vlm(run_dir).eval(), R.base_tokenizer(run_dir), "before finetune"


def run_probes(run_dir: str, train: list, test: list, cfg: ProbeConfig | None = None, progress: bool = True,
               model: tuple | None = None) -> dict:
    """Every probe of one run on (train, test) examples: ``{"model", "n_train", "n_test", "majority": {target:
    rate}, "stages": {stage: {target: accuracy}}}``. ``model``: what :func:`load_probe_model` gave, when the
    caller loaded it already (the CLI does, before reading any data)."""
    from .vlm import generate_reports, prompt_ids

    cfg = cfg or ProbeConfig()
    train, test = train[: cfg.train_limit], test[: cfg.test_limit]
    if len(train) < 10 or len(test) < 2:
        raise DataError(f"probe: needs at least 10 training and 2 held-out scans, the data has {len(train)} and "
                        f"{len(test)}")
    y_train, y_test = targets_of(train), targets_of(test)
    if set(y_train) != set(y_test):
        raise DataError("probe: the training and held-out splits carry different labels")
    vlm, tok, what = model or load_probe_model(run_dir)
    prompt = prompt_ids(tok, REPORT_REQUESTS[0])
    f_train, f_test = stage_features(vlm, train, prompt), stage_features(vlm, test, prompt)
    stages = {}
    for stage in FEATURE_STAGES:
        if what == "before finetune" and stage in ("aggregator", "fusion"):
            continue  # untrained modules: nothing to read
        stages[stage] = {k: probe_accuracy(f_train[stage], y_train[k], f_test[stage], y_test[k]) for k in y_train}
    if cfg.reports and what != "before finetune":
        real = generate_reports(vlm, tok, test, progress=progress)
        zeroed = generate_reports(vlm, tok, test, zero_image=True, progress=progress)
        swapped = real[1:] + real[:1]  # one prompt for all: scan i+1's rows in scan i's place give scan i+1's report
        for name, reports in zip(REPORT_ROWS, (real, zeroed, swapped)):
            stages[name] = report_accuracy(reports, y_test)
    return {"model": what, "n_train": len(train), "n_test": len(test),
            "majority": {k: majority_rate(y_test[k]) for k in y_train}, "stages": stages}


def format_probes(result: dict) -> str:
    """The probes as a Markdown table: a row per stage, a column per target, the majority class last."""
    targets = list(result["majority"])
    lines = ["| stage | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for stage, acc in result["stages"].items():
        lines.append(f"| {stage} | " + " | ".join(f"{acc[k]:.2f}" for k in targets) + " |")
    lines.append("| majority class | " + " | ".join(f"{result['majority'][k]:.2f}" for k in targets) + " |")
    return "\n".join(lines)
