"""One result record (Result.to_record): its fields, their documentation in DESIGN, and the service's Job records."""

from __future__ import annotations

import json
import os
import re

from samf.runtime.inference.pipeline import RECORD_FIELDS, Result
from samf.runtime.service.jobs import Job, JobStore

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


def test_jobs_are_claimed_and_recovered_as_job_records(tmp_path):
    store = JobStore(str(tmp_path))
    try:
        store.add("a", "report", "/in/a.nii.gz", False, {"request": "Findings?", "max_tokens": 8})
        store.add("b", "vqa", "/in/b.nii.gz", True, {"question": "Q?", "choices": ["1", "2", "3", "4"]})
        added = {"a": Job("a", "report", "/in/a.nii.gz", {"request": "Findings?", "max_tokens": 8}),
                 "b": Job("b", "vqa", "/in/b.nii.gz", {"question": "Q?", "choices": ["1", "2", "3", "4"]})}
        claimed = store.claim(1)
        assert len(claimed) == 1 and claimed[0] == added[claimed[0].id] and store.counts()["running"] == 1
        # A restart finds it running: it is queued again, and handed back whole.
        assert store.recover() == claimed and store.counts() == dict(queued=2, running=0, done=0, failed=0)
        assert sorted(store.claim(5), key=lambda j: j.id) == list(added.values())
    finally:
        store.close()
