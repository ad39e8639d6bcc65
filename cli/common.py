"""What the three CLIs share: one-line errors with a non-zero exit, quieter third-party logging, and options
generated from a stage's config dataclass."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import traceback
import warnings

import click

from samf.errors import PeerRankFailed, SamfError

#: Exit code for bad input or environment (click uses 2 for usage errors, we keep that meaning).
EXIT_BAD_INPUT = 2


class SamfGroup(click.Group):
    """A click group whose commands report :class:`SamfError` (and missing files) as one line, no traceback;
    usage errors too (click's own take three: usage, a hint, the error)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # the bare command: its help, as click prints it
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:
            _leave(EXIT_BAD_INPUT, f"error: {e.format_message()} (see {_help_of(e.ctx)})")
        except click.ClickException as e:
            _leave(e.exit_code, f"error: {e.format_message()}")
        except click.Abort:
            _leave(130, "interrupted")
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Deprecation chatter from the training libraries is for their developers, not our users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        # The readers' warnings about odd files: what matters reaches the user as our own one-line error.
        warnings.filterwarnings("ignore", module=r"(pydicom|nibabel)(\.|$)")
        try:
            return super().invoke(ctx)
        except SamfError as e:
            _leave(EXIT_BAD_INPUT, f"error: {_rank_prefix()}{e}")
        except OSError as e:
            # A named path the system refused (missing, a file where a folder must be, a name too long, no
            # space, a read-only disk): the user's environment, said in one line. Unnamed ones are bugs.
            if e.filename is None and not isinstance(e, (FileNotFoundError, NotADirectoryError, PermissionError)):
                if not _several_ranks():
                    raise
                traceback.print_exc()
                _leave(1)
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
    if line:  # one line, whatever a file name held: a newline in it must not forge a second message
        click.echo(line.replace("\r", "\\r").replace("\n", "\\n"), err=True)
    if _several_ranks():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _help_of(ctx) -> str:
    return f"'{ctx.command_path} --help'" if ctx is not None else "--help"


def capped_threads(n: int | None, option: str = "--threads") -> int | None:
    """``n`` threads, or the cores this process may use where ``n`` is more (with a note on stderr): a thread
    beyond them only waits for a core, and llama.cpp's and ONNX Runtime's threads, which wait for each other by
    spinning, then stall one another (``--threads 512`` on two cores hung a report). None stays None."""
    from samf.engines.native import usable_cores

    if n is None:
        return None
    if n < 1:
        raise click.UsageError(f"{option} {n}: the number of CPU threads, at least 1")
    cores = usable_cores()
    if n > cores:
        click.echo(f"note: {option} {n} is more than the {cores} cores this process may use; using {cores}", err=True)
        return cores
    return n


def _threads_callback(ctx, param, value):
    return capped_threads(value, param.opts[0])


def threads_option(help: str = "CPU threads for the engines (default: all cores)"):
    """--threads N: 1 to 1024, capped to the cores this process may use (see :func:`capped_threads`)."""
    return click.option("--threads", type=click.IntRange(min=1, max=1024), default=None, callback=_threads_callback,
                        help=f"{help}; more than the cores this process may use are capped to them")


def torch_threads(n: int | None) -> None:
    import torch

    n = capped_threads(n or None)  # 0, as some callers pass, is the default: every core
    torch.set_num_threads(n or max(1, os.cpu_count() or 1))


def out_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be a folder to write into, found before any work (None: it can): something that is not
    a folder where it or a folder above it must be (``/dev/null``, a file), or a name longer than the filesystem
    takes (NAME_MAX bytes a name, PATH_MAX a path)."""
    full = os.path.abspath(path)
    probe = full
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is not a folder" if probe == full else f"{probe!r}, in its path, is not a folder"
    name_max, path_max = 255, 4096
    with contextlib.suppress(OSError, ValueError):
        name_max = os.pathconf(probe, "PC_NAME_MAX")
    with contextlib.suppress(OSError, ValueError):
        path_max = os.pathconf(probe, "PC_PATH_MAX")
    for part in os.path.relpath(full, probe).split(os.sep) if probe != full else ():
        size = len(os.fsencode(part))
        if size > name_max:
            return f"a name of {size} bytes ({part[:24]}...) is longer than the {name_max} this filesystem allows"
    if len(os.fsencode(full)) >= path_max:
        return f"a path of {len(os.fsencode(full))} bytes is longer than the {path_max - 1} this system allows"
    return None


class OutDir(click.Path):
    """A folder to write into (``click.Path(file_okay=False)``), refused at once where it cannot be one (see
    :func:`out_dir_problem`), not after minutes of work."""

    def __init__(self):
        super().__init__(file_okay=False)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        problem = out_dir_problem(os.fsdecode(path))
        if problem:
            self.fail(problem, param, ctx)
        return path


class CommaList(click.ParamType):
    """``a,b,c`` -> ``("a", "b", "c")``."""

    name = "a,b,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = tuple(v.strip() for v in str(value).split(",") if v.strip())
        if not items:
            self.fail("needs at least one name", param, ctx)
        return items


def config_options(cls, skip: tuple = ()):
    """One click option per field of the config dataclass ``cls`` (fields made with
    :func:`samf.train.run_folder.option`), named after the field, with its help, choices and range.

    Every option's value is None unless given, so the stage takes its default from the run preset, then from
    the dataclass: each default is written once, in the dataclass, and shown in ``--help`` from there."""

    def decorate(f):
        for fld in reversed(dataclasses.fields(cls)):
            meta = fld.metadata
            if fld.name in skip or "help" not in meta:
                continue
            default = fld.default
            shown = ",".join(default) if isinstance(default, tuple) else default
            if isinstance(default, bool) or default is None and "choices" not in meta:
                decls = meta.get("flag", f"--{fld.name.replace('_', '-')}/--no-{fld.name.replace('_', '-')}")
                kind = dict(is_flag=True) if "/" not in decls else {}
                if default is not None:
                    shown = decls.split("/")[0 if default else 1].lstrip("-") if "/" in decls else default
                decls = (decls,)
            else:
                decls = (f"--{fld.name.replace('_', '-')}",)
                if "choices" in meta:
                    kind = dict(type=click.Choice(meta["choices"]))
                elif isinstance(default, tuple):
                    kind = dict(type=CommaList())
                elif "min" in meta or "max" in meta:
                    rng = click.IntRange if isinstance(default, int) else click.FloatRange
                    kind = dict(type=rng(min=meta.get("min"), max=meta.get("max")))
                else:
                    kind = dict(type=type(default))
            plain_flag = kind.get("is_flag", False)  # absent means off: no default to show
            help_text = meta["help"] + ("" if default is None or plain_flag else f"  [default: {shown}]")
            f = click.option(*decls, fld.name, default=None, help=help_text, **kind)(f)
        return f

    return decorate
