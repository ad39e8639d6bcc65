"""One default per knob (issue 30): a knob's default is written once, in its config dataclass, and the command-line
options of ``samf``, ``samf-train`` and ``samf-export`` are made from it, so ``--help`` cannot show another; the
commands that take a config take every one of its options; the run folder's file names are written once, in
``train/run_files.py``. Fast: no model, no torch."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import click
import pytest

import samf
from samf.cli.common import ConfigOption, config_from
from samf.cli.demo import DemoConfig
from samf.cli.export_cli import main as export_main
from samf.cli.samf_cli import main as samf_main
from samf.cli.train_cli import main as train_main
from samf.export.configs import (
    TOLERANCES,
    BundleConfig,
    EngineBuildConfig,
    GgufConfig,
    SyntheticConfig,
    VariantCheck,
)
from samf.runtime.inference.pipeline import PipelineConfig
from samf.runtime.options import options_of
from samf.runtime.service.config import ServiceConfig
from samf.runtime.tools.bench import BenchConfig
from samf.train import run_files
from samf.train.ablation import AblationConfig
from samf.train.configs import (
    DinoConfig,
    FinetuneConfig,
    LMConfig,
    ProbeConfig,
    TokenizerConfig,
    WarmupConfig,
)

ROOT = pathlib.Path(samf.__file__).parent
GROUPS = {"samf": samf_main, "samf-train": train_main, "samf-export": export_main}
ENGINES = ("quant", "n_threads", "backend", "encoders", "n_gpu_layers")
ALL = None  # every option of the dataclass
#: (tool, command, dataclass, its fields the command must take as options).
TAKES = [
    ("samf", "report", PipelineConfig, (*ENGINES, "max_new_tokens", "parallel")),
    ("samf", "vqa", PipelineConfig, ENGINES),
    ("samf", "serve", PipelineConfig, (*ENGINES, "max_new_tokens", "parallel")),
    ("samf", "serve", ServiceConfig, ALL),
    ("samf", "doctor", ServiceConfig, ("host", "port", "dicom_port", "work", "ae_title", "dicom_dest")),
    ("samf", "bench", BenchConfig, ALL),
    ("samf", "bench", PipelineConfig, ("n_threads", "backend", "n_gpu_layers")),
    ("samf", "demo", DemoConfig, ALL),
    ("samf-train", "ablate", AblationConfig, ALL),
    ("samf-train", "probe", ProbeConfig, ALL),
    ("samf-train", "tokenizer", TokenizerConfig, ALL),
    ("samf-train", "pretrain-2d", DinoConfig, ALL),
    ("samf-train", "pretrain-lm", LMConfig, ALL),
    ("samf-train", "warmup-3d", WarmupConfig, ALL),
    ("samf-train", "finetune", FinetuneConfig, ALL),
    ("samf-export", "bundle", BundleConfig, ALL),
    ("samf-export", "bundle", VariantCheck, ALL),
    ("samf-export", "synthetic-bundle", SyntheticConfig, ALL),
    ("samf-export", "synthetic-bundle", VariantCheck, ("precisions",)),
    ("samf-export", "gguf", GgufConfig, ("outtype",)),
    ("samf-export", "quantize", GgufConfig, ("qtype",)),
    ("samf-export", "build-engines", EngineBuildConfig, ALL),
]


def _commands():
    """(tool, command name, click command) for every command of the three tools."""
    for tool, group in GROUPS.items():
        for name, command in sorted(group.commands.items()):
            yield tool, name, command


def _generated():
    """(tool, command, option) for every option made from a config field."""
    return [(tool, name, command, p) for tool, name, command in _commands() for p in command.params
            if isinstance(p, ConfigOption)]


def _help_default(command: click.Command, option: click.Option) -> str | None:
    """The default ``--help`` shows for ``option`` (None: it shows none)."""
    ctx = click.Context(command, info_name=command.name)
    record = option.get_help_record(ctx)
    found = re.findall(r"\[default: (.*?)\]", record[1] if record else "")
    assert len(found) <= 1, record
    return found[0] if found else None


def test_the_options_are_made_from_configs():
    made = {(tool, name) for tool, name, *_ in _generated()}
    assert {(tool, name) for tool, name, *_ in TAKES} <= made


@pytest.mark.parametrize("tool,name,command,option", _generated(), ids=lambda x: getattr(x, "name", x))
def test_help_shows_the_dataclass_default(tool, name, command, option):
    """``--help``'s default, read back through the option's own type, is the field's default; the option itself
    has none (None unless given), so the dataclass's applies."""
    fld, meta = option.config_field, option.config_field.metadata
    shown = _help_default(command, option)
    assert option.default is None, f"{tool} {name} {option.opts[0]}: a default besides the dataclass's"
    where = f"{tool} {name} {option.opts[0]} ({option.config_cls.__name__}.{fld.name} = {fld.default!r})"
    if "shown" in meta:  # computed when the config is made
        assert fld.default is None and shown == meta["shown"], where
    elif shown is None:
        assert fld.default in (None, ()) or (option.is_flag and not option.secondary_opts and fld.default is False), \
            where
    elif option.is_flag:  # a switch: which side is the default
        sides = {option.opts[0].lstrip("-"): True, option.secondary_opts[0].lstrip("-"): False}
        assert sides[shown] is fld.default, where
    else:
        ctx = click.Context(command)
        if option.multiple:  # a repeatable option's default: its values, comma-separated
            assert tuple(option.type.convert(v, option, ctx) for v in shown.split(",")) == fld.default, where
        else:
            assert option.type.convert(shown, option, ctx) == fld.default, where


@pytest.mark.parametrize("tool,name,cls,fields", TAKES, ids=lambda x: getattr(x, "__name__", x))
def test_each_command_takes_its_configs_options_none_written_again(tool, name, cls, fields):
    command = GROUPS[tool].commands[name]
    wanted = [f.name for f in options_of(cls) if fields is ALL or f.name in fields]
    if cls is FinetuneConfig:
        wanted = [f for f in wanted if f != "extra"]
    made = {p.config_field.name: p for p in command.params
            if isinstance(p, ConfigOption) and p.config_cls is cls}
    assert sorted(made) == sorted(wanted)
    # No hand-written option spells one of them again.
    spelled = {opt for p in made.values() for opt in (*p.opts, *p.secondary_opts)}
    again = [p.opts for p in command.params
             if isinstance(p, click.Option) and not isinstance(p, ConfigOption) and set(p.opts) & spelled]
    assert again == []


def test_a_config_from_nothing_given_is_the_dataclass_default():
    for cls, fixed in ((PipelineConfig, {}), (ServiceConfig, {}), (DemoConfig, {}), (BenchConfig, {}),
                       (AblationConfig, {"out_dir": "o"}), (ProbeConfig, {}), (FinetuneConfig, {}),
                       (BundleConfig, {}), (VariantCheck, {}), (SyntheticConfig, {}), (GgufConfig, {}),
                       (EngineBuildConfig, {})):
        given = {f.name: (() if f.metadata.get("multiple") else None) for f in options_of(cls)}
        assert config_from(cls, dict(given), **fixed) == cls(**fixed)
    assert ServiceConfig().work.endswith("samf/service") and ServiceConfig(work="/w").audit_log == "/w/audit.jsonl"


def test_the_knobs_that_were_written_twice_have_one_default():
    """The figures issue 30 found disagreeing, and where the others now read them."""
    from samf.train.recipe import RecipeSteps

    assert PipelineConfig.parallel == 4 and PipelineConfig.max_new_tokens == 256
    assert PipelineConfig.answer_tokens == 32  # a multiple-choice answer: its own knob
    assert RecipeSteps.lm == LMConfig.steps and AblationConfig.dino_steps == RecipeSteps.dino
    assert AblationConfig.lm_steps == RecipeSteps.lm
    assert (RecipeSteps.finetune, AblationConfig.finetune_steps, FinetuneConfig.steps) == (3000, 1000, 400)
    fields = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    assert fields["finetune_steps"] is None  # the recipe's


def test_the_exports_functions_take_their_defaults_from_its_dataclasses():
    """samf-export's knobs were written in the command line and again in the functions' signatures (gguf's
    --type F16 against convert_to_gguf's F32): the functions now read the dataclasses' defaults."""
    import inspect

    from samf.export import gguf_convert, synthetic, tensorrt_build

    def defaults(fn) -> dict:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    assert defaults(gguf_convert.convert_to_gguf)["outtype"] == GgufConfig.outtype == "F16"
    assert defaults(gguf_convert.quantize_gguf)["qtype"] == GgufConfig.qtype
    syn = defaults(synthetic.write_synthetic_bundle)
    assert {f.name: syn[f.name] for f in options_of(SyntheticConfig)} == dataclasses.asdict(SyntheticConfig())
    assert syn["precisions"] == VariantCheck().precisions
    assert {k: defaults(tensorrt_build.build_bundle_engines)[k] for k in dataclasses.asdict(EngineBuildConfig())} \
        == dataclasses.asdict(EngineBuildConfig())
    # bundle_writer imports torch (the ONNX export), so its signature is read from the source.
    tree = ast.parse((ROOT / "export" / "bundle_writer.py").read_text())
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "write_bundle"]
    args = fn.args.args[-len(fn.args.defaults):]
    given = {a.arg: ast.unparse(d) for a, d in zip(args, fn.args.defaults)}
    assert (given["quants"], given["keep_unquantized"]) == ("BundleConfig.quants", "BundleConfig.base")
    # What the options choose from is what the export makes.
    assert set(GgufConfig.__dataclass_fields__["outtype"].metadata["choices"]) == set(gguf_convert.OUTTYPES)
    assert VariantCheck.__dataclass_fields__["precisions"].metadata["choices"] == (*TOLERANCES, "none")
    assert VariantCheck(precisions=("none", "int8", "int8")).precisions == ("int8",)
    assert VariantCheck(int8_tolerance=(0.5, 0.4, 0.3)).tolerances["int8"].slice_cos_min == 0.4


# ------------------------------------------------------------------------------------------ run-folder names

#: Names no other string of ours is: written anywhere as a string, they are a path.
NAMES = {v for k, v in vars(run_files).items() if k.isupper() and isinstance(v, str) and ("." in v or "_" in v)}
#: Words that are also stage names or keys ("finetune", "config"): a path only as a path's part.
PARTS = {v for k, v in vars(run_files).items() if k.isupper() and isinstance(v, str)} - NAMES
FOLDERS = ("train", "export", "cli", "runtime", "engines", "tests", "benchmarks")


def _docstrings(tree) -> set:
    return {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}


def _written_again(path: pathlib.Path) -> list:
    """(line, text) of each run-folder name written as a literal in ``path``: one of :data:`NAMES` as a string or a
    path's last part (``f"{run}/vit_dino.pt"``), an ``eval_<split>.json``, or one of :data:`PARTS` given to
    ``os.path.join``, ``/`` or after a slash."""
    tree = ast.parse(path.read_text())
    skip, out = _docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            v = node.value
            if v.lstrip("/") in NAMES or re.search(r"(^|/)eval_(\w*\.json)?$", v) or (
                    v.startswith("/") and v[1:] in PARTS):
                out.append((node.lineno, v))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "join" and len(node.args) > 1:
            out += [(a.lineno, a.value) for a in node.args if isinstance(a, ast.Constant) and a.value in PARTS]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            if node.right.value in PARTS or node.right.value in NAMES:
                out.append((node.lineno, node.right.value))
    return sorted(set(out))


def test_run_folder_names_are_written_only_in_run_files():
    assert {"run.json", "tokenizer.model", "vit_dino.pt", "aggregator_warmup.pt", "lm_base"} <= NAMES
    assert {"merged", "finetune", "config", "checkpoints", "tokenizer"} <= PARTS
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() in ((ROOT / "train" / "run_files.py").resolve(), pathlib.Path(__file__).resolve()):
                continue
            if hits := _written_again(path):
                found[str(path.relative_to(ROOT))] = hits
    assert found == {}, "write these names as samf.train.run_files' constants"


def test_the_name_check_sees_a_name_written_again(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text('"""RUN/vit_dino.pt in a docstring is prose."""\nimport os\n'
                   'a = os.path.join(run, "lm_base")\nb = f"{run}/merged"\nc = os.path.join(run, "config", "x")\n'
                   'd = tmp / "merged"\ne = f"eval_{split}.json"\nf = {"config": 1, "stage": "finetune"}\n')
    assert [v for _, v in _written_again(bad)] == ["lm_base", "/merged", "config", "merged", "eval_"]
