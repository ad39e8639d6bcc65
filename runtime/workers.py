"""Worker processes that end with the process that started them, at any moment, even by kill -9.

samf starts workers in two places: ``samf-train prepare``'s spawn pool (:mod:`samf.train.scan_cache`) and the
DataLoader workers that stream a prepared cache (:mod:`samf.train.cache_stream`). Each is made with
:class:`DieWithParent` as its initializer, and a killed samf leaves none of them behind.

Why both halves of :func:`die_with_parent` are needed:

- Linux's ``PR_SET_PDEATHSIG`` sends the worker SIGKILL when its parent ends, wherever the worker is, blocked
  included. A blocked worker is the usual case: the pool's pipes are shared by the parent and every worker (each
  worker holds the result pipe's read end too), so once the parent is gone a worker's write of a scan's rows
  does not fail with EPIPE but waits for ever for a reader, and its sibling waits on the pipe's lock.
- The signal is only armed from the moment the worker asks, which is after its interpreter has started and its
  modules are imported: a parent that ended before then sends nothing. So the worker then compares its parent
  with the one the parent recorded at creation, and exits when they differ. Not ``getppid() == 1``: a subreaper
  (systemd --user, a container's init, ``prctl(PR_SET_CHILD_SUBREAPER)``) adopts orphans instead of init.

Armed first, checked second: either the parent ended before the request (the check sees another parent) or
after it (the signal comes). Where ``prctl`` is missing (not Linux), a daemon thread polls the parent instead.

The "parent" of ``PR_SET_PDEATHSIG`` is the thread that started the worker: start workers from a thread that
lives as long as they do (samf starts them from the thread that then reads their results). The workers must be
the recording process's own children: fork or spawn, not forkserver, whose workers are the server's children.

Torch-free: the runtime layer's, used by the training layer.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5          # the watchdog's period where the signal cannot be armed


def _arm_parent_death_signal(signum: int) -> bool:
    """Ask the kernel for ``signum`` when this process's parent ends; False where it cannot (not Linux)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """Called first thing in a worker whose parent's pid is ``parent`` (read in the parent, when it made the
    worker): from now on the worker ends when its parent does, and it ends at once if the parent has already
    ended (see the module's docstring)."""
    armed = _arm_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the signal was armed: nothing will come
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch, args=(parent,), name="samf-parent-watch", daemon=True).start()


class DieWithParent:
    """A worker initializer that runs :func:`die_with_parent`: made in the process that starts the workers (its
    pid is recorded then), pickled to spawned workers, and called with any arguments (a ProcessPoolExecutor's
    ``initializer`` takes none, a DataLoader's ``worker_init_fn`` the worker's id)."""

    def __init__(self, parent: int | None = None):
        self.parent = os.getpid() if parent is None else parent

    def __call__(self, *_ignored) -> None:
        die_with_parent(self.parent)

    def __repr__(self) -> str:
        return f"DieWithParent({self.parent})"
