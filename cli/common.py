"""What the three CLIs share: one-line errors with a non-zero exit, and quieter third-party logging."""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import click

from samf.runtime.errors import PeerRankFailed, SamfError

#: Exit code for bad input or environment (click uses 2 for usage errors, we keep that meaning).
EXIT_BAD_INPUT = 2


class SamfGroup(click.Group):
    """A click group whose commands report :class:`SamfError` (and missing files) as one line, no traceback."""

    def invoke(self, ctx):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Deprecation chatter from the training libraries is for their developers, not our users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            return super().invoke(ctx)
        except SamfError as e:
            _leave(EXIT_BAD_INPUT, f"error: {_rank_prefix()}{e}")
        except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
            _leave(EXIT_BAD_INPUT, f"error: {_rank_prefix()}{e.strerror or e}: {e.filename}")
        except PeerRankFailed as e:
            _leave(1, str(e))
        except KeyboardInterrupt:
            _leave(130, "interrupted")
        except Exception:
            if not _several_ranks():
                raise
            traceback.print_exc()  # a bug: its traceback, then out like any failed rank
            _leave(1)


def _several_ranks() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank_prefix() -> str:
    """``rank N: `` under torchrun with several ranks (which rank failed matters there), else nothing."""
    return f"rank {os.environ.get('RANK', '?')}: " if _several_ranks() else ""


def _leave(code: int, line: str | None = None) -> None:
    """Print ``line`` and exit with ``code``. A failed rank under torchrun leaves at once, without the
    interpreter's teardown: there, freeing DDP's reducer joins a gloo worker thread that waits for the GIL
    the freeing thread holds, and the rank hangs on its way out while its peers wait in a collective."""
    if line:
        click.echo(line, err=True)
    if _several_ranks():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def torch_threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or max(1, os.cpu_count() or 1))
