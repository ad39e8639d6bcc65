"""What would abort the process inside llama.cpp is refused in one line by the adapter's single decode path,
whoever calls it: generation, teacher-forced scoring, or the prefill."""

import json
import os

import numpy as np
import pytest

from samf.engines.llama_cpp_engine import LlamaCppLLM
from samf.errors import SamfError


@pytest.fixture(scope="module")
def llm(quick):
    m = json.load(open(os.path.join(quick.bundle, "manifest.json")))
    model = LlamaCppLLM(os.path.join(quick.bundle, m["llm"]["files"]["Q8_0"]), n_ctx=64, n_batch=16)
    yield model
    model.close()


def test_positions_past_the_context_are_refused_in_scoring_too(llm):
    rows = np.zeros((8, llm.n_embd), np.float32)
    with pytest.raises(SamfError, match="positions"):
        llm.answer_nll([1], rows, [2, 3], [4] * llm.n_ctx, end=5)  # (llama.cpp may round n_ctx up)
    with pytest.raises(SamfError, match="positions"):
        llm.generate([1], rows, [2], stop=set(), max_new_tokens=llm.n_ctx)
    assert llm.answer_nll([1], rows, [2, 3], [4, 5, 6], end=7) > 0  # within the context: fine, and usable after


def test_rows_of_another_width_and_unknown_token_ids_are_refused(llm):
    with pytest.raises(SamfError, match="expects"):
        llm.generate([1], np.zeros((4, llm.n_embd + 1), np.float32), [2], stop=set(), max_new_tokens=2)
    with pytest.raises(SamfError, match="vocabulary"):
        llm.generate([1], np.zeros((4, llm.n_embd), np.float32), [llm.n_vocab + 5], stop=set(), max_new_tokens=2)


def test_a_prefill_longer_than_a_batch_is_split(llm):
    rows = np.random.default_rng(0).normal(0, 0.02, (40, llm.n_embd)).astype(np.float32)  # 40 > n_batch 16
    out = llm.generate([1], rows, [2, 3], stop=set(), max_new_tokens=3)
    assert out["prompt_tokens"] == 43 and len(out["ids"]) == 3


def test_choice_scores_equal_one_request_per_choice_and_leave_the_cache_clean(llm):
    """Scoring four answers after one prefill (each one's cells removed after it) gives what four separate
    teacher-forced runs give, whatever the order; a choice too long for the context is refused first."""
    rows = np.random.default_rng(1).normal(0, 0.02, (6, llm.n_embd)).astype(np.float32)
    choices = [[40, 41, 42], [50], [60, 61], [40, 41, 43, 44]]
    alone = [llm.answer_nll([1], rows, [2, 3], c, end=7) for c in choices]
    together = llm.choice_nll([1], rows, [2, 3], choices, end=7)
    assert np.allclose(together, alone, rtol=1e-4, atol=1e-5) and len(set(np.round(together, 4))) == 4
    assert np.allclose(llm.choice_nll([1], rows, [2, 3], choices[::-1], end=7), together[::-1], rtol=1e-4, atol=1e-5)
    with pytest.raises(SamfError, match="positions"):
        llm.choice_nll([1], rows, [2, 3], [[4] * llm.n_ctx], end=7)


def test_llama_cpps_logging_is_silenced_whether_or_not_python_stderr_is_fd_2(capfd):
    """llama.cpp's C code logs to file descriptor 2, llama-cpp-python's log callback to Python's sys.stderr: where
    sys.stderr was replaced (click's test runner, an application embedding samf), one or the other got out."""
    import contextlib
    import io
    import sys

    from samf.engines.native import quiet_native_stderr

    elsewhere = io.StringIO()
    for python_stderr in (None, elsewhere):
        with contextlib.redirect_stderr(python_stderr) if python_stderr else contextlib.nullcontext():
            with quiet_native_stderr():
                os.write(2, b"llama_context: n_ctx_seq (768) > n_ctx_train (512)\n")
                print("llama_context: n_ctx is not divisible by n_seq_max", file=sys.stderr)
            os.write(2, b"after\n")
            print("python after", file=sys.stderr)
    assert capfd.readouterr().err == "after\npython after\nafter\n"
    assert elsewhere.getvalue() == "python after\n"
