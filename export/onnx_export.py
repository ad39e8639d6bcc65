"""PyTorch -> ONNX for the three encoder modules, each validated against its source right after export.

Each module is described by an :class:`OnnxSpec` (inputs, outputs, dynamic axes, a dummy-input maker,
tolerance), in the manner of Optimum's exporter; one generic routine exports, runs ``onnx.checker`` and
compares ONNX Runtime with PyTorch on fresh inputs.

The comparison is relative to each output's own size (:class:`~samf.export.encoder_variants.Agreement`): float32
rounding grows with the values, so one absolute bound that holds the tiny model's rows to float noise refused a
correctly exported ViT-B/16, whose standardised outputs reach about a hundred. :data:`ONNX_AGREEMENT` sits between
the noise measured over many random models of both presets and what a graph broken in one place gives
(``benchmarks/export-tolerances.md``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from samf.errors import ExportCheckFailed
from samf.train.vlm import SamfVLM

from .encoder_variants import Agreement, AgreementMeter

OPSET = 17

#: ONNX Runtime (CPU, fp32) against PyTorch (fp32) on the export's random inputs, every output of every module:
#: 37x the worst float noise measured over random models of both presets (2.7e-6, weights 3x the init's; 70x at
#: the init's scale), and at least 10x below what a graph broken in one place gave (two weight rows swapped, an
#: attention scale squared, the standardisation's mean shuffled); the figures are in
#: benchmarks/export-tolerances.md.
ONNX_AGREEMENT = Agreement(rel_diff=1e-4, cos_min=1 - 1e-7)


@dataclass
class OnnxSpec:
    name: str                       # file stem in the bundle: vit.onnx, …
    module: nn.Module
    inputs: tuple                   # input names
    outputs: tuple                  # output names
    dynamic_axes: dict              # name -> {axis: label}
    dummy: Callable                 # seed -> tuple of example tensors
    bound: Agreement = None         # ONNX Runtime against PyTorch (None: ONNX_AGREEMENT)
    units: dict = None              # output -> (scale, offset) of a final standardisation (AgreementMeter.add)

    def __post_init__(self):
        self.bound = self.bound or ONNX_AGREEMENT


class _Vit(nn.Module):
    def __init__(self, vlm):
        super().__init__()
        self.encoder = vlm.encoder

    def forward(self, slices):        # [K, C, H, W] -> [K, D2], standardised
        return self.encoder.embed_slices(slices)


class _Aggregator(nn.Module):
    def __init__(self, vlm):
        super().__init__()
        self.agg = vlm.encoder.aggregator

    def forward(self, z2d):           # [B, K, D2] -> [B, N, D3]
        return self.agg(z2d)


class _Fusion(nn.Module):
    """The fused rows and the attention behind them (:meth:`SAMF.attend`): α ``[B, K]``, and γ averaged over the
    prompt ``[B, K]`` when the model has the Ao2D term; the runtime shows them as the slices that mattered."""

    def __init__(self, vlm):
        super().__init__()
        self.fusion = vlm.fusion

    def forward(self, z2d, z3d, text, text_mask):
        fused, alpha, gamma = self.fusion.attend(z2d, z3d, text, text_mask)
        return (fused, alpha) if gamma is None else (fused, alpha, gamma)


#: The fusion graph's outputs: the fused rows first (what the LLM reads), then the attention weights.
FUSION_OUTPUTS = ("fused", "alpha", "gamma")


def module_specs(vlm: SamfVLM) -> list:
    """The three exported modules of a model, with the shapes its config implies."""
    cfg = vlm.image_cfg
    v, a, f = cfg.vit, cfg.aggregator, cfg.fusion
    K = a.n_slices

    def g(seed):
        return torch.Generator().manual_seed(seed)

    def text_inputs(seed, B=1, T=7):
        gen = g(seed)
        mask = torch.ones(B, T, dtype=torch.int64)
        mask[:, T - 2:] = 0 if B > 1 else 1
        return (torch.randn(B, K, v.embed_dim, generator=gen), torch.randn(B, a.n_tokens, a.out_dim, generator=gen),
                torch.randn(B, T, f.d_text, generator=gen) * 0.05, mask)

    fusion_outputs = FUSION_OUTPUTS if f.ao2d else FUSION_OUTPUTS[:2]
    enc = vlm.encoder
    # The ViT's rounding happens before its standardisation: z2d's figures are taken on the CLS vectors.
    standardisation = {"z2d": (enc.slice_std.detach().numpy().copy(), enc.slice_mean.detach().numpy().copy())}
    return [
        OnnxSpec("vit", _Vit(vlm), ("slices",), ("z2d",),
                 {"slices": {0: "slices"}, "z2d": {0: "slices"}},
                 lambda s: (torch.randn(K, v.in_chans, v.img_size, v.img_size, generator=g(s)).clamp(-1, 1),),
                 units=standardisation),
        OnnxSpec("aggregator", _Aggregator(vlm), ("z2d",), ("z3d",),
                 {"z2d": {0: "batch"}, "z3d": {0: "batch"}},
                 lambda s: (torch.randn(1, K, v.embed_dim, generator=g(s)),)),
        OnnxSpec("fusion", _Fusion(vlm), ("z2d", "z3d", "text", "text_mask"), fusion_outputs,
                 {"z2d": {0: "batch"}, "z3d": {0: "batch"}, "text": {0: "batch", 1: "tokens"},
                  "text_mask": {0: "batch", 1: "tokens"}, **{o: {0: "batch"} for o in fusion_outputs}},
                 lambda s: text_inputs(s, T=5 + s % 7)),
    ]


def export_one(spec: OnnxSpec, out_path: str) -> dict:
    """Export ``spec`` to ``out_path`` (atomically), check it, and return its figures against PyTorch
    (:func:`validate_onnx`, with the bound it was held to); :class:`ExportCheckFailed` when they miss it."""
    tmp = out_path + ".tmp"
    try:
        export_graph(spec, tmp)
        fig = validate_onnx(spec, tmp)
        why = spec.bound.misses(fig)
        if why:
            raise ExportCheckFailed(f"{spec.name}: ONNX Runtime differs from PyTorch: {why}")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, out_path)
    return dict(fig, bound=dict(rel_diff=spec.bound.rel_diff, cos_min=spec.bound.cos_min))


def export_graph(spec: OnnxSpec, path: str) -> None:
    """``torch.onnx.export`` of ``spec`` to ``path``, then ``onnx.checker`` (full); no comparison."""
    import onnx

    spec.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, spec.dummy(0), path, input_names=list(spec.inputs),
                          output_names=list(spec.outputs), dynamic_axes=spec.dynamic_axes,
                          opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(path), full_check=True)


def validate_onnx(spec: OnnxSpec, path: str, seeds=(1, 2, 3), inputs=None) -> dict:
    """ONNX Runtime (CPU) against PyTorch on a few fresh inputs (``spec.dummy`` of ``seeds``, or ``inputs``: a
    list of input tuples), every output: :class:`AgreementMeter`'s figures."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    if [o.name for o in sess.get_outputs()] != list(spec.outputs):
        raise ExportCheckFailed(f"{spec.name}: the graph's outputs {[o.name for o in sess.get_outputs()]} are not "
                                f"{list(spec.outputs)}")
    meter = AgreementMeter()
    for ins in inputs if inputs is not None else [spec.dummy(s) for s in seeds]:
        with torch.no_grad():
            ref = spec.module(*ins)
        got = sess.run(None, {n: t.numpy() for n, t in zip(spec.inputs, ins)})
        ref = ref if isinstance(ref, tuple) else (ref,)
        meter.add({n: r.numpy() for n, r in zip(spec.outputs, ref)}, dict(zip(spec.outputs, got)), spec.units)
    return meter.figures()


def io_signature(path: str) -> dict:
    """An ONNX graph's inputs and outputs: ``{"inputs": {name: {"dtype", "shape"}}, "outputs": ...}``, each dim an
    int or the name of a dynamic axis (what TensorRT's shape profiles are built from)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph

    def describe(values):
        return {v.name: dict(dtype=onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                             shape=[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values}

    weights = {i.name for i in graph.initializer}
    return dict(inputs=describe(v for v in graph.input if v.name not in weights), outputs=describe(graph.output))


def export_onnx_checked(vlm: SamfVLM, out_dir: str) -> dict:
    """Export vit/aggregator/fusion into ``out_dir``, each checked; returns ``{name: figures}`` (:func:`export_one`)."""
    os.makedirs(out_dir, exist_ok=True)
    return {spec.name: export_one(spec, os.path.join(out_dir, f"{spec.name}.onnx")) for spec in module_specs(vlm)}


def export_onnx(vlm: SamfVLM, out_dir: str) -> dict:
    """:func:`export_onnx_checked`, returning ``{name: max abs diff}`` only (what ``samf-export onnx`` prints)."""
    return {k: f["max_abs_diff"] for k, f in export_onnx_checked(vlm, out_dir).items()}
