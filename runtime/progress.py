"""Progress bars for people, progress lines for logs.

On a terminal, tqdm's bar. Anywhere else (a CI log, a file, a pipe) a redrawn bar becomes a flood of carriage
returns, so the same meter is written as a plain line at every tenth of the way (or every 30 s when the total
is unknown), plus the last one.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class LineProgress(tqdm):
    """tqdm that writes whole lines, one per ``step_percent`` of the total, never a carriage return."""

    def __init__(self, *args, step_percent: int = 10, every_s: float = 30.0, **kwargs):
        self._step, self._every, self._last, self._last_t = step_percent, every_s, None, 0.0
        kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)

    def _line(self) -> None:
        self.fp.write(self.format_meter(**self.format_dict) + "\n")
        self.fp.flush()

    def display(self, msg=None, pos=None):
        if self.total:
            step = int(100 * self.n / self.total) // self._step
            if step == self._last:
                return True
            self._last = step
        elif time.monotonic() - self._last_t < self._every and self._last is not None:
            return True
        self._last, self._last_t = self._last if self.total else 0, time.monotonic()
        self._line()
        return True

    def close(self):
        if not self.disable:
            if not self.total or self._last != int(100 * self.n / self.total) // self._step:
                self._line()
            self.disable = True  # tqdm's own close would add an empty line
        super().close()


def progress_bar(iterable=None, *, disable: bool = False, file=None, **kwargs):
    """A progress bar over ``iterable`` (tqdm's arguments): a bar on a terminal, lines elsewhere."""
    out = file or sys.stderr
    if disable or _is_terminal(out):
        return tqdm(iterable, disable=disable, file=out, **kwargs)
    return LineProgress(iterable, file=out, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
