"""The export's knobs: plain dataclasses, no numpy, torch or onnx (``samf-export`` imports them when it starts).

A field made with :func:`~samf.runtime.options.option` is also a ``samf-export`` option (see
:func:`samf.cli.common.config_options`), and the export's functions take their defaults from these fields, so each
default is written once, here (docs/DESIGN.md, "Configuration is data").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from samf.runtime.options import option

#: The unquantized GGUF types the conversion writes (:data:`samf.export.gguf_convert.OUTTYPES`' keys).
GGUF_TYPES = ("F32", "F16", "BF16")
#: The random-weight models ``samf-export synthetic-bundle`` makes (:mod:`samf.export.synthetic`).
PRESETS = ("paper", "tiny")
#: The graphs TensorRT plans are built from: ``auto`` is fp16 where the bundle has it, else fp32.
PLAN_PRECISIONS = ("auto", "fp16", "fp32")

_QUANTS_HELP = "llama.cpp quant types to add (Q8_0, Q4_K_M, Q6_K, ...); repeatable"


@dataclass(frozen=True)
class Tolerance:
    """What a variant must hold against fp32 on the held-out scans to be written."""

    slice_cos_mean: float    # mean cosine of the (standardised) slice embeddings
    slice_cos_min: float     # the worst slice's
    report_agreement: float  # share of greedy reports identical to the fp32 encoders' (when reports are checked)
    fused_cos_min: float = -1.0  # the worst fused row's cosine (the rows the LLM reads); -1: not bounded


TOLERANCES = {
    # fp16 is held to its embeddings (0.99998 mean, 0.9998 worst measured on the demo and the paper ViT). Its
    # reports flip on near ties of a greedy decoder: 18-19 of 20 on the demo, whichever further ops (activation
    # products, residual adds, GELU, the patch embedding) were kept fp32, so the report bound is looser.
    # The fused rows, made from the slices, are held to the slices' floor.
    "fp16": Tolerance(slice_cos_mean=0.999, slice_cos_min=0.999, report_agreement=0.8, fused_cos_min=0.999),
    # The issue's floor: cosine 0.99, and the fp32 encoders' report on 95% of held-out scans; the fused rows to
    # the worst slice's floor.
    "int8": Tolerance(slice_cos_mean=0.99, slice_cos_min=0.9, report_agreement=0.95, fused_cos_min=0.9),
    # The issue's floor for a faster CPU variant: slice cosine 0.999, and the fp32 encoders' report on 95% of the
    # held-out scans; the fused rows to the slices' floor.
    "bf16": Tolerance(slice_cos_mean=0.999, slice_cos_min=0.999, report_agreement=0.95, fused_cos_min=0.999),
}


def _as_option(t: Tolerance) -> str:
    """A tolerance as ``--int8-tolerance`` takes it: slice cosine mean and minimum, share of reports."""
    return f"{t.slice_cos_mean:g} {t.slice_cos_min:g} {t.report_agreement:g}"


@dataclass
class VariantCheck:
    """Which encoder variants the export makes besides fp32 and how it checks them
    (:func:`samf.export.encoder_variants.add_encoder_variants`). ``precisions`` may name ``none`` (no variant);
    repeats and ``none`` are dropped."""

    # bf16 only when asked (--precision bf16): checking it loads OpenVINO into the exporting process, which has
    # run torch, and a process holding both was seen to crash later in a subprocess spawn (the test suite)
    precisions: tuple = option(("fp16", "int8"), "encoder precisions made besides fp32, each kept only if it holds "
                               "its tolerance; repeatable", name="--precision", multiple=True,
                               choices=(*TOLERANCES, "none"))
    data: str | None = option(None, "dataset folder whose test.csv lists the held-out scans the variants are "
                              "checked on (default: synthetic phantoms no samf dataset contains)",
                              name="--check-data", path="dir", exists=True)
    scans: int = option(20, "held-out scans the variants are checked on", name="--check-scans", min=1, max=10000)
    report_tokens: int = option(256, "longest greedy report compared with the fp32 encoders' (0: compare "
                                "embeddings only)", name="--check-tokens", min=0, max=3072)
    int8_tolerance: tuple | None = option(None, "what int8 must hold to be written: slice cosine mean and minimum, "
                                          "share of fp32's reports",
                                          type=float, nargs=3, min=(-1, -1, 0), max=1,
                                          metavar="COS_MEAN COS_MIN REPORTS", shown=_as_option(TOLERANCES["int8"]))
    tolerances: dict = field(default_factory=lambda: dict(TOLERANCES))  # int8's replaced by int8_tolerance, if given

    def __post_init__(self):
        self.precisions = tuple(p for p in dict.fromkeys(self.precisions) if p != "none")
        if self.int8_tolerance is not None:
            self.tolerances = {**self.tolerances, "int8": Tolerance(*self.int8_tolerance)}


@dataclass(frozen=True)
class BundleConfig:
    """What ``samf-export bundle`` (:func:`samf.export.bundle_writer.write_bundle`) makes of the LLM; the encoders'
    variants are :class:`VariantCheck`'s."""

    quants: tuple = option(("Q8_0",), _QUANTS_HELP, name="--quant", multiple=True)
    base: str = option("F32", "unquantized GGUF kept in the bundle (the fidelity reference)", choices=GGUF_TYPES)


@dataclass(frozen=True)
class SyntheticConfig:
    """A bundle of random weights at a preset's shapes (:func:`samf.export.synthetic.write_synthetic_bundle`)."""

    preset: str = option("paper", "paper: ViT-B/16 at 224² and a Phi-3-mini-shaped LLM; tiny: the demo's sizes",
                         choices=PRESETS)
    layers: int | None = option(None, "LLM depth (paper: 32, Phi-3-mini's; fewer for a quicker look)", type=int, min=1)
    quants: tuple = option(("Q4_K_M",), _QUANTS_HELP, name="--quant", multiple=True)
    base: str = option("F16", "unquantized GGUF kept in the bundle", choices=GGUF_TYPES)
    checkpoint: str | None = option(None, "also keep the random checkpoint here (the PyTorch pipeline runs from it)",
                                    path="dir")
    seed: int = option(0, "seed of the random weights")


@dataclass(frozen=True)
class GgufConfig:
    """One conversion (``samf-export gguf``: :func:`samf.export.gguf_convert.convert_to_gguf`) or quantization
    (``samf-export quantize``: :func:`~samf.export.gguf_convert.quantize_gguf`) of the LLM."""

    outtype: str = option("F16", "type of the GGUF's tensors (norms stay F32)", name="--type", choices=GGUF_TYPES)
    qtype: str = option("Q8_0", "llama.cpp quant type (Q8_0, Q4_K_M, Q6_K, ...)", name="--type")


@dataclass(frozen=True)
class EngineBuildConfig:
    """TensorRT plans for this GPU (``samf-export build-engines``:
    :func:`samf.export.tensorrt_build.build_bundle_engines`)."""

    precision: str = option("auto", "which graphs to build from: auto is fp16 where the bundle has it (strongly "
                            "typed plans take their precision from the graph)", choices=PLAN_PRECISIONS)
    max_slices: int | None = option(None, "largest slice batch the ViT plan accepts", type=int, min=1,
                                    shown="the model's slice count")
    max_prompt_tokens: int = option(256, "longest prompt the fusion plan accepts, in tokens", min=1)
    workspace_gib: float = option(4.0, "TensorRT's workspace while building, GiB", min=0.0)
