"""Scoring generated text against phantom ground truth: per-finding accuracy and multiple-choice accuracy.

Pure Python (no torch) so the runtime's outputs and the PyTorch model's are scored by the same code.
"""

from __future__ import annotations

from samf.runtime.prompt import mcq_choice_of

from .phantom import SCORED, parse_report

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
