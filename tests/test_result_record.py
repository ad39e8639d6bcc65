"""One result record (Result.to_record): its fields, and their documentation in DESIGN."""

from __future__ import annotations

import json
import os
import re

from samf.runtime.inference.pipeline import RECORD_FIELDS, Result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(**kw) -> Result:
    return Result(text="No pleural effusion.", token_ids=[5, 6, 7, 2][: kw.pop("n", 4)],
                  timings={"load": 0.123456789, "llm_decode": 1.0000049},
                  identity={"llm": "llm-F32.gguf", "encoder_precision": "int8"},
                  scan={"format": "nifti", "shape": [4, 5, 6]}, **kw)


def test_the_record_has_one_set_of_names_and_is_json():
    res = _result()
    rec = res.to_record()
    assert list(rec) == [f for f in RECORD_FIELDS if f != "choice_nll"]
    assert rec["report"] == res.text and rec["new_tokens"] == 4 and rec["encoders"] == "int8"
    assert rec["timings"] == {"load": 0.1235, "llm_decode": 1.0} and rec["evidence"] is None
    assert json.loads(json.dumps(rec)) == rec
    rec["identity"]["llm"], rec["scan"]["format"] = "changed", "changed"  # a caller's edits stay in its copy
    assert res.identity["llm"] == "llm-F32.gguf" and res.scan["format"] == "nifti"


def test_a_question_scored_by_its_choices_keeps_its_scores():
    nll = {"A": 2.5, "B": 1.25, "C": 3.0, "D": 2.0}
    rec = _result(choice_nll=nll, n=2).to_record()
    assert list(rec) == list(RECORD_FIELDS) and rec["choice_nll"] == nll and rec["new_tokens"] == 2


def test_design_documents_every_field_of_the_record():
    text = open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8").read()
    section = re.split(r"\n##+ ", text.split("\n### The result record\n", 1)[1], maxsplit=1)[0]
    assert re.findall(r"^\| `(\w+)` \|", section, re.M) == list(RECORD_FIELDS)
