"""Precision variants of the encoder graphs, made from the fp32 ones and kept only if they hold their tolerance.

- **fp16** (GPUs: ONNX Runtime CUDA, TensorRT strongly typed, which takes its precision from the graph): ONNX
  Runtime's converter, with fp32 inputs and outputs. LayerNorm, Softmax, the slice-embedding standardisation
  (Sub, Div) and the fusion's scaled dot products stay fp32, as TensorRT advises for ViTs: they overflow, or
  lose the small differences the findings live in, in fp16.
- **int8** (CPUs; the ViT only: the aggregator and the fusion are under 1% of the encoders' time and stay fp32):
  ONNX Runtime's dynamic quantization, weights int8 per output channel, activations per tensor scaled at run
  time. Chosen over static QDQ (activation ranges calibrated on training slices), which measured worse on the
  paper ViT (slice cosine 0.958 against 0.972, ``benchmarks/encoder-precision.md``) and whose fixed ranges
  would not follow a hospital's scans where they differ from the training data. The blocks that carry the error
  are found by measuring: each is quantized alone and its error on held-out slices measured; the most sensitive
  are kept fp32, as few as the tolerance allows, at most half of them (beyond that it is hardly faster).
- **bf16** (CPUs with AVX512-BF16; elsewhere OpenVINO runs it in fp32): no file of its own. ONNX Runtime's CPU
  provider has no bf16 MatMul (``NOT_IMPLEMENTED``), so the fp32 files are compiled by OpenVINO with the bf16
  precision hint (:mod:`samf.engines.openvino_engine`), and checked here with that engine; the manifest entry names
  the backend. Made when asked (``samf-export bundle --precision bf16``) where OpenVINO is installed
  (``samf[openvino]``); elsewhere one line says so.

ONNX Runtime's own tools (``quantize_dynamic``, the float16 converter) rather than Optimum's ``ORTQuantizer``:
Optimum wraps the same calls for Hugging Face models and calibrates from a ``datasets.Dataset``; for our own
three graphs it would bring transformers and datasets into the export and offer no scheme beyond these.

Each variant is checked against fp32 with the runtime's own pipeline on held-out scans: the cosines of the slice
embeddings and of the fused rows (what the LLM reads), and the share of greedy reports equal to the fp32 encoders';
all scale-free, so one bound holds at every width. The max abs differences are recorded beside each one's share of
its largest value (``*_rel_diff``). Its figures go into the manifest; one that misses its :class:`Tolerance` is not
written, and its figures are recorded under ``fidelity.encoders_rejected``.

:class:`Agreement` and :class:`AgreementMeter` are the same comparison for two computations that should agree to
float noise: the ONNX export's check against PyTorch (:mod:`samf.export.onnx_export`) and the TensorRT plans'
(:mod:`samf.export.tensorrt_build`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from samf.engines.openvino_engine import openvino_version
from samf.runtime.bundle.manifest import ENCODER_MODULES

from .configs import TOLERANCES, Tolerance, VariantCheck  # noqa: F401 (the knobs: export/configs.py)

#: Seeds of the held-out phantoms the export checks with: far above any seed a samf dataset is generated from
#: (``generate_phantom_dataset`` uses ``seed * 1_000_003 + i``).
CHECK_SEED = 10**12


#: The backend each variant's files run on at the workstation (absent: ONNX Runtime, or TensorRT from its files).
BACKENDS = {"bf16": "openvino"}


def variant_files(precision: str) -> dict:
    """The file each module of a precision is written to (int8 quantizes the ViT only)."""
    if precision == "fp32":
        return {m: f"{m}.onnx" for m in ENCODER_MODULES}
    if precision == "int8":
        return {"vit": "vit-int8.onnx", "aggregator": "aggregator.onnx", "fusion": "fusion.onnx"}
    if precision == "bf16":  # the fp32 files, compiled by OpenVINO in bf16
        return variant_files("fp32")
    return {m: f"{m}-{precision}.onnx" for m in ENCODER_MODULES}


# ---------------------------------------------------------------------------------------------- making

def to_fp16(src: str, dst: str, module: str) -> None:
    """An fp16 graph with fp32 inputs and outputs; LayerNorm, Softmax, Sub/Div (the standardisation) fp32, and
    in the fusion also every product of two activations and every Mul (the scaled dot products)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(src)
    keep = []
    if module == "fusion":
        weights = {i.name for i in model.graph.initializer}
        keep = [n.name for n in model.graph.node
                if n.op_type == "Mul" or (n.op_type == "MatMul" and not weights & set(n.input))]
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep,
                                    op_block_list=["LayerNormalization", "Softmax", "Sub", "Div"])
    onnx.save(_without_output_round_trips(half), dst)


def _without_output_round_trips(model):
    """The converter casts an output computed in fp32 (the fusion's attention: a kept Softmax, a kept Div) to fp16
    and back to fp32 for ``keep_io_types``; read it from the fp32 tensor instead, so α and γ keep their fp32
    values (fp16's step near 1/24 is 3e-5, about the gaps between slices' weights)."""
    import onnx

    producer = {out: node for node in model.graph.node for out in node.output}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    for output in model.graph.output:
        back = producer.get(output.name)
        down = producer.get(back.input[0]) if back is not None else None
        if (back is not None and down is not None and cast_to(back) == onnx.TensorProto.FLOAT
                and cast_to(down) == onnx.TensorProto.FLOAT16):
            back.input[0] = down.input[0]  # fp32 -> fp32: the cast keeps the value
            if not any(down.output[0] in node.input for node in model.graph.node):
                model.graph.node.remove(down)
    return model


def vit_units(path: str) -> dict:
    """The ViT's weighted nodes (MatMul/Conv/Gemm with a weight) by unit: ``patch_embed``, ``blocks.0``, ..."""
    import onnx

    model = onnx.load(path)
    weights = {i.name for i in model.graph.initializer}
    units: dict = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Conv", "Gemm") and weights & set(n.input[1:]):
            m = re.search(r"(patch_embed|blocks\.\d+)/", n.name)
            if m:
                units.setdefault(m.group(1), []).append(n.name)
    return units


def to_int8(src: str, dst: str, nodes: list) -> None:
    """``nodes`` quantized dynamically: int8 weights per output channel, activations per tensor at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes,
                     op_types_to_quantize=["MatMul", "Gemm", "Conv"])


# ---------------------------------------------------------------------------------------------- checking

def cosine_rows(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine of each row (last axis) of ``got`` with the same row of ``ref`` (1 where both rows are zero)."""
    ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    both_zero = ~np.any(ref, axis=1) & ~np.any(got, axis=1)
    return np.where(both_zero, 1.0, (ref * got).sum(1) / np.maximum(norms, 1e-30))


@dataclass(frozen=True)
class Agreement:
    """How close a computation's outputs must be to a reference computation's, in each output's own units.

    Float rounding grows with the values: one absolute bound is float noise at one width and a real error at
    another (1e-4 held the tiny ViT's rows and refused a correctly exported ViT-B/16, whose standardised
    embeddings reach about a hundred), so each output's worst difference is held to a share of that output's
    largest value, and each row's direction to its cosine with the reference row."""

    rel_diff: float  # max |got - ref| <= rel_diff * max |ref|, each output, each input
    cos_min: float   # every row's (last axis) cosine with the reference's row

    def misses(self, fig: dict) -> str | None:
        """Why ``fig`` (an :class:`AgreementMeter`'s figures) misses this bound, in a few words; None when it
        holds. The first output that misses is named."""
        for name, f in fig["outputs"].items():
            if not f["rel_diff"] <= self.rel_diff:
                return (f"{name}: max |diff| {f['max_abs_diff']:.2e} is {f['rel_diff']:.1e} of its largest value "
                        f"{f['max_abs']:.3g} (bound {self.rel_diff:.0e})")
            if not f["cos_min"] >= self.cos_min:
                return f"{name}: worst row cosine 1 - {1 - f['cos_min']:.1e} < 1 - {1 - self.cos_min:.0e}"
        return None


#: max |ref| below this counts as this (an output of zeros is held to rel_diff * FLOOR, not to exactly zero).
FLOOR = 1e-6


class AgreementMeter:
    """Accumulates, over several inputs, how far each output of a computation is from a reference's: per output
    the worst ``max_abs_diff``, ``max_abs`` (the reference's largest value), ``rel_diff`` (the first over the
    second, per input; see :meth:`add` for an output that ends in a standardisation), ``rel_rms`` (RMS of the
    difference over RMS of the reference) and ``cos_min`` (the worst row's cosine); all in float64.
    ``figures()`` adds the worst over every output."""

    def __init__(self):
        self.outputs: dict = {}
        self.inputs = 0

    def add(self, ref: dict, got: dict, units: dict | None = None) -> None:
        """One input's outputs, ``{name: array}`` each (the same names and shapes).

        ``units``: ``{name: (scale, offset)}`` for an output that ends in a standardisation ``(x - offset) /
        scale``: its relative figures are taken on ``x`` (the difference times ``scale``, against the largest
        ``|x|``), where the arithmetic and its rounding happened. Dividing by a small standard deviation makes a
        feature's rounding as large as its values, and when the values sit near the mean (real slices, near
        the calibration mean) the standardised difference over the standardised size measures the calibration,
        not the export. ``max_abs_diff`` and ``max_abs`` stay in the output's own units."""
        self.inputs += 1
        for name, r in ref.items():
            r, g = np.asarray(r, np.float64), np.asarray(got[name], np.float64)
            if r.shape != g.shape:
                raise ValueError(f"{name}: shape {list(g.shape)} against the reference's {list(r.shape)}")
            d = np.abs(g - r)
            f = dict(max_abs_diff=float(d.max(initial=0.0)), max_abs=float(np.abs(r).max(initial=0.0)))
            if units and name in units:
                scale, offset = (np.asarray(u, np.float64) for u in units[name])
                d, x = d * np.abs(scale), r * scale + offset
            else:
                x = r
            size = max(float(np.abs(x).max(initial=0.0)), FLOOR)
            f["rel_diff"] = float(d.max(initial=0.0)) / size
            f["rel_rms"] = float(np.sqrt((d ** 2).mean() / max((x ** 2).mean(), FLOOR ** 2))) if r.size else 0.0
            f["cos_min"] = float(cosine_rows(r, g).min(initial=1.0)) if r.size else 1.0
            w = self.outputs.setdefault(name, f)
            if w is not f:
                for k in ("max_abs_diff", "max_abs", "rel_diff", "rel_rms"):
                    w[k] = max(w[k], f[k])
                w["cos_min"] = min(w["cos_min"], f["cos_min"])

    def figures(self) -> dict:
        """``{max_abs_diff, rel_diff, rel_rms, cos_min, inputs, outputs: {name: {...}}}``, rounded for the
        manifest (to 3 significant figures; cosines as measured)."""
        outs = {n: {k: (v if k == "cos_min" else float(f"{v:.3g}")) for k, v in f.items()}
                for n, f in self.outputs.items()}
        worst = dict(max_abs_diff=max((f["max_abs_diff"] for f in outs.values()), default=0.0),
                     rel_diff=max((f["rel_diff"] for f in outs.values()), default=0.0),
                     rel_rms=max((f["rel_rms"] for f in outs.values()), default=0.0),
                     cos_min=min((f["cos_min"] for f in outs.values()), default=1.0))
        return dict(worst, inputs=self.inputs, outputs=outs)


class VariantChecker:
    """The fp32 encoders' outputs on the held-out scans, and each variant's figures against them.

    Runs the runtime's :class:`~samf.runtime.inference.pipeline.ReportPipeline` on the bundle being written (the
    unquantized GGUF), swapping only the encoders, so a variant is judged by the very stages that will run it."""

    def __init__(self, bundle_dir: str, quant: str, check: VariantCheck):
        from samf.runtime.inference.pipeline import ReportPipeline, host
        from samf.runtime.scan.preprocess import preprocess

        self.check, self._host = check, host
        self.pipe = ReportPipeline(bundle_dir, quant=quant, encoders="fp32", verify_hashes=False, repack=False,
                                   max_new_tokens=max(check.report_tokens, 1), parallel=1)  # one report at a time
        self.fp32 = {m: os.path.join(bundle_dir, f) for m, f in variant_files("fp32").items()}
        self.pipe.set_encoders(self._on_cpu(self.fp32), "fp32")  # every precision on the same provider
        self.slices = [preprocess(v, self.pipe.pre) for v in held_out_volumes(check)]
        self.prompt_ids = self.pipe.llm.tokenize(self.pipe.layout.prompt_text(_report_request()))
        self.reference = self._outputs()

    def _outputs(self) -> list:
        """Per scan: (slice embeddings, fused embeddings, greedy report ids or None) with the current encoders."""
        out = []
        for x in self.slices:
            z2d, z3d = self.pipe.encode(x, {})
            fused = self.pipe.image_prefix(z2d, z3d, self.prompt_ids, {})
            ids = (self.pipe.generate(fused, self.prompt_ids, self.check.report_tokens)["ids"]
                   if self.check.report_tokens else None)
            out.append((self._host(z2d)[0], fused, ids))
        return out

    def slice_cosines(self, vit_path: str, scans: int | None = None) -> np.ndarray:
        """Cosines of the slice embeddings of ``vit_path`` (a ViT graph) with fp32's, on the first ``scans``."""
        vit = self._on_cpu(dict(vit=vit_path))["vit"]
        try:
            return np.concatenate([cosine_rows(ref, vit(slices=x)) for x, (ref, _, _) in
                                   zip(self.slices[:scans], self.reference[:scans])])
        finally:
            vit.close()

    def _on_cpu(self, paths: dict, precision: str = "fp32") -> dict:
        """The modules at ``paths`` on the CPU backend a precision runs on (ONNX Runtime; OpenVINO for bf16)."""
        from samf.engines import load_encoder_module

        backend = BACKENDS.get(precision, "onnxruntime")
        kw = dict(precision=precision) if backend == "openvino" else dict(prefer_gpu=False)
        return {m: load_encoder_module(backend, p, threads=self.pipe.config.n_threads or 0, **kw)
                for m, p in paths.items()}

    def figures(self, paths: dict, precision: str) -> dict:
        """Run the pipeline with the variant's encoders (``{module: path}``) and measure it against fp32."""
        self.pipe.set_encoders(self._on_cpu(paths, precision), precision)
        try:
            got = self._outputs()
        finally:
            self.pipe.set_encoders(self._on_cpu(self.fp32), "fp32")
        cos = np.concatenate([cosine_rows(r[0], g[0]) for r, g in zip(self.reference, got)])
        slices, fused = AgreementMeter(), AgreementMeter()
        for r, g in zip(self.reference, got):
            slices.add(dict(z2d=r[0]), dict(z2d=g[0]))
            fused.add(dict(fused=r[1]), dict(fused=g[1]))
        s, f = slices.figures()["outputs"]["z2d"], fused.figures()["outputs"]["fused"]
        # The absolute figures are kept for reading; the relative ones (each scan's worst difference over its
        # largest value) and the cosines are what compares across model sizes.
        fig = dict(scans=len(got), slice_cos_mean=round(float(cos.mean()), 6), slice_cos_min=round(float(cos.min()), 6),
                   slice_max_abs_diff=round(s["max_abs_diff"], 6), slice_rel_diff=s["rel_diff"],
                   fused_max_abs_diff=round(f["max_abs_diff"], 6), fused_max_abs=round(f["max_abs"], 6),
                   fused_rel_diff=f["rel_diff"], fused_cos_min=round(f["cos_min"], 6))
        if self.check.report_tokens:
            fig["same_reports"] = sum(r[2] == g[2] for r, g in zip(self.reference, got))
            fig["report_tokens"] = self.check.report_tokens
        return fig

    def close(self) -> None:
        self.pipe.close()


def _report_request() -> str:
    from samf.runtime.inference.prompt import REPORT_REQUESTS

    return REPORT_REQUESTS[0]


def held_out_volumes(check: VariantCheck) -> list:
    """The scans a variant is checked on: ``check.data``'s test.csv, or phantoms no samf dataset contains."""
    if check.data:
        import csv

        from samf.runtime.scan.ct import load_scan

        with open(os.path.join(check.data, "test.csv")) as f:
            rows = list(csv.DictReader(f))[: check.scans]
        return [load_scan(os.path.join(check.data, r["image"])) for r in rows]
    from samf.runtime.scan.ct import Volume
    from samf.runtime.tools.phantom import make_phantom

    return [Volume(p.volume, p.spacing, "phantom") for p in (make_phantom(CHECK_SEED + i) for i in range(check.scans))]


def misses(fig: dict, tol: Tolerance) -> str | None:
    """Why ``fig`` misses ``tol``, in a few words; None when it holds."""
    if fig["slice_cos_mean"] < tol.slice_cos_mean:
        return f"slice-embedding cosine {fig['slice_cos_mean']:.4f} < {tol.slice_cos_mean}"
    if fig["slice_cos_min"] < tol.slice_cos_min:
        return f"worst slice's cosine {fig['slice_cos_min']:.4f} < {tol.slice_cos_min}"
    if fig.get("fused_cos_min", 1.0) < tol.fused_cos_min:
        return f"worst fused row's cosine {fig['fused_cos_min']:.4f} < {tol.fused_cos_min}"
    if "same_reports" in fig and fig["same_reports"] < tol.report_agreement * fig["scans"]:
        return (f"the fp32 encoders' report on {fig['same_reports']}/{fig['scans']} scans "
                f"< {tol.report_agreement:.0%}")
    return None


def _int8_candidates(checker: VariantChecker, src: str, tmp_dir: str, tol: Tolerance, log):
    """Int8 ViT graphs to try, fewest fp32 units first: yields (path, units kept fp32).

    First every unit (the patch embedding, each block) quantized. If that misses, each unit is quantized alone
    and its error measured on the first two held-out scans; the errors add up (measured on the paper ViT), so
    the next candidate keeps the most sensitive units fp32 until the predicted error fits the cosine
    tolerance, and each one after keeps one unit more, up to half of them. A candidate whose slice cosine
    already misses is skipped, unless it is the last."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    base = os.path.join(tmp_dir, "vit-prepared.onnx")
    quant_pre_process(src, base, skip_symbolic_shape=True)
    units = vit_units(base)
    path = os.path.join(tmp_dir, "vit-int8.onnx")

    def holds(cos):
        return cos.mean() >= tol.slice_cos_mean and cos.min() >= tol.slice_cos_min

    to_int8(base, path, [n for nodes in units.values() for n in nodes])
    if holds(checker.slice_cosines(path)):
        yield path, []
    error = {}
    for unit, nodes in units.items():
        one = os.path.join(tmp_dir, "vit-one-unit.onnx")
        to_int8(base, one, nodes)
        error[unit] = float(1 - checker.slice_cosines(one, scans=2).mean())
    order = sorted(units, key=lambda u: -error[u])
    log("export: int8 error per unit (1 - cosine, quantized alone): "
        + ", ".join(f"{u} {error[u]:.1e}" for u in order[:4]) + (" ..." if len(order) > 4 else ""))
    most = len(order) // 2
    first = next((k for k in range(1, most + 1) if sum(error[u] for u in order[k:]) <= 1 - tol.slice_cos_mean),
                 most)
    for k in range(first, most + 1):
        to_int8(base, path, [n for u in order[k:] for n in units[u]])
        if k == most or holds(checker.slice_cosines(path)):
            yield path, sorted(order[:k], key=_unit_order)


def _unit_order(unit: str) -> int:
    return -1 if unit == "patch_embed" else int(unit.split(".")[1])


def _candidates(precision: str, checker: VariantChecker, work: str, tol: Tolerance, log):
    """The variants of ``precision`` to check, in order of preference: yields (``{module: path}``, what to record
    about how it was made)."""
    fp32 = checker.fp32
    if precision == "fp16":
        paths = {m: os.path.join(work, f) for m, f in variant_files("fp16").items()}
        for module in ENCODER_MODULES:
            to_fp16(fp32[module], paths[module], module)
        yield paths, dict(method="ONNX Runtime float16 converter; LayerNorm, Softmax, the standardisation and the "
                                 "fusion's scaled dot products fp32; fp32 inputs and outputs")
    elif precision == "bf16":
        yield dict(fp32), dict(backend=BACKENDS["bf16"], method="the fp32 files compiled by OpenVINO with "
                                                         "INFERENCE_PRECISION_HINT bf16 (matrix products bf16, "
                                                         "accumulated in fp32)")
    elif precision == "int8":
        for path, kept in _int8_candidates(checker, fp32["vit"], work, tol, log):
            yield dict(fp32, vit=path), dict(
                method="ONNX Runtime quantize_dynamic: ViT weights int8 per output channel, activations per "
                       "tensor at run time; aggregator and fusion fp32", vit_units_fp32=kept)
    else:
        raise ValueError(f"no {precision} encoder variant")


def add_encoder_variants(bundle_dir: str, quant: str, check: VariantCheck, log=print) -> tuple:
    """Make ``check.precisions`` from the fp32 graphs in ``bundle_dir`` (whose manifest lists fp32 only),
    check each, and leave in ``bundle_dir`` those that hold their tolerance.

    Returns ``(kept, rejected)``: ``{precision: manifest entry}`` and ``{precision: figures and reason}``."""
    import shutil
    import tempfile

    kept, rejected = {}, {}
    if not check.precisions:
        return kept, rejected
    checker = VariantChecker(bundle_dir, quant, check)
    work = tempfile.mkdtemp(prefix="variants-", dir=bundle_dir)
    try:
        for precision in check.precisions:
            if BACKENDS.get(precision) == "openvino" and not openvino_version():
                log(f"export: {precision} encoders not made: OpenVINO is not installed here "
                    "(pip install 'samf[openvino]')")
                continue
            tol = check.tolerances.get(precision, TOLERANCES[precision])
            files = variant_files(precision)
            for paths, extra in _candidates(precision, checker, work, tol, log):
                fig = checker.figures(paths, precision)
                why = misses(fig, tol)
                if not why:
                    break
            summary = (f"slice cosine mean {fig['slice_cos_mean']:.4f} min {fig['slice_cos_min']:.4f}, fused rows "
                       f"cosine min {fig['fused_cos_min']:.4f}, max |diff| {fig['fused_rel_diff']:.1e} of the largest"
                       + (f", same report {fig['same_reports']}/{fig['scans']}" if "same_reports" in fig else ""))
            if why:
                log(f"export: {precision} encoders not written: {why} ({summary})")
                rejected[precision] = dict(figures=fig, tolerance=vars(tol), reason=why, **extra)
                continue
            for module, name in files.items():
                if paths[module] != os.path.join(bundle_dir, name):
                    os.replace(paths[module], os.path.join(bundle_dir, name))
            log(f"export: {precision} encoders: {summary}")
            kept[precision] = dict(files=files, figures=fig, tolerance=vars(tol), **extra)
    finally:
        checker.close()
        shutil.rmtree(work, ignore_errors=True)
    return kept, rejected
