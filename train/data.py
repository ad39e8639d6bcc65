"""Datasets: the synthetic phantom set on disk, read back through the runtime's own loader and preprocessing.

On-disk layout (the SAMF README's CSV plus the questions)::

    DATA/scans/phantom_00000.nii.gz
    DATA/train.csv, DATA/test.csv      image, caption, label   (label = findings as JSON)
    DATA/questions.jsonl               {"image", "question", "choices", "answer"} per line
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from samf.runtime.atomic import atomic_file
from samf.runtime.ct import load_scan, save_nifti
from samf.runtime.preprocess import PreprocessConfig, preprocess

from .phantom import make_phantom

CSV_FIELDS = ("image", "caption", "label")


@dataclass
class Example:
    image: str
    slices: np.ndarray            # [3·S, C, H, W], from samf.runtime.preprocess
    report: str
    findings: dict
    questions: list = field(default_factory=list)


def _write_csv(path: str, rows: list) -> None:
    with atomic_file(path) as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


def generate_phantom_dataset(out_dir: str, n_train: int, n_test: int, seed: int = 0,
                             shape=(64, 96, 96), spacing=(5.0, 4.0, 4.0), progress: bool = True) -> dict:
    """Write ``n_train + n_test`` phantoms as NIfTI with their reports, labels and questions."""
    os.makedirs(os.path.join(out_dir, "scans"), exist_ok=True)
    rows = {"train": [], "test": []}
    questions = []
    total = n_train + n_test
    for i in tqdm(range(total), desc="phantoms", disable=not progress, unit="scan"):
        p = make_phantom(seed * 1_000_003 + i, shape=shape, spacing=spacing)
        rel = f"scans/phantom_{i:05d}.nii.gz"
        save_nifti(os.path.join(out_dir, rel), p.volume, p.spacing)
        split = "train" if i < n_train else "test"
        rows[split].append(dict(image=rel, caption=p.report, label=json.dumps(p.findings.to_dict())))
        questions += [dict(image=rel, **q) for q in p.questions]
    for split, r in rows.items():
        _write_csv(os.path.join(out_dir, f"{split}.csv"), r)
    with atomic_file(os.path.join(out_dir, "questions.jsonl")) as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    return {k: len(v) for k, v in rows.items()}


def load_split(data_dir: str, split: str, pre: PreprocessConfig, progress: bool = True,
               limit: int | None = None) -> list:
    """A split of a phantom-style dataset folder: ``SPLIT.csv`` plus ``questions.jsonl``."""
    by_image: dict = {}
    qpath = os.path.join(data_dir, "questions.jsonl")
    if os.path.exists(qpath):
        with open(qpath) as f:
            for line in f:
                q = json.loads(line)
                by_image.setdefault(q.pop("image"), []).append(q)
    return load_samf_csv(os.path.join(data_dir, f"{split}.csv"), pre, by_image, progress, limit)


def _label(text: str):
    """The CSV's label column: JSON (our phantoms' findings) or a plain value (the SAMF README's)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"label": text}
    return value if isinstance(value, dict) else {"label": value}


def load_samf_csv(csv_path: str, pre: PreprocessConfig, questions: dict | None = None, progress: bool = True,
                  limit: int | None = None) -> list:
    """The SAMF README's CSV (``image, caption, label``): scans read with the runtime's loader and preprocessed
    as the runtime does. Image paths are absolute or relative to the CSV's folder."""
    root = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    out = []
    for r in tqdm(rows, desc=f"load {os.path.basename(csv_path)}", disable=not progress, unit="scan"):
        vol = load_scan(os.path.join(root, r["image"]))
        out.append(Example(image=r["image"], slices=preprocess(vol, pre), report=r["caption"],
                           findings=_label(r.get("label", "")), questions=(questions or {}).get(r["image"], [])))
    return out


def text_corpus(examples: list) -> list:
    """Every text the LLM reads or writes: prompts, reports, questions and answers."""
    from samf.runtime.prompt import REPORT_REQUESTS, format_prompt, mcq_answer, mcq_prompt

    texts = [format_prompt(r) for r in REPORT_REQUESTS]
    for ex in examples:
        texts.append(ex.report)
        for q in ex.questions:
            texts += [mcq_prompt(q["question"], q["choices"]), mcq_answer(q["answer"], q["choices"])]
    return texts


# ------------------------------------------------------------------------------------------ CT-RATE

def ctrate_report(row: dict) -> str:
    """CT-RATE's report text: findings followed by impressions."""
    return " ".join(t.strip() for t in (row.get("Findings_EN", ""), row.get("Impressions_EN", "")) if t and t.strip())


def load_ctrate(root: str, split_dir: str, reports_csv: str, pre: PreprocessConfig, metadata_csv: str | None = None,
                labels_csv: str | None = None, limit: int | None = None, progress: bool = True) -> list:
    """CT-RATE volumes of one split (``train``/``valid`` or ``*_fixed``) with their reports (and labels).

    Volumes are read by the runtime's loader, with spacing/rescale from the metadata CSV when given.
    Rows whose volume is not on disk are skipped (CT-RATE is often downloaded in part).
    """
    from samf.runtime.ctrate import ctrate_path, read_metadata

    meta = read_metadata(metadata_csv) if metadata_csv else {}
    labels = {}
    if labels_csv:
        with open(labels_csv, newline="") as f:
            for r in csv.DictReader(f):
                name = r.pop("VolumeName")
                labels[name] = {k: bool(int(float(v))) for k, v in r.items()}
    with open(reports_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if os.path.exists(ctrate_path(root, split_dir, r["VolumeName"]))]
    out = []
    for r in tqdm(rows[:limit], desc=f"CT-RATE {split_dir}", disable=not progress, unit="scan"):
        name = r["VolumeName"]
        vol = load_scan(ctrate_path(root, split_dir, name), ctrate_meta=meta.get(name))
        out.append(Example(image=name, slices=preprocess(vol, pre), report=ctrate_report(r),
                           findings=labels.get(name, {})))
    return out
