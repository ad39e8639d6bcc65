"""How far the "which abnormality is seen" question can go with what each stage of a demo model carries.

For each stage (the raw slices at 12x12, the ViT's outputs, the aggregator's, the fused rows), one logistic
regression per further finding is fitted on 400 training scans; on the held-out scans, each question is answered
with the option whose finding the probes call likeliest ("none of these": one minus the likeliest of the others).
That is what a perfect linear reader of the stage would score: an upper bound for the LLM reading the same rows.
Beside it, how often the LLM's own reports (the runtime, Q8_0) state each further finding as the truth is.

    python benchmarks/mcq_ceiling.py samf-demo benchmarks/results/mcq-ceiling-demo-slab-mean.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="a `samf demo --workdir` folder (data/, run/, bundle/)")
    ap.add_argument("out", help="JSON file for the results")
    args = ap.parse_args()

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from samf.runtime.inference.pipeline import ReportPipeline
    from samf.runtime.inference.prompt import REPORT_REQUESTS
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.runtime.tools.phantom import EXTRA_FINDINGS, parse_report
    from samf.train.datasets import load_dataset
    from samf.train.labels import truth_labels
    from samf.train.probe import load_probe_model, stage_features
    from samf.train.run_folder import read_run
    from samf.train.vlm import prompt_ids

    torch.set_num_threads(os.cpu_count() or 1)
    run, data = os.path.join(args.workdir, "run"), os.path.join(args.workdir, "data")
    pre = PreprocessConfig.from_dict(read_run(run)["preprocess"])
    train = load_dataset(data, "train", pre, progress=False, limit=400)
    test = load_dataset(data, "test", pre, progress=False, limit=200)
    vlm, tok, _ = load_probe_model(run)
    prompt = prompt_ids(tok, REPORT_REQUESTS[0])
    f_train, f_test = stage_features(vlm, train, prompt), stage_features(vlm, test, prompt)
    by_option = {s.option: s.label for s in EXTRA_FINDINGS}
    truth_train = [truth_labels(e.findings) for e in train]
    truth_test = [truth_labels(e.findings) for e in test]

    out = {"scans_fitted": len(train), "scans_scored": len(test), "ceiling": {}}
    for stage in ("slices", "vit", "aggregator", "fusion"):
        likely = {}
        for s in EXTRA_FINDINGS:
            y = np.array([t[s.label] for t in truth_train])
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
            likely[s.label] = probe.fit(f_train[stage], y).predict_proba(f_test[stage])[:, 1]
        right = asked = 0
        for i, ex in enumerate(test):
            for q in ex.questions:
                if "abnormalit" not in q["question"]:
                    continue
                p = [likely[by_option[c]][i] if c in by_option else None for c in q["choices"]]
                score = [x if x is not None else 1 - max(v for v in p if v is not None) for x in p]
                right += "ABCD"[int(np.argmax(score))] == q["answer"]
                asked += 1
        out["ceiling"][stage] = right / asked
        print(f"{stage:10s} {right}/{asked} = {right / asked:.3f}", flush=True)

    with ReportPipeline(os.path.join(args.workdir, "bundle"), quant="Q8_0", parallel=4) as pipe:
        texts = {s: r.text for s, r in pipe.report_many([os.path.join(data, e.image) for e in test])}
    out["report_accuracy"], out["majority"] = {}, {}
    said = [truth_labels(parse_report(texts[os.path.join(data, e.image)])) for e in test]
    for s in EXTRA_FINDINGS:
        truth = [t[s.label] for t in truth_test]
        out["report_accuracy"][s.name] = float(np.mean(np.equal(truth, [r[s.label] for r in said])))
        out["majority"][s.name] = float(max(np.mean(truth), 1 - np.mean(truth)))
        print(f"{s.name:26s} report {out['report_accuracy'][s.name]:.3f}  majority {out['majority'][s.name]:.3f}")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
