"""What the three CLIs share: one-line errors with a non-zero exit, and quieter third-party logging."""

from __future__ import annotations

import os
import sys
import warnings

import click

from samf.runtime.errors import SamfError

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
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
            click.echo(f"error: {e.strerror or e}: {e.filename}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def torch_threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or max(1, os.cpu_count() or 1))
