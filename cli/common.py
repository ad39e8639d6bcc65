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


def threads_callback(ctx, param, value):
    """click's callback of a --threads option: capped to the cores this process may use (:func:`capped_threads`)."""
    return capped_threads(value, param.opts[0])


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


class FirstN(click.IntRange):
    """``N`` -> ``(0, 1, ..., N-1)``: a tuple of seeds given as how many (at least ``min``)."""

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        return tuple(range(super().convert(value, param, ctx)))


class ConfigOption(click.Option):
    """A command-line option made from a field of a config dataclass (:func:`config_options`): it knows its
    dataclass and field, so ``tests/test_config_defaults.py`` can check that ``--help`` shows the field's
    default."""

    def __init__(self, *args, config_cls=None, config_field=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_cls, self.config_field = config_cls, config_field


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_default(fld, meta: dict | None = None) -> str | None:
    """How ``--help`` shows the default of the option made from field ``fld`` (with ``meta``, its metadata with
    the command's overrides; None: it shows none): the switch a boolean is at, a tuple comma-separated (a count:
    its length), ``shown=`` for a default computed at run time."""
    meta, default = fld.metadata if meta is None else meta, fld.default
    if "shown" in meta:
        return meta["shown"]
    if default is None or default is dataclasses.MISSING:
        return None
    if isinstance(default, bool):
        name = meta.get("name", _dashed(fld.name))
        decls = meta.get("flag", f"{name}/--no-{name[2:]}")
        if "/" not in decls:
            return None  # a plain flag: absent means off
        return decls.split("/")[0 if default else 1].lstrip("-")
    if isinstance(default, tuple):
        if meta.get("count"):
            return str(len(default))
        return ",".join(map(str, default)) if default else None
    return str(default)


def _nth(bound, i: int):
    """The ``i``-th number's bound: ``bound`` itself, or its ``i``-th item where it is a tuple."""
    return bound[i] if isinstance(bound, tuple) else bound


def _click_kwargs(fld, meta: dict) -> tuple:
    """(the option's declarations, click's keyword arguments) for field ``fld`` with metadata ``meta``."""
    default = fld.default
    name = meta.get("name", _dashed(fld.name))
    kind = meta.get("type")
    if isinstance(default, bool) or (default is None and kind is None and "choices" not in meta
                                     and "path" not in meta):
        decls = meta.get("flag", f"{name}/--no-{name[2:]}")
        return (decls,), (dict(is_flag=True) if "/" not in decls else {})
    kw = {}
    if meta.get("nargs"):  # N numbers (float unless type=int), each within its own bounds or the shared ones
        number = click.IntRange if kind is int else click.FloatRange
        kw["type"] = tuple(number(min=_nth(meta.get("min"), i), max=_nth(meta.get("max"), i))
                           for i in range(meta["nargs"]))
    elif meta.get("count"):
        kw["type"] = FirstN(min=meta.get("min", 1), max=meta.get("max"))
    elif "choices" in meta:
        kw["type"] = click.Choice(meta["choices"])
    elif "path" in meta:
        kw["type"] = click.Path(file_okay=meta["path"] != "dir", dir_okay=meta["path"] != "file",
                                exists=meta.get("exists", False))
    elif "min" in meta or "max" in meta:
        number = kind or type(default)
        rng = click.IntRange if number is int else click.FloatRange
        kw["type"] = rng(min=meta.get("min"), max=meta.get("max"))
    elif meta.get("multiple"):
        kw["type"] = kind or str
    elif isinstance(default, tuple):
        kw["type"] = CommaList()
    else:
        kw["type"] = kind or type(default)
    if meta.get("multiple"):
        kw["multiple"] = True
    for key in ("envvar", "metavar"):
        if key in meta:
            kw[key] = meta[key]
    return (name,), kw


def config_options(cls, skip: tuple = (), only: tuple | None = None, **overrides):
    """One click option per field of the config dataclass ``cls`` made with :func:`samf.runtime.options.option`
    (``only``: these fields, in this order; ``skip``: not these), named after the field (or its ``name=``), with
    its help, choices, range, path kind. ``overrides``: per field, metadata to replace (``help=``, ``min=``...)
    and click's ``callback=``.

    Every option's value is None unless given, so the command takes its default from the dataclass (a training
    stage: from the run preset, then the dataclass; see :func:`config_from`): each default is written once, in
    the dataclass, and shown in ``--help`` from there."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(only) if only is not None else [f.name for f in dataclasses.fields(cls)]

    def decorate(f):
        for name in reversed(names):
            fld = by_name[name]
            if name in skip or "help" not in fld.metadata:
                continue
            extra = dict(overrides.get(name, {}))
            click_kw = {k: extra.pop(k) for k in ("callback",) if k in extra}
            meta = {**fld.metadata, **extra}
            decls, kw = _click_kwargs(fld, meta)
            shown = shown_default(fld, meta)
            help_text = meta["help"] + ("" if shown is None else f"  [default: {shown}]")
            f = click.option(*decls, fld.name, cls=ConfigOption, config_cls=cls, config_field=fld, default=None,
                             help=help_text, **kw, **click_kw)(f)
        return f

    return decorate


def config_from(cls, given: dict, **fixed):
    """An instance of ``cls`` from the values of its options in ``given`` (taken out of it; those not given, None
    or an empty repeatable option, leave the dataclass's default), and ``fixed``."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            v = given.pop(f.name)
            if v is not None and v != ():
                values[f.name] = v
    return cls(**{**values, **fixed})
