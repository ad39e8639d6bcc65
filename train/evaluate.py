"""Scoring generated text against phantom ground truth: per-finding accuracy and multiple-choice accuracy.

Pure Python (no torch) so the runtime's outputs and the PyTorch model's are scored by the same code.
"""

from __future__ import annotations

from samf.runtime.inference.prompt import mcq_choice_of
from samf.runtime.tools.phantom import SCORED, parse_report

#: What guessing scores on each finding (uniform over its classes); the bar learning must clear.
CHANCE = dict(nodule=0.5, nodule_side=0.5, nodule_lobe=0.5, effusion=0.25, cardiomegaly=0.5, emphysema=0.5)


def finding_accuracy(reports: list, truths: list) -> dict:
    """Fraction of scans whose report states each finding correctly (side/lobe: scans with a nodule only)."""
    hits = {k: 0 for k in SCORED}
    counts = {k: 0 for k in SCORED}
    for text, truth in zip(reports, truths):
        got = parse_report(text)
        for k in SCORED:
            if k in ("nodule_side", "nodule_lobe") and not truth["nodule"]:
                continue
            counts[k] += 1
            hits[k] += int(got[k] == truth[k])
    acc = {k: hits[k] / counts[k] for k in SCORED if counts[k]}
    acc["mean"] = sum(acc.values()) / max(1, len(acc))
    return acc


def majority_accuracy(truths: list) -> dict:
    """What always answering the most common value scores on each finding of these scans (side/lobe: among scans
    with a nodule), in :func:`finding_accuracy`'s shape: the best any constant answer does here, the bar a model
    that reads the image must clear and the one a model shown no image should not."""
    from collections import Counter

    acc = {}
    for k in SCORED:
        values = [str(t[k]) for t in truths if t["nodule"] or k not in ("nodule_side", "nodule_lobe")]
        if values:
            acc[k] = Counter(values).most_common(1)[0][1] / len(values)
    acc["mean"] = sum(acc.values()) / max(1, len(acc))
    return acc


def sentence_share(reports: list) -> float:
    """The fraction of generated sentences that are one of the phantom grammar's forms (the rest are broken)."""
    from samf.runtime.tools.phantom import is_grammatical, report_sentences

    sentences = [t for r in reports for t in report_sentences(r)]
    return sum(map(is_grammatical, sentences)) / max(1, len(sentences))


def distinct_share(reports: list) -> float:
    """Distinct reports over scans: 1.0 when every scan got its own text, low under template collapse."""
    return len(set(reports)) / max(1, len(reports))


def mcq_accuracy(answers: list, letters: list) -> float:
    """Fraction of generated answers whose chosen letter is the right one."""
    if not letters:
        return float("nan")
    return sum(mcq_choice_of(a) == t for a, t in zip(answers, letters)) / len(letters)


def format_table(rows: dict) -> str:
    """``{name: {finding: acc}}`` as an aligned text table, chance in the last column."""
    keys = [k for k in SCORED] + ["mean"]
    names = list(rows)
    w = max(10, *(len(n) + 2 for n in names))
    head = f"{'finding':<14}" + "".join(f"{n:>{w}}" for n in names) + f"{'chance':>10}"
    lines = [head, "-" * len(head)]
    for k in keys:
        vals = "".join(f"{rows[n].get(k, float('nan')):>{w}.2f}" for n in names)
        ch = CHANCE.get(k, sum(CHANCE.values()) / len(CHANCE))
        lines.append(f"{k:<14}{vals}{ch:>10.2f}")
    return "\n".join(lines)


def evaluate_model(vlm, tok, examples: list, bertscore_model: str | None = "default", progress: bool = True,
                   zeroed: bool = True) -> dict:
    """Everything ``samf-train evaluate`` reports for one model on one split, as a JSON-able dict.

    Reports: BLEU-1/4, METEOR, ROUGE-L, BERTScore-F1 against the references; the 18 CT-RATE labels read
    from them (phantoms and CT-RATE); per-finding accuracy with attributes (phantoms). Multiple choice:
    accuracy, precision, recall, F1. With ``zeroed``, the same with the image embeddings zeroed, the
    baseline a model that uses the image must beat.
    """
    from .labels import truth_labels
    from .metrics import label_metrics, mcq_metrics, report_metrics
    from .vlm import generate_mcq, generate_reports

    refs = [e.report for e in examples]
    label_truth = [truth_labels(e.findings) for e in examples]
    phantom = all("nodule_side" in e.findings for e in examples)
    out = {"n_scans": len(examples)}
    for mode in ("image", "zeroed") if zeroed else ("image",):
        z = mode == "zeroed"
        hyps = generate_reports(vlm, tok, examples, zero_image=z, progress=progress)
        res = {"reports": report_metrics(hyps, refs, bertscore_model) if not z else {},
               "labels": label_metrics(hyps, label_truth),
               "mcq": mcq_metrics(*generate_mcq(vlm, tok, examples, zero_image=z))}
        if phantom:
            res["findings"] = finding_accuracy(hyps, [e.findings for e in examples])
        res["examples"] = [{"image": e.image, "generated": h} for e, h in zip(examples[:8], hyps[:8])]
        out[mode] = res
    return out


def _fmt(v, scale=1.0) -> str:
    return "n/a" if v is None else f"{v * scale:.2f}"


def summary_row(result: dict, mode: str = "image") -> dict:
    """The headline numbers of one evaluation (one row of a table)."""
    r = result[mode]
    rep, mcq = r.get("reports", {}), r["mcq"]
    row = {k: rep.get(k) for k in ("bleu1", "bleu4", "meteor", "rougeL", "bertscore_f1")}
    row.update({f"mcq_{k}": mcq.get(k) for k in ("accuracy", "precision", "recall", "f1")})
    row["label_f1"] = r["labels"].get("macro", {}).get("f1") if r["labels"] else None
    if "findings" in r:
        row["finding_acc"] = r["findings"]["mean"]
    return row


def format_summary(rows: dict) -> str:
    """``{name: summary_row}`` as a Markdown table (BLEU on 0-100, the rest on 0-1)."""
    cols = ["bleu1", "bleu4", "meteor", "rougeL", "bertscore_f1", "mcq_accuracy", "mcq_precision", "mcq_recall",
            "mcq_f1", "label_f1", "finding_acc"]
    return _markdown(rows, [c for c in cols if any(c in r for r in rows.values())])


def format_findings(rows: dict) -> str:
    """``{name: finding_accuracy}`` as a Markdown table, one row per run and guessing's row last."""
    chance = {**CHANCE, "mean": sum(CHANCE.values()) / len(CHANCE)}
    return _markdown({**rows, "chance (guessing)": chance}, list(SCORED) + ["mean"])


def _markdown(rows: dict, cols: list) -> str:
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)
