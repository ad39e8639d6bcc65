"""Config fields that are also command-line options: each knob's default and help are written once, in its config
dataclass, and the command lines are made from them (:func:`samf.cli.common.config_options`; docs/DESIGN.md,
"Configuration is data"). Plain dataclasses, no click: the runtime, training and the command lines all use it.
"""

from __future__ import annotations

import dataclasses


def option(default, help: str, **cli):
    """A dataclass field that is also a command-line option: its default, its help, and how the option is spelled.

    ``cli`` (all optional): ``name="--max-tokens"`` (the option's name, when not the field's with dashes);
    ``flag="--a/--b"`` (a boolean's switch); ``choices=(...)``; ``min=``/``max=`` (a range); ``type=int|float|str``
    (for a field whose default is None and that is not a switch); ``path="file"|"dir"`` (and ``exists=True``);
    ``multiple=True`` (repeatable: a tuple); ``count=True`` (a tuple given as its length: ``--seeds 3`` is
    ``(0, 1, 2)``); ``nargs=N`` (N numbers after the option, a tuple; ``min``/``max`` may then be tuples, one bound
    per number); ``envvar="NAME"``; ``metavar="..."`` (how ``--help`` names the value); ``shown="..."`` (how
    ``--help`` shows a default computed at run time, where the field's default is None)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def options_of(cls) -> list:
    """The fields of the config dataclass ``cls`` that are command-line options (made with :func:`option`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]
