"""Encoder precision variants: made at export, checked against fp32, kept only within tolerance, chosen at run time."""

import importlib.util
import json
import os

import numpy as np
import pytest
from cli_runner import invoke_cli, run_cli
from conftest import QUICK
from test_cli_errors import assert_clean_failure, good_scan  # noqa: F401  (a fixture)

from samf.errors import SamfError
from samf.export.encoder_variants import TOLERANCES, Tolerance, VariantCheck

#: Accepts any int8 graph, refuses any fp16 one: a bundle with int8 and without fp16, whatever the weights.
LAX_INT8 = Tolerance(slice_cos_mean=-1.0, slice_cos_min=-1.0, report_agreement=0.0)
IMPOSSIBLE = Tolerance(slice_cos_mean=1.0, slice_cos_min=1.0, report_agreement=1.0)


def manifest_of(bundle):
    with open(os.path.join(bundle, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def int8_bundle(quick, tmp_path_factory):
    """The quick model exported with int8 forced in and fp16 kept out by their tolerances."""
    from samf.export.bundle_writer import write_bundle

    out = str(tmp_path_factory.mktemp("int8") / "bundle")
    lines = []
    write_bundle(quick.merged, out, quants=(), keep_unquantized="F32", log=lines.append,
                 check=VariantCheck(precisions=("fp16", "int8"), scans=3, report_tokens=16,
                                    tolerances=dict(fp16=IMPOSSIBLE, int8=LAX_INT8)))
    return out, lines


def test_every_variant_is_kept_within_its_tolerance_or_left_out(quick):
    """In the default export, each precision is either in the bundle with figures that hold its tolerance, or
    recorded as rejected with figures that miss it and no file left behind."""
    from samf.export.encoder_variants import misses, variant_files

    m = manifest_of(quick.bundle)
    rejected = m["fidelity"].get("encoders_rejected", {})
    assert set(m["encoders"]) | set(rejected) == {"fp32", "fp16", "int8"}  # bf16 only when asked
    assert not set(m["encoders"]) & set(rejected)
    for precision, entry in m["encoders"].items():
        assert entry["files"] == variant_files(precision)
        assert all(f in m["files"] and os.path.isfile(os.path.join(quick.bundle, f)) for f in entry["files"].values())
        if precision != "fp32":
            assert misses(entry["figures"], TOLERANCES[precision]) is None
            assert entry["figures"]["scans"] == QUICK["check_scans"]
            assert entry["figures"]["report_tokens"] == QUICK["check_tokens"]
    for precision, entry in rejected.items():
        assert misses(entry["figures"], TOLERANCES[precision]) == entry["reason"]
        if variant_files(precision) != variant_files("fp32"):  # bf16 runs the fp32 files: nothing of its own
            assert not os.path.exists(os.path.join(quick.bundle, variant_files(precision)["vit"]))
    # fp16 holds its embeddings whatever it does to near-tie reports.
    fp16 = (m["encoders"].get("fp16") or rejected["fp16"])["figures"]
    assert fp16["slice_cos_min"] >= 0.999 and fp16["fused_max_abs_diff"] < 0.05 * fp16["fused_max_abs"]


def test_fp16_graph_keeps_the_overflow_prone_ops_in_fp32(quick, tmp_path):
    """LayerNorm, Softmax, the standardisation and the fusion's products of two activations read fp32."""
    import onnx

    from samf.export.encoder_variants import to_fp16

    for module in ("vit", "fusion"):
        dst = str(tmp_path / f"{module}-fp16.onnx")
        to_fp16(os.path.join(quick.bundle, f"{module}.onnx"), dst, module)
        model = onnx.shape_inference.infer_shapes(onnx.load(dst))
        types = {v.name: v.type.tensor_type.elem_type for v in
                 [*model.graph.value_info, *model.graph.input, *model.graph.output]}
        weights = {i.name: i.data_type for i in model.graph.initializer}
        fp16_weights = [n for n, t in weights.items() if t == onnx.TensorProto.FLOAT16]
        assert fp16_weights, "nothing was converted"
        checked = 0
        for node in model.graph.node:
            two_activations = node.op_type == "MatMul" and not set(node.input) & set(weights)
            kept = node.op_type in ("LayerNormalization", "Softmax", "Sub", "Div")
            if not (kept or (module == "fusion" and two_activations)):
                continue
            dtype = types.get(node.input[0], weights.get(node.input[0]))
            if dtype != onnx.TensorProto.INT64:  # not shape arithmetic
                assert dtype == onnx.TensorProto.FLOAT, node.name
                checked += 1
        assert checked >= (3 if module == "fusion" else 2)
        assert {types[o.name] for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    # The attention is computed in fp32 (Softmax, Div) and leaves the graph in fp32, not through fp16 and back.
    import onnxruntime as ort

    from samf.export.onnx_export import module_specs
    from samf.train.vlm import SamfVLM

    spec = next(s for s in module_specs(SamfVLM.from_checkpoint(quick.merged)) if s.name == "fusion")
    feeds = {n: t.numpy() for n, t in zip(spec.inputs, spec.dummy(5))}
    ref = ort.InferenceSession(os.path.join(quick.bundle, "fusion.onnx")).run(None, feeds)
    got = ort.InferenceSession(str(tmp_path / "fusion-fp16.onnx")).run(None, feeds)
    for name, r, g in zip(spec.outputs[1:], ref[1:], got[1:]):
        on_grid = np.abs(g - g.astype(np.float16).astype(np.float32)).max()
        assert on_grid > 0 and np.abs(g - r).max() < 1e-5, (name, on_grid, np.abs(g - r).max())


def test_int8_forced_in_and_fp16_kept_out(int8_bundle):
    bundle, lines = int8_bundle
    m = manifest_of(bundle)
    assert list(m["encoders"]) == ["fp32", "int8"]
    entry = m["encoders"]["int8"]
    assert entry["files"] == {"vit": "vit-int8.onnx", "aggregator": "aggregator.onnx", "fusion": "fusion.onnx"}
    assert isinstance(entry["vit_units_fp32"], list) and entry["figures"]["scans"] == 3
    assert "fp16" in m["fidelity"]["encoders_rejected"] and not os.path.exists(os.path.join(bundle, "vit-fp16.onnx"))
    import onnx

    ops = {n.op_type for n in onnx.load(os.path.join(bundle, "vit-int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert any(ln.startswith("export: fp16 encoders not written: slice-embedding cosine") for ln in lines)
    assert any(ln.startswith("export: int8 encoders: slice cosine mean") for ln in lines)
    assert not [f for f in os.listdir(bundle) if f.startswith("variants-")]  # the work folder is gone


def test_the_runtime_chooses_and_says_which(int8_bundle, quick, good_scan):  # noqa: F811
    bundle, _ = int8_bundle

    def report(b, *args):  # in-process: neither bundle has bf16, so OpenVINO is not loaded here (BF16_EXPORT)
        proc = invoke_cli("samf", "report", good_scan, "--bundle", b, "--max-tokens", "4", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    assert report(bundle)["encoders"] == "int8"  # auto, on a CPU, with int8 present
    out = report(bundle, "--encoders", "fp32")
    assert out["encoders"] == out["identity"]["encoder_precision"] == "fp32"
    quick_has = manifest_of(quick.bundle)["encoders"]
    from samf.runtime.inference.pipeline import AUTO_PRECISION

    assert report(quick.bundle)["encoders"] == next(p for p in AUTO_PRECISION["cpu"] if p in quick_has)
    assert_clean_failure(invoke_cli("samf", "report", good_scan, "--bundle", bundle, "--encoders", "fp16"),
                         "no fp16 encoders (it has fp32, int8): its export measured slice-embedding cosine")


def test_precisions_side_by_side_in_the_bench(int8_bundle, quick):
    from samf.runtime.tools.bench import format_bench, run_bench

    out = run_bench(int8_bundle[0], quick.data, n_scans=2, quants=["F32"], new_tokens=3, encoders=("fp32", "int8"))
    assert [r["encoders"] for r in out["runs"]] == ["fp32", "int8"]
    table = format_bench(out)
    assert "| F32 | fp32 |" in table and "| F32 | int8 |" in table


def test_io_bound_stages_equal_plain_runs(quick):
    """The pipeline keeps stage outputs on the encoders' device (I/O binding); on CPU that path gives exactly
    what plain session runs give."""
    from samf.engines.onnxruntime_engine import OrtModule
    from samf.runtime.inference.pipeline import ReportPipeline, host

    x = quick.test[0].slices
    with ReportPipeline(quick.bundle, quant="F32", encoders="fp32") as pipe:
        assert pipe._bound is not None
        z2d, z3d = pipe.encode(x, {})
        ids = pipe.llm.tokenize("findings:")
        fused = pipe.image_prefix(z2d, z3d, ids, {})
        text = pipe.embed(ids)[None]
    mods = {m: OrtModule(os.path.join(quick.bundle, f"{m}.onnx")) for m in ("vit", "aggregator", "fusion")}
    z2d_ref = mods["vit"](slices=x)[None]
    z3d_ref = mods["aggregator"](z2d=z2d_ref)
    fused_ref = mods["fusion"](z2d=z2d_ref, z3d=z3d_ref, text=text, text_mask=np.ones((1, len(ids)), np.int64))[0]
    np.testing.assert_array_equal(host(z2d), z2d_ref)
    np.testing.assert_array_equal(host(z3d), z3d_ref)
    np.testing.assert_array_equal(fused, fused_ref)


def test_tensorrt_shape_profiles_from_the_recorded_signature_run_on_onnx_runtime(quick):
    """build-engines' shape profiles come from the manifest's I/O signature; each profile's smallest, optimal
    and largest shapes are inputs the ONNX graphs accept."""
    from samf.engines.onnxruntime_engine import OrtModule
    from samf.export.tensorrt_build import shape_profiles

    m = manifest_of(quick.bundle)
    profiles = shape_profiles(m, max_slices=40, max_prompt_tokens=64)
    assert set(profiles) == {"vit", "aggregator", "fusion"}
    K = m["model"]["image"]["aggregator"]["n_slices"]
    assert profiles["vit"]["slices"][0][0] == 1 and profiles["vit"]["slices"][1][0] == K
    assert profiles["vit"]["slices"][2][0] == 40 and profiles["fusion"]["text"][2][1] == 64
    rng = np.random.default_rng(0)
    for module, inputs in profiles.items():
        session = OrtModule(os.path.join(quick.bundle, f"{module}.onnx"))
        for i in range(3):
            feeds = {}
            for name, shapes in inputs.items():
                dtype = m["io_signature"][module]["inputs"][name]["dtype"]
                feeds[name] = (np.ones(shapes[i], dtype) if dtype == "int64" else
                               rng.normal(0, 0.1, shapes[i]).astype(dtype))
            out = session(**feeds)
            assert np.isfinite(out).all()


def test_tensorrt_plans_from_fp16_graphs_match_onnx_runtime(quick, tmp_path):
    """build-engines on a GPU: strongly typed plans from the fp16 graphs, each checked against ONNX Runtime,
    recorded with their precision, and run by `samf report --backend tensorrt`."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (NVIDIA's wheels need a GPU machine)")
    import shutil

    from samf.export.tensorrt_build import PLAN_MIN_COSINE, build_bundle_engines
    from samf.runtime.inference.pipeline import ReportPipeline

    bundle = str(tmp_path / "bundle")
    shutil.copytree(quick.bundle, bundle)
    if "fp16" not in manifest_of(bundle)["encoders"]:
        pytest.skip("the quick bundle's fp16 variant missed its tolerance")
    entry = build_bundle_engines(bundle, log=lambda m: None)
    assert entry["precision"] == "fp16" and set(entry["plans"]) == {"vit", "aggregator", "fusion"}
    assert all(p["cos_min"] >= PLAN_MIN_COSINE for p in entry["parity_vs_onnxruntime"].values())
    x = quick.test[0].slices
    with ReportPipeline(bundle, quant="F32", backend="tensorrt") as trt, \
            ReportPipeline(bundle, quant="F32", encoders="fp16") as ort:
        assert trt.precision == ort.precision == "fp16"
        ids = ort.llm.tokenize("findings:")
        got, ref = (p.image_prefix(*p.encode(x, {}), ids, {}) for p in (trt, ort))
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.999


def test_a_plan_whose_attention_swaps_slices_is_not_kept(quick, tmp_path, monkeypatch):
    """check_plan on the fusion: near-uniform attention rows keep a cosine near 1 when two slices swap places, so
    the weights are compared value by value too. TensorRT is not here: the plan's outputs are ONNX Runtime's on
    the same graph, with alpha's two largest weights swapped or not."""
    import samf.engines.tensorrt_engine as trt_engine
    from samf.engines.onnxruntime_engine import OrtModule
    from samf.export.tensorrt_build import PLAN_ATTENTION_REL, check_feeds, check_plan
    from samf.runtime.bundle.bundle import read_bundle

    onnx_path = os.path.join(quick.bundle, "fusion.onnx")

    class Plan:
        swap = False

        def __init__(self, path):
            self.module = OrtModule(onnx_path, prefer_gpu=False)

        def outputs_of(self, **feeds):
            out = self.module.outputs_of(**feeds)
            if Plan.swap:
                alpha = out["alpha"].copy()
                # The most attended slice and the next one that is 3% less attended (of the largest weight: a
                # swap of two near-equal weights changes nothing that matters), whose cosine stays near 1.
                order = np.argsort(-alpha[0])
                a = order[0]
                b = next(k for k in order if alpha[0, k] < alpha[0, a] * (1 - 3 * PLAN_ATTENTION_REL))
                alpha[0, [a, b]] = alpha[0, [b, a]]
                out["alpha"] = alpha
            return out

        def close(self):
            pass

    monkeypatch.setattr(trt_engine, "TrtModule", Plan)
    feeds = check_feeds(read_bundle(quick.bundle, verify_hashes=False))["fusion"]
    plan = tmp_path / "fusion-fp32.plan"
    plan.write_bytes(b"plan")
    assert check_plan(str(plan), onnx_path, feeds)["cos_min"] >= 0.999 and plan.exists()
    Plan.swap = True
    with pytest.raises(SamfError, match="attention weights differ"):
        check_plan(str(plan), onnx_path, feeds)
    assert not plan.exists()


#: OpenVINO runs in child processes only: a test process that has run torch and then OpenVINO was seen to crash
#: (SIGSEGV) at a later subprocess spawn, so nothing here loads OpenVINO into the pytest process.
BF16_EXPORT = """
import json, sys
from samf.export.bundle_writer import write_bundle
from samf.export.encoder_variants import Tolerance, VariantCheck
lax = Tolerance(slice_cos_mean=-1.0, slice_cos_min=-1.0, report_agreement=0.0)
lines = []
write_bundle(sys.argv[1], sys.argv[2], quants=(), keep_unquantized="F32", log=lines.append,
             check=VariantCheck(precisions=("int8", "bf16"), scans=3, report_tokens=16,
                                tolerances=dict(int8=lax, bf16=lax)))
print(json.dumps(lines))
"""


@pytest.fixture(scope="module")
def bf16_bundle(quick, tmp_path_factory):
    """The quick model exported with bf16 (OpenVINO) forced in and int8 beside it (in a child process)."""
    if importlib.util.find_spec("openvino") is None:  # found, not imported (BF16_EXPORT says why)
        pytest.skip("OpenVINO is an optional extra (samf[openvino]); CI installs it")
    import subprocess
    import sys

    out = str(tmp_path_factory.mktemp("bf16") / "bundle")
    proc = subprocess.run([sys.executable, "-c", BF16_EXPORT, quick.merged, out], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_is_the_fp32_files_on_openvino_and_auto_prefers_it(bf16_bundle, good_scan, monkeypatch):  # noqa: F811
    from samf.runtime.bundle.bundle import read_bundle
    from samf.runtime.inference import pipeline as P

    bundle, lines = bf16_bundle
    m = manifest_of(bundle)
    entry = m["encoders"]["bf16"]
    assert entry["files"] == m["encoders"]["fp32"]["files"] and entry["backend"] == "openvino"
    assert 0.99 < entry["figures"]["slice_cos_mean"] <= 1.0 and "same_reports" in entry["figures"]
    assert any(ln.startswith("export: bf16 encoders: slice cosine mean") for ln in lines)
    for args, precision in (((), "bf16"), (("--encoders", "bf16"), "bf16"), (("--encoders", "int8"), "int8")):
        proc = run_cli("samf", "report", good_scan, "--bundle", bundle, "--max-tokens", "4", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["encoders"] == precision, args  # auto, on a CPU with OpenVINO installed: bf16
        assert out["identity"]["encoders"] == ("OpenVINO bf16" if precision == "bf16" else "CPUExecutionProvider")

    # Without OpenVINO: auto passes over bf16 to int8, and asking for bf16 is one line naming the extra.
    b = read_bundle(bundle)
    monkeypatch.setattr("samf.engines.openvino_engine.openvino_version", lambda: None)
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    assert P.choose_precision(b, "auto", gpu=False) == "int8"
    from samf.errors import EngineUnavailable

    with pytest.raises(EngineUnavailable, match=r"pip install 'samf\[openvino\]'"):
        P.choose_precision(b, "bf16", gpu=False)


def test_an_export_without_openvino_says_so_and_makes_the_rest(quick, tmp_path, monkeypatch):
    from samf.export.bundle_writer import write_bundle

    monkeypatch.setattr("samf.export.encoder_variants.openvino_version", lambda: None)
    lines = []
    write_bundle(quick.merged, str(tmp_path / "b"), quants=(), keep_unquantized="F32", log=lines.append,
                 check=VariantCheck(precisions=("bf16",), scans=2, report_tokens=4))
    m = manifest_of(str(tmp_path / "b"))
    assert list(m["encoders"]) == ["fp32"] and "bf16" not in m["fidelity"].get("encoders_rejected", {})
    assert "export: bf16 encoders not made: OpenVINO is not installed here (pip install 'samf[openvino]')" in lines
