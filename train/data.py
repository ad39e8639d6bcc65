"""Datasets, each read through the runtime's own loader and preprocessing, so training sees what production sees.

:func:`dataset_kind` recognises a folder by its layout:

- SAMF / phantom folder (the SAMF README's CSV plus questions)::

      DATA/scans/phantom_00000.nii.gz
      DATA/train.csv, DATA/test.csv      image, caption, label   (label = findings as JSON, or a plain value)
      DATA/questions.jsonl               {"image", "question", "choices", "answer"} per line (optional)
      DATA/mcq_{split}.csv               or the SAMF MCQ CSV: Question ID, Image, Question, Choice A..D,
                                         Answer Choice, Answer (optional)

- CT-RATE (the dataset folder of its release)::

      DATA/train[_fixed]/train_1/train_1_a/train_1_a_1.nii.gz, DATA/valid[_fixed]/...
      DATA/radiology_text_reports/{train,validation}_reports.csv
      DATA/metadata/{train,validation}_metadata.csv
      DATA/multi_abnormality_labels/{train,valid}_predicted_labels.csv   (optional)

- M3D-Cap / M3D-VQA::

      DATA/M3D_Cap.json                  {"train"|"validation"|"test": [{"image": "<npy>", "text": "<txt>"}]}
      DATA/ct_quizze/000001/Axial_....npy, .../text.txt    (paths as the JSON gives them, under DATA)
      DATA/M3D_VQA_{train,val,test}.csv  Image Path, Question, Choice A..D, Answer Choice, Answer, ... (optional)

- A cache that ``samf-train prepare`` made from any of these (``samf-cache.json``; :mod:`samf.train.scan_cache`):
  its splits are read lazily from disk, and training streams them.

Each layout is first listed (:func:`list_dataset`: :class:`ScanEntry` s, nothing read), then read: into memory by
:func:`load_entries`, or once into a cache by ``prepare``. A stage reads its ``--data``, a folder or a cache,
through :func:`samf.train.datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass, field

import numpy as np

from samf.errors import SamfError
from samf.runtime.progress import progress_bar
from samf.runtime.scan.ct import load_scan
from samf.runtime.scan.preprocess import PreprocessConfig, preprocess


class DataError(SamfError):
    """A dataset folder or file that cannot be used; the message says why."""


@dataclass
class Example:
    image: str
    slices: np.ndarray            # [3·S, C, H, W], from samf.runtime.scan.preprocess
    report: str
    findings: dict
    questions: list = field(default_factory=list)

    @property
    def model_input(self) -> np.ndarray:
        """What the image encoder takes for this scan (a cached example may hand ViT embeddings instead)."""
        return self.slices


@dataclass
class ScanEntry:
    """One scan of a dataset before it is read: where it is, how to read it, and its texts. Listing a dataset
    is cheap; reading and preprocessing (:meth:`slices`) is the cost that ``samf-train prepare`` pays once."""

    image: str                    # the dataset's own name for the scan (CSV path, CT-RATE VolumeName)
    path: str
    report: str
    findings: dict
    questions: list = field(default_factory=list)
    ctrate_meta: dict | None = None

    def slices(self, pre: PreprocessConfig) -> np.ndarray:
        """The model input, read by the runtime's loader and preprocessed as the runtime does."""
        return preprocess(load_scan(self.path, ctrate_meta=self.ctrate_meta), pre)

    def example(self, pre: PreprocessConfig) -> Example:
        return Example(image=self.image, slices=self.slices(pre), report=self.report, findings=self.findings,
                       questions=self.questions)

    def texts(self) -> dict:
        """What a cache's index keeps of the entry: everything but where the scan was read from."""
        return dict(image=self.image, report=self.report, findings=self.findings, questions=self.questions)


def load_entries(entries: list, pre: PreprocessConfig, desc: str, progress: bool = True) -> list:
    """Every entry read and preprocessed into memory, as :class:`Example` s (small datasets; a large one goes
    through ``samf-train prepare``)."""
    return [e.example(pre) for e in progress_bar(entries, desc=desc, disable=not progress, unit="scan")]


def load_split(data_dir: str, split: str, pre: PreprocessConfig, progress: bool = True,
               limit: int | None = None) -> list:
    """A split of a SAMF/phantom dataset folder: ``SPLIT.csv`` plus ``questions.jsonl`` or ``mcq_SPLIT.csv``."""
    by_image = _split_questions(data_dir, split)
    return load_samf_csv(os.path.join(data_dir, f"{split}.csv"), pre, by_image, progress, limit)


def list_split(data_dir: str, split: str) -> list:
    """The :class:`ScanEntry` s of a SAMF/phantom dataset's split (see :func:`load_split`)."""
    return list_samf_csv(os.path.join(data_dir, f"{split}.csv"), _split_questions(data_dir, split))


def _split_questions(data_dir: str, split: str) -> dict:
    by_image: dict = {}
    qpath = os.path.join(data_dir, "questions.jsonl")
    if os.path.exists(qpath):
        with open(qpath) as f:
            for line in f:
                q = json.loads(line)
                by_image.setdefault(q.pop("image"), []).append(q)
    mcq = os.path.join(data_dir, f"mcq_{split}.csv")
    if os.path.exists(mcq):
        for image, qs in read_mcq_csv(mcq).items():
            by_image.setdefault(image, []).extend(qs)
    return by_image


def read_mcq_csv(csv_path: str) -> dict:
    """``{image: [question dicts]}`` from an M3D-VQA CSV (``Image Path``) or the SAMF MCQ CSV (``Image``).

    Answer letters are upper-cased (SAMF writes a-d); rows with a missing choice are skipped, since the
    prompt always offers four.
    """
    out: dict = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            image = r.get("Image Path") or r.get("Image")
            choices = [(r.get(f"Choice {c}") or "").strip() for c in "ABCD"]
            letter = (r.get("Answer Choice") or "").strip().upper()
            if not image or not all(choices) or letter not in ("A", "B", "C", "D"):
                continue
            q = dict(question=r["Question"].strip(), choices=choices, answer=letter)
            if r.get("Question Type"):
                q["type"] = r["Question Type"]
            out.setdefault(image, []).append(q)
    return out


def _read_csv(path: str, required: tuple) -> list:
    """The rows of a CSV that must have ``required`` columns; a clear error otherwise."""
    if not os.path.exists(path):
        raise DataError(f"file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            has = ", ".join(reader.fieldnames or [])
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has: {has})")
        return list(reader)


def _label(text: str):
    """The CSV's label column: JSON (our phantoms' findings) or a plain value (the SAMF README's)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"label": text}
    return value if isinstance(value, dict) else {"label": value}


def list_samf_csv(csv_path: str, questions: dict | None = None) -> list:
    """The SAMF README's CSV (``image, caption, label``) as :class:`ScanEntry` s. Image paths are absolute or
    relative to the CSV's folder."""
    root = os.path.dirname(os.path.abspath(csv_path))
    return [ScanEntry(image=r["image"], path=os.path.join(root, r["image"]), report=r["caption"],
                      findings=_label(r.get("label", "")), questions=(questions or {}).get(r["image"], []))
            for r in _read_csv(csv_path, ("image", "caption"))]


def load_samf_csv(csv_path: str, pre: PreprocessConfig, questions: dict | None = None, progress: bool = True,
                  limit: int | None = None) -> list:
    """The SAMF README's CSV, its scans read with the runtime's loader and preprocessed as the runtime does."""
    return load_entries(list_samf_csv(csv_path, questions)[:limit], pre, f"load {os.path.basename(csv_path)}",
                        progress)


def text_corpus(examples: list) -> list:
    """Every text the LLM reads or writes: prompts, reports, questions and answers."""
    from samf.runtime.inference.prompt import REPORT_REQUESTS, format_prompt, mcq_answer, mcq_request

    texts = [format_prompt(r) for r in REPORT_REQUESTS]
    for ex in examples:
        texts.append(ex.report)
        for q in ex.questions:
            texts += [format_prompt(mcq_request(q["question"], q["choices"])), mcq_answer(q["answer"], q["choices"])]
    return texts


# ------------------------------------------------------------------------------------------ any layout

#: Split names accepted everywhere, and what each dataset calls them.
SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}


def dataset_kind(data_dir: str) -> str:
    """``samf`` (SAMF CSV / phantoms), ``ctrate``, ``m3d`` or ``cache`` (``samf-train prepare``), from the
    folder's layout."""
    if not os.path.isdir(data_dir):
        raise DataError(f"dataset folder not found: {data_dir}")
    if os.path.exists(os.path.join(data_dir, "samf-cache.json")):
        return "cache"
    if os.path.isdir(os.path.join(data_dir, "radiology_text_reports")):
        return "ctrate"
    if os.path.exists(os.path.join(data_dir, "M3D_Cap.json")):
        return "m3d"
    if any(os.path.exists(os.path.join(data_dir, f"{s}.csv")) for s in ("train", "test", "valid")):
        return "samf"
    raise DataError(f"{data_dir}: not a dataset folder this tool knows (expected train.csv, "
                    "radiology_text_reports/ (CT-RATE) or M3D_Cap.json (M3D))")


def list_dataset(data_dir: str, split: str) -> list:
    """One split of any supported dataset folder, as :class:`ScanEntry` s (nothing read yet)."""
    kind = dataset_kind(data_dir)
    if kind == "cache":
        raise DataError(f"{data_dir} is a prepared cache, not a dataset to read scans from")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (train, valid, test)")
    if kind == "ctrate":
        return list_ctrate_release(data_dir, SPLITS[split])
    if kind == "m3d":
        return list_m3d(data_dir, SPLITS[split])
    name = split if os.path.exists(os.path.join(data_dir, f"{split}.csv")) else SPLITS[split]
    if not os.path.exists(os.path.join(data_dir, f"{name}.csv")):
        raise DataError(f"{data_dir} has no {split}.csv")
    return list_split(data_dir, name)


def list_splits(data_dir: str, splits: list | None = None) -> dict:
    """``{split: ScanEntry list}`` for ``splits``, or for every split the folder has (train, valid, test; CT-RATE's
    test is its valid, listed once)."""
    if splits:
        return {s: list_dataset(data_dir, s) for s in splits}
    out = {}
    for split in ("train", "valid", "test"):
        try:
            out[split] = list_dataset(data_dir, split)
        except DataError:
            continue
    if dataset_kind(data_dir) == "ctrate":
        out.pop("test", None)
    return out


# ------------------------------------------------------------------------------------------ M3D

def list_m3d(data_dir: str, split: str) -> list:
    """M3D-Cap captions (``M3D_Cap.json``) with the M3D-VQA questions of the same volumes when present.

    Volumes are M3D's normalised .npy (see :mod:`samf.runtime.scan.ct`); entries whose files are missing are
    skipped, as M3D is often downloaded in part.
    """
    with open(os.path.join(data_dir, "M3D_Cap.json")) as f:
        index = json.load(f)
    key = {"train": "train", "valid": "validation", "test": "test"}[split]
    if key not in index:
        raise DataError(f"{data_dir}/M3D_Cap.json has no {key!r} list (has: {', '.join(index)})")
    questions: dict = {}
    vqa_names = {"train": ("train",), "valid": ("val", "validation"), "test": ("test",)}[split]
    for name in vqa_names:
        path = os.path.join(data_dir, f"M3D_VQA_{name}.csv")
        if os.path.exists(path):
            questions = read_mcq_csv(path)
            break
    out = []
    for r in index[key]:
        if not os.path.exists(os.path.join(data_dir, r["image"])):
            continue
        with open(os.path.join(data_dir, r["text"]), encoding="utf-8") as f:
            text = " ".join(f.read().split())
        out.append(ScanEntry(image=r["image"], path=os.path.join(data_dir, r["image"]), report=text, findings={},
                             questions=questions.get(r["image"], [])))
    return out


def load_m3d(data_dir: str, split: str, pre: PreprocessConfig, progress: bool = True,
             limit: int | None = None) -> list:
    """M3D's split in memory (see :func:`list_m3d`)."""
    return load_entries(list_m3d(data_dir, split)[:limit], pre, f"M3D {split}", progress)


# ------------------------------------------------------------------------------------------ CT-RATE

def ctrate_report(row: dict) -> str:
    """CT-RATE's report text: findings followed by impressions."""
    return " ".join(t.strip() for t in (row.get("Findings_EN", ""), row.get("Impressions_EN", "")) if t and t.strip())


def list_ctrate(root: str, split_dir: str, reports_csv: str, metadata_csv: str | None = None,
                labels_csv: str | None = None) -> list:
    """CT-RATE volumes of one split (``train``/``valid`` or ``*_fixed``) with their reports (and labels), as
    :class:`ScanEntry` s carrying each volume's metadata row (spacing and rescale).

    Rows whose volume is not on disk are skipped (CT-RATE is often downloaded in part).
    """
    from samf.runtime.scan.ctrate import ctrate_path, read_metadata

    meta = read_metadata(metadata_csv) if metadata_csv else {}
    labels = {}
    if labels_csv:
        with open(labels_csv, newline="") as f:
            for r in csv.DictReader(f):
                name = r.pop("VolumeName")
                labels[name] = {k: bool(int(float(v))) for k, v in r.items()}
    out = []
    for r in _read_csv(reports_csv, ("VolumeName", "Findings_EN", "Impressions_EN")):
        name = r["VolumeName"]
        path = ctrate_path(root, split_dir, name)
        if os.path.exists(path):
            out.append(ScanEntry(image=name, path=path, report=ctrate_report(r), findings=labels.get(name, {}),
                                 ctrate_meta=meta.get(name)))
    return out


def load_ctrate(root: str, split_dir: str, reports_csv: str, pre: PreprocessConfig, metadata_csv: str | None = None,
                labels_csv: str | None = None, limit: int | None = None, progress: bool = True) -> list:
    """CT-RATE's split in memory (see :func:`list_ctrate`)."""
    return load_entries(list_ctrate(root, split_dir, reports_csv, metadata_csv, labels_csv)[:limit], pre,
                        f"CT-RATE {split_dir}", progress)


def list_ctrate_release(data_dir: str, split: str) -> list:
    """CT-RATE's official split (``train`` or ``valid``; ``test`` means ``valid``, CT-RATE has no other)
    from its release folder, preferring the fixed (already-HU) volumes when they are there."""
    split = "valid" if split == "test" else split
    vol_dir = next((d for d in (f"{split}_fixed", split) if os.path.isdir(os.path.join(data_dir, d))), None)
    if vol_dir is None:
        raise DataError(f"{data_dir} has neither {split}_fixed/ nor {split}/ volumes")
    long = {"train": "train", "valid": "validation"}[split]

    def find(folder, *prefixes, required=True):
        for p in prefixes:
            hits = sorted(glob.glob(os.path.join(data_dir, folder, f"{p}*.csv")))
            if hits:
                return hits[0]
        if required:
            raise DataError(f"{data_dir}/{folder}/ has no {prefixes[0]}*.csv")
        return None

    return list_ctrate(data_dir, vol_dir, find("radiology_text_reports", long, split),
                       metadata_csv=find("metadata", long, split, required=False),
                       labels_csv=find("multi_abnormality_labels", split, long, required=False))
