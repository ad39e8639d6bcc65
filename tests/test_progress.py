"""Progress in a log is whole lines, one per tenth of the way, never carriage returns."""

import io

from samf.runtime.progress import progress_bar as progress


def test_a_log_gets_a_line_per_tenth_and_no_carriage_return():
    out = io.StringIO()
    for _ in progress(range(1000), desc="scans", file=out, mininterval=0):
        pass
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 11 and lines[0].startswith("scans:   0%") and "1000/1000" in lines[-1]


def test_an_unknown_total_gets_its_first_and_last_line():
    out = io.StringIO()
    for _ in progress(iter(range(500)), desc="rows", file=out, mininterval=0):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "500" in lines[-1]


def test_disabled_writes_nothing():
    out = io.StringIO()
    assert list(progress(range(5), file=out, disable=True)) == list(range(5))
    assert out.getvalue() == ""
