"""Helpers for the native libraries the engines wrap: how many cores to give them, and keeping their C-level
logging off the user's terminal. Used by the engines, the export and the CLI alike."""

from __future__ import annotations

import contextlib
import os
import sys
import time


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence llama.cpp's logging: its C code writes to file descriptor 2, and llama-cpp-python's log callback
    prints to Python's ``sys.stderr``; both go to /dev/null meanwhile. ``sys.stderr`` need not be fd 2 (click's test
    runner, or an application embedding samf, replaces it): silencing only the one left the other's lines out."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()  # what Python had buffered for stderr goes out before it is silenced
    try:
        saved = os.dup(2)
    except OSError:  # started without a descriptor 2
        saved = None
    with open(os.devnull, "w") as null:
        if saved is not None:
            os.dup2(null.fileno(), 2)
        try:
            with contextlib.redirect_stderr(null):
                yield
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)


class CoreShare:
    """How many of this process's cores other programs keep busy, from /proc/stat between two calls: a
    workstation runs other programs, and llama.cpp's threads wait for each other at every operation by spinning,
    so a thread on a core another process holds stalls them all (measured: 3.64 -> 0.30 tok/s with one busy
    process on one of two cores). :meth:`threads` gives the threads to use now: the usable cores less the
    ones busy elsewhere, at least one. Cheap (one read of /proc/stat, no sleeping); a sample shorter than
    ``min_interval_s`` keeps the previous answer."""

    def __init__(self, cores: int | None = None, min_interval_s: float = 0.25, stat_path: str = "/proc/stat"):
        self.cores = cores or usable_cores()
        self.min_interval_s, self.stat_path = min_interval_s, stat_path
        try:
            self._cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            self._cpus = None
        self._last = self._sample()
        self._answer = self.cores

    def _sample(self):
        """(monotonic seconds, busy seconds of our cores, this process's CPU seconds), or None off Linux."""
        try:
            with open(self.stat_path) as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = 0
        for line in lines:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu" and (self._cpus is None or name in self._cpus):
                v = [int(x) for x in values[:8]]
                busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        own = os.times()
        return time.monotonic(), busy / tick, own.user + own.system

    def busy_elsewhere(self) -> float | None:
        """Cores' worth of CPU other processes used since the last sample (None: too soon, or unknown)."""
        now = self._sample()
        if now is None or self._last is None or now[0] - self._last[0] < self.min_interval_s:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def threads(self) -> int:
        other = self.busy_elsewhere()
        if other is not None:
            self._answer = max(1, min(self.cores, self.cores - int(other + 0.5)))
        return self._answer
