"""ViT-B/16 at 224² (the paper preset's slice encoder) in every precision ONNX Runtime and OpenVINO offer on this
CPU: speed and parity with fp32, side by side in one run.

    python benchmarks/encoder_precision.py --work /tmp/encoder-precision \
        --out benchmarks/results/encoder-precision-2cpu.json

The ViT is the paper's shape with seeded random weights initialised as DINO initialises them (no published
weights are downloaded), its slice-embedding standardisation measured on phantom slices as training does,
exported as ``samf-export bundle`` exports ``vit.onnx`` (standardisation folded in). Slices are the paper
preset's (3 planes x 8 at 1.5 mm, 224²) from synthetic phantoms: 12 scans calibrate, 6 other scans are held out.

Variants, each compared with ONNX Runtime fp32 on the held-out slices (cosine and max abs difference of the
standardised slice embeddings, what the aggregator and fusion receive):

- torch eager fp32 (the training code);
- ONNX Runtime fp32 (the reference), and after ONNX Runtime's transformer optimizer (fused attention, LayerNorm,
  GELU);
- OpenVINO fp32 and bf16 (``INFERENCE_PRECISION_HINT``; bf16 is what ``--encoders bf16`` runs);
- int8 dynamic (weights per channel, activations per tensor at run time): ``quantize_dynamic``;
- int8 static QDQ (per-channel weights, activations calibrated with MinMax on the calibration slices):
  ``quantize_static``;
- int8 block-wise (``MatMulNBits``, 8 bits, blocks of 32 and 128, int8 compute: activations quantized per block
  of each row);
- int8 weights only, dequantized back to fp32 (a diagnostic: how much of the error rounding the weights alone
  causes; not faster);
- fp16 with LayerNorm, Softmax and the standardisation in fp32 (the GPU graph; parity only: ONNX Runtime's CPU
  runs it no faster).

Timing: one scan's 24 slices per call, 2 intra-op threads, median of ``--repeats`` calls after one warm-up.

With ``--bundle B --data D`` it measures instead what a variant does to the reports of a trained bundle: each of
vit, aggregator and fusion is replaced by its variant (fp16, int8 dynamic, int8 weights only) in a copy of the
bundle, and the greedy reports (F32 GGUF) on D's test scans are compared with the fp32 encoders' reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

import numpy as np


def _slices(seeds, pre):
    from samf.runtime.scan.ct import Volume
    from samf.runtime.scan.preprocess import preprocess
    from samf.runtime.tools.phantom import make_phantom

    return np.concatenate([preprocess(Volume(p.volume, p.spacing, "phantom"), pre)
                           for p in (make_phantom(s) for s in seeds)])


def build(work: str, threads: int) -> dict:
    """vit.onnx (fp32) and the slices; the torch eager time for one scan."""
    import torch

    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.train.models import AggregatorConfig, ImageEncoder, ViTConfig

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    pre = PreprocessConfig(image_size=224, pixel_spacing_mm=1.5, slices_per_plane=8)
    calib, held = _slices(range(1000, 1012), pre), _slices(range(2000, 2006), pre)
    np.save(os.path.join(work, "calib.npy"), calib)
    np.save(os.path.join(work, "held.npy"), held)
    enc = ImageEncoder(ViTConfig(), AggregatorConfig(n_slices=pre.n_slices)).eval()
    enc.calibrate(torch.from_numpy(calib[i: i + pre.n_slices]) for i in range(0, len(calib), pre.n_slices))

    class Vit(torch.nn.Module):
        def __init__(self, e):
            super().__init__()
            self.e = e

        def forward(self, slices):
            return self.e.embed_slices(slices)

    vit = Vit(enc).eval()
    scan = torch.from_numpy(held[: pre.n_slices])
    with torch.no_grad():
        torch.onnx.export(vit, (scan,), os.path.join(work, "vit.onnx"), input_names=["slices"],
                          output_names=["z2d"], dynamic_axes={"slices": {0: "k"}, "z2d": {0: "k"}},
                          opset_version=17, dynamo=False)
        vit(scan)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            vit(scan)
            times.append(time.perf_counter() - t)
    return dict(torch_eager_ms=1000 * float(np.median(times)), slices_per_scan=pre.n_slices,
                calibration_slices=len(calib), held_out_slices=len(held))


class Measure:
    def __init__(self, work: str, threads: int, repeats: int):
        self.work, self.threads, self.repeats = work, threads, repeats
        self.held = np.load(os.path.join(work, "held.npy"))
        self.scan = self.held[:24]

    def session(self, path):
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads = self.threads
        return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])

    def runner(self, path, openvino: str | None = None):
        """slices -> embeddings: ONNX Runtime's CPU session, or OpenVINO in ``openvino`` precision (bf16, fp32)."""
        if openvino:
            from samf.engines.openvino_engine import OvModule

            m = OvModule(path, precision=openvino, threads=self.threads)
            return lambda x: m(slices=x)
        s = self.session(path)
        return lambda x: s.run(None, {"slices": x})[0]

    def outputs(self, path, openvino: str | None = None) -> np.ndarray:
        run = self.runner(path, openvino)
        return np.concatenate([run(self.held[i: i + 24]) for i in range(0, len(self.held), 24)])

    def ms(self, path, openvino: str | None = None) -> float:
        run = self.runner(path, openvino)
        run(self.scan)
        times = []
        for _ in range(self.repeats):
            t = time.perf_counter()
            run(self.scan)
            times.append(time.perf_counter() - t)
        return 1000 * float(np.median(times))


def parity(ref: np.ndarray, got: np.ndarray) -> dict:
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return dict(cos_mean=float(cos.mean()), cos_min=float(cos.min()), max_abs=float(np.abs(ref - got).max()))


def linear_nodes(path: str) -> dict:
    """The MatMul/Conv nodes by role: patch, qkv, proj, fc1, fc2, scores (q·k), attnv (attention·v)."""
    import onnx

    out = {}
    for n in onnx.load(path).graph.node:
        if n.op_type in ("MatMul", "Conv", "Gemm"):
            role = next((r for r in ("patch_embed", "qkv", "proj", "fc1", "fc2") if f"/{r}/" in n.name),
                        "attnv" if re.search(r"attn/MatMul_1$", n.name) else "scores")
            out.setdefault(role, []).append(n.name)
    return out


def int8_dynamic(src: str, dst: str, nodes=None) -> None:
    """Weights int8 per output channel, activations uint8 per tensor, scaled at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes,
                     op_types_to_quantize=["MatMul", "Gemm", "Conv"])


def int8_weights_only(src: str, dst: str) -> None:
    """Every 2-D MatMul weight rounded to int8 per output channel and stored back as fp32 (a diagnostic)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(src)
    names = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    for init in m.graph.initializer:
        if init.name in names and len(init.dims) == 2:
            w = numpy_helper.to_array(init)
            s = np.abs(w).max(0, keepdims=True) / 127
            init.CopyFrom(numpy_helper.from_array((np.round(w / np.maximum(s, 1e-12)) * s).astype(np.float32),
                                                  init.name))
    onnx.save(m, dst)


def fp16(src: str, dst: str) -> None:
    """fp16 graph with fp32 inputs and outputs; LayerNorm, Softmax and the standardisation (Sub, Div) in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(src), keep_io_types=True,
                                       op_block_list=["LayerNormalization", "Softmax", "Sub", "Div"]), dst)


def report_agreement(bundle: str, data: str, work: str) -> list:
    """Per variant: the share of D's test scans whose greedy report (F32 GGUF) equals the fp32 encoders'."""
    import csv
    import hashlib
    import shutil

    os.environ["SAMF_VERIFY_CACHE"] = "off"
    from samf.runtime.bundle.manifest import seal
    from samf.runtime.inference.pipeline import ReportPipeline

    with open(os.path.join(data, "test.csv")) as f:
        scans = [os.path.join(data, r["image"]) for r in csv.DictReader(f)]

    def reports(b):
        with ReportPipeline(b, quant="F32") as pipe:
            t = time.perf_counter()
            texts = [pipe.report(s).text for s in scans]
            return texts, 1000 * (time.perf_counter() - t) / len(scans)

    ref, ref_ms = reports(bundle)
    rows = [dict(variant="fp32", scans=len(scans), same_report=len(scans), ms_per_scan=ref_ms)]
    for name, make in (("fp16", fp16), ("int8-dynamic", int8_dynamic), ("int8-weights-only", int8_weights_only)):
        copy = os.path.join(work, f"bundle-{name}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(bundle, copy)
        with open(os.path.join(copy, "manifest.json")) as f:
            m = json.load(f)
        for module in ("vit", "aggregator", "fusion"):
            path = os.path.join(copy, f"{module}.onnx")
            make(os.path.join(bundle, f"{module}.onnx"), path + ".new")
            os.replace(path + ".new", path)
            with open(path, "rb") as f:
                b = f.read()
            m["files"][f"{module}.onnx"] = dict(sha256=hashlib.sha256(b).hexdigest(), size=len(b))
        with open(os.path.join(copy, "manifest.json"), "w") as f:
            json.dump(seal(m), f, indent=2)
        got, ms = reports(copy)
        rows.append(dict(variant=name, scans=len(scans), same_report=sum(a == b for a, b in zip(ref, got)),
                         ms_per_scan=ms))
        print(json.dumps(rows[-1]), flush=True)
    # bf16: the bundle's own fp32 files on OpenVINO, as --encoders bf16 runs them
    from samf.engines.openvino_engine import OvModule

    with ReportPipeline(bundle, quant="F32", encoders="fp32") as pipe:
        pipe.set_encoders({mod: OvModule(os.path.join(bundle, f"{mod}.onnx"), precision="bf16")
                           for mod in ("vit", "aggregator", "fusion")}, "bf16")
        t = time.perf_counter()
        got = [pipe.report(s).text for s in scans]
        ms = 1000 * (time.perf_counter() - t) / len(scans)
    rows.append(dict(variant="bf16-openvino", scans=len(scans), same_report=sum(a == b for a, b in zip(ref, got)),
                     ms_per_scan=ms))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def variants(work: str, base: str, calib: np.ndarray, fp32_only: bool = False) -> dict:
    """name -> (path, how long making it took); ``fp32_only``: ONNX Runtime's optimized fp32 graph alone."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    nodes = linear_nodes(base)
    weighted = [n for role in ("patch_embed", "qkv", "proj", "fc1", "fc2") for n in nodes.get(role, [])]
    made = {}

    def timed(name, make):
        path = os.path.join(work, f"vit-{name}.onnx")
        t = time.perf_counter()
        make(path)
        made[name] = (path, time.perf_counter() - t)

    def transformer_optimizer(p):  # ONNX Runtime's fusions: attention, LayerNorm, GELU, bias adds
        from onnxruntime.transformers.optimizer import optimize_model

        optimize_model(base, model_type="vit", num_heads=12, hidden_size=768, opt_level=2).save_model_to_file(p)

    timed("fp32-transformer-optimizer", transformer_optimizer)
    if fp32_only:
        return made
    timed("int8-dynamic", lambda p: int8_dynamic(base, p, weighted))
    # The most sensitive blocks (quantized one at a time, blocks 0-4 cost most) kept in fp32.
    late = [n for n in weighted if not re.search(r"blocks\.[0-4]/", n) and "patch_embed" not in n]
    timed("int8-dynamic-blocks-5-11", lambda p: int8_dynamic(base, p, late))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"slices": calib[i: i + 24]} for i in range(0, len(calib), 24)])

        def get_next(self):
            return next(self.batches, None)

    timed("int8-static-qdq", lambda p: quantize_static(
        base, p, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, nodes_to_quantize=weighted, calibrate_method=CalibrationMethod.MinMax))
    for block in (32, 128):
        def nbits(p, block=block):
            q = MatMulNBitsQuantizer(onnx.load(base), bits=8, block_size=block, is_symmetric=True, accuracy_level=4)
            q.process()
            q.model.save_model_to_file(p, False)
        timed(f"int8-blockwise-{block}", nbits)
    timed("int8-weights-only", lambda p: int8_weights_only(base, p))
    timed("fp16", lambda p: fp16(base, p))
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bundle", help="a trained bundle: measure report agreement instead (with --data)")
    ap.add_argument("--data", help="its dataset folder (test.csv)")
    ap.add_argument("--only-fp32-engines", action="store_true",
                    help="only ONNX Runtime fp32 (plain and optimized) and OpenVINO fp32/bf16: no int8/fp16 graphs")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.bundle:
        rows = report_agreement(args.bundle, args.data, args.work)
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]),
                           date=time.strftime("%Y-%m-%d"), machine=dict(cpu=_cpu(), cores=os.cpu_count()),
                           bundle=args.bundle, rows=rows), f, indent=2)
        return

    from onnxruntime.quantization.shape_inference import quant_pre_process

    info = build(args.work, args.threads)
    base = os.path.join(args.work, "vit-fp32.onnx")
    quant_pre_process(os.path.join(args.work, "vit.onnx"), base)
    m = Measure(args.work, args.threads, args.repeats)
    ref, fp32_ms = m.outputs(base), m.ms(base)
    rows = [dict(variant="torch eager fp32", ms=info["torch_eager_ms"], speedup=fp32_ms / info["torch_eager_ms"])]
    rows.append(dict(variant="ORT fp32", ms=fp32_ms, speedup=1.0, **parity(ref, ref)))
    for precision in ("fp32", "bf16"):  # the same file, compiled by OpenVINO (engines/openvino_engine.py)
        ms = m.ms(base, openvino=precision)
        rows.append(dict(variant=f"OpenVINO {precision}", ms=ms, speedup=fp32_ms / ms,
                         **parity(ref, m.outputs(base, openvino=precision))))
        print(json.dumps(rows[-1]), flush=True)
    made = variants(args.work, base, np.load(os.path.join(args.work, "calib.npy")), args.only_fp32_engines)
    for name, (path, made_s) in made.items():
        ms = m.ms(path)
        rows.append(dict(variant=f"ORT {name}", ms=ms, speedup=fp32_ms / ms, made_s=made_s,
                         **parity(ref, m.outputs(path))))
        print(json.dumps(rows[-1]), flush=True)
    import onnxruntime

    result = dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]), date=time.strftime("%Y-%m-%d"),
                  machine=dict(cpu=_cpu(), cores=os.cpu_count(), python=platform.python_version(),
                               onnxruntime=onnxruntime.__version__, threads=args.threads),
                  **info, rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| variant | ms per scan | vs ORT fp32 | cosine mean | cosine min | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r['ms']:.0f}", f"{r['speedup']:.2f}x"] + [f"{r[k]:.4f}" if k in r else "-"
                                                              for k in ("cos_mean", "cos_min", "max_abs")]
        print(f"| {r['variant']} | " + " | ".join(cells) + " |")


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
