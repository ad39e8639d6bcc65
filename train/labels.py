"""CT-RATE's 18 abnormality labels: read from a report's text, and from a phantom's ground truth.

One labeller scores generated reports on phantoms and on CT-RATE alike. It is rule-based (keywords per
label plus NegEx-style negation within the sentence), not CT-RATE's own RadBERT classifier, so its labels
on real reports are an approximation; on phantom reports it is exact (a test checks every finding).
No torch.
"""

from __future__ import annotations

import re

from samf.runtime.tools.phantom import CORE_LABELS, EXTRA_FINDINGS

#: The 18 labels, in the order of CT-RATE's multi_abnormality_labels CSV.
CTRATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)

#: A mention of each label (matched in one lower-cased sentence).
_MENTION = {
    "Medical material": r"pacemaker|\bstents?\b|prosthe|catheter|\bport\b|surgical clip|sternotomy|medical material|"
                        r"\btube\b|\bwires?\b|valve replacement",
    "Arterial wall calcification": r"atheroscl\w*(?![^.]*coronar)|aort\w*[^.]*calcif|calcif\w*[^.]*aort|"
                                   r"vascular calcif|arterial wall calcif",
    "Cardiomegaly": r"cardiomegaly|heart is enlarged|enlarged heart|heart size (is )?increased",
    "Pericardial effusion": r"pericardial (effusion|fluid)",
    "Coronary artery wall calcification": r"coronar\w*[^.]*calcif|calcif\w*[^.]*coronar",
    "Hiatal hernia": r"hiatal hernia|hiatus hernia",
    "Lymphadenopathy": r"lymphadenopath|enlarged[\w ]*lymph nodes?|lymph nodes?[\w ]*enlarged",
    "Emphysema": r"emphysema",
    "Atelectasis": r"atelecta",
    "Lung nodule": r"nodul",
    "Lung opacity": r"opacit|ground[- ]glass",
    "Pulmonary fibrotic sequela": r"fibrot|fibrosis|sequela",
    "Pleural effusion": r"pleural effusion|pleural fluid",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronchial",
    "Consolidation": r"consolidat",
    "Bronchiectasis": r"bronchiecta",
    "Interlobular septal thickening": r"septal thickening|interlobular sept",
}
_NEG_BEFORE = re.compile(r"\b(no|not|without|absence of|negative for|free of|nor|neither|resolved)\b")
_NEG_AFTER = re.compile(r"^[^.;]*\b(not (seen|detected|observed|identified|present|evident)|was not|were not|"
                        r"is not|are not|absent)\b")


def report_labels(text: str) -> dict:
    """``{label: bool}`` for the 18 labels: True when some sentence mentions it without negating it."""
    out = {k: False for k in CTRATE_LABELS}
    for sent in re.split(r"(?<=[.;])\s+|\n+", text.lower()):
        for label, pattern in _MENTION.items():
            for m in re.finditer(pattern, sent):
                if not (_NEG_BEFORE.search(sent[: m.start()]) or _NEG_AFTER.search(sent[m.end():])):
                    out[label] = True
    return out


#: Phantom finding -> CT-RATE label (each finding's record in samf.runtime.tools.phantom carries its label).
PHANTOM_TO_CTRATE = {**CORE_LABELS, **{spec.name: spec.label for spec in EXTRA_FINDINGS}}


def truth_labels(findings: dict) -> dict:
    """The 18 labels of one example's ground truth: CT-RATE's label row as is, or a phantom's findings mapped;
    ``{}`` when the example has neither."""
    if any(k in findings for k in CTRATE_LABELS):
        return {k: bool(findings[k]) for k in CTRATE_LABELS if k in findings}
    if "cardiomegaly" not in findings:
        return {}
    return {label: findings.get(key) not in (False, None, "none") for key, label in PHANTOM_TO_CTRATE.items()}
