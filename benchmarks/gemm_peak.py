"""This CPU's matrix-multiply peak in fp32, bf16 and int8, by every library the encoders could run on, and the
fraction of it the ViT stage reaches (issue 27).

    python benchmarks/gemm_peak.py --out benchmarks/results/gemm-peak-2cpu.json
    python benchmarks/gemm_peak.py --vit-ms ORT_fp32=4728 --vit-ms OpenVINO_bf16=2100   # fractions of peak

Two shapes: a square 2048³ product (the kernels' best case) and the ViT-B/16 MLP's first product over one scan
(24 slices × 197 tokens = 4728 rows, 768 → 3072), the shape that dominates the encoder. Each figure is the median
of 5 timed runs after 2 warm-ups, in GFLOP/s (2·M·N·K per product; int8 counts its multiply-adds the same way).
Libraries: torch (oneDNN; fp32, bf16, and ``torch._int_mm`` int8), ONNX Runtime (MatMul fp32; MatMulInteger
uint8 × int8), OpenVINO (MatMul compiled with the f32 or bf16 precision hint; int8 from a QDQ graph, which its
low-precision transformations run as an int8 product). A library that is not installed is skipped, in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

SHAPES = {"square 2048": (2048, 2048, 2048), "ViT-B/16 MLP fc1, one scan": (24 * 197, 768, 3072)}


def timed(fn, repeat: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def vit_flops(img: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, mlp: float = 4.0) -> float:
    """FLOPs (2 per multiply-add) of one ViT image: patch embedding, per block qkv, attention, projection, MLP."""
    n = (img // patch) ** 2 + 1
    embed = 2 * (n - 1) * (3 * patch * patch) * dim
    block = 2 * n * dim * 3 * dim + 2 * 2 * n * n * dim + 2 * n * dim * dim + 2 * 2 * n * dim * int(mlp * dim)
    return embed + depth * block


def torch_gemms(m, k, n, threads):
    import torch

    torch.set_num_threads(threads)
    out = {}
    a, b = torch.randn(m, k), torch.randn(k, n)
    out["fp32 torch"] = lambda: torch.mm(a, b)
    ab, bb = a.bfloat16(), b.bfloat16()
    out["bf16 torch"] = lambda: torch.mm(ab, bb)
    ai = torch.randint(-128, 127, (m, k), dtype=torch.int8)
    bi = torch.randint(-128, 127, (k, n), dtype=torch.int8)
    out["int8 torch _int_mm"] = lambda: torch._int_mm(ai, bi)
    return out


def _matmul_graph(path: str, k: int, n: int, kind: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        x_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [w]
    elif kind == "int8":  # uint8 activations × int8 weights, int32 out: ONNX Runtime's VNNI kernel
        w = numpy_helper.from_array(rng.integers(-128, 127, (k, n)).astype(np.int8), "w")
        nodes = [helper.make_node("MatMulInteger", ["x", "w"], ["y"])]
        x_type, y_type, inits = TensorProto.UINT8, TensorProto.INT32, [w]
    else:  # "qdq": fp32 in and out, quantize/dequantize around the product (OpenVINO runs it in int8)
        w = rng.standard_normal((k, n)).astype(np.float32)
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.uint8), "zu"),
                 numpy_helper.from_array(np.array(0, np.int8), "zi")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["xd"]),
                 helper.make_node("QuantizeLinear", ["w", "s", "zi"], ["wq"]),
                 helper.make_node("DequantizeLinear", ["wq", "s", "zi"], ["wd"]),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", x_type, ["m", k])],
                              [helper.make_tensor_value_info("y", y_type, ["m", n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def ort_gemms(m, k, n, threads, work):
    import onnxruntime as ort

    out = {}
    for kind, x in (("fp32", np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)),
                    ("int8", np.random.default_rng(1).integers(0, 255, (m, k)).astype(np.uint8))):
        path = os.path.join(work, f"ort-{kind}-{m}-{k}-{n}.onnx")
        _matmul_graph(path, k, n, kind)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        out[f"{kind} ONNX Runtime" + (" MatMulInteger" if kind == "int8" else "")] = (
            lambda s=sess, x=x: s.run(None, {"x": x}))
    return out


def openvino_gemms(m, k, n, threads, work):
    import openvino as ov

    core, out = ov.Core(), {}
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    for label, kind, hint in (("fp32", "fp32", "f32"), ("bf16", "fp32", "bf16"), ("int8", "qdq", "f32")):
        path = os.path.join(work, f"ov-{kind}-{m}-{k}-{n}.onnx")
        _matmul_graph(path, k, n, kind)
        compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                                    "INFERENCE_NUM_THREADS": threads})
        req = compiled.create_infer_request()
        out[f"{label} OpenVINO"] = lambda r=req: r.infer({0: x})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="write the figures here (JSON)")
    ap.add_argument("--vit-ms", action="append", default=[], metavar="LABEL=MS",
                    help="a ViT stage's measured ms per scan (24 slices at 224²): prints its GFLOP/s and the "
                         "fraction of each precision's peak")
    args = ap.parse_args(argv)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "threads": args.threads, "shapes": {}}
    with tempfile.TemporaryDirectory() as work:
        for shape_name, (m, k, n) in SHAPES.items():
            gemms = {}
            for maker in (torch_gemms, ort_gemms, openvino_gemms):
                try:
                    gemms.update(maker(m, k, n, args.threads) if maker is torch_gemms
                                 else maker(m, k, n, args.threads, work))
                except ImportError as e:
                    print(f"skipped {maker.__name__}: {e}")
            flop = 2.0 * m * k * n
            row = {}
            for label, fn in gemms.items():
                row[label] = round(flop / timed(fn) / 1e9, 1)
                print(f"{shape_name:28s} {label:34s} {row[label]:8.1f} GFLOP/s", flush=True)
            results["shapes"][shape_name] = dict(m=m, k=k, n=n, gflops=row)
    peak = {}
    for row in results["shapes"].values():
        for label, g in row["gflops"].items():
            p = label.split()[0]
            peak[p] = max(peak.get(p, 0.0), g)
    results["peak_gflops"] = peak
    scan_flop = 24 * vit_flops()
    results["vit_scan_gflop"] = round(scan_flop / 1e9, 1)
    for item in args.vit_ms:
        label, ms = item.split("=")
        achieved = scan_flop / (float(ms) / 1e3) / 1e9
        results.setdefault("vit", {})[label] = dict(ms=float(ms), gflops=round(achieved, 1),
                                                    **{f"of_{p}_peak": round(achieved / g, 3) for p, g in peak.items()})
        print(f"ViT {label}: {achieved:.1f} GFLOP/s = "
              + ", ".join(f"{achieved / g:.0%} of the {p} peak" for p, g in peak.items()))
    print(json.dumps(results["peak_gflops"]), f"ViT scan: {results['vit_scan_gflop']} GFLOP")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
