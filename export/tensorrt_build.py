"""ONNX encoders in a bundle -> TensorRT plans for the GPU at hand, recorded in the bundle's manifest.

Torch-free: runs on a GPU machine with only the runtime's dependencies and TensorRT. Loading a plan is
:mod:`samf.engines.tensorrt_engine`'s job."""

from __future__ import annotations

import os

import numpy as np

from samf.engines.tensorrt_engine import cuda_ok, import_tensorrt
from samf.errors import SamfError
from samf.runtime.atomic import atomic_file
from samf.runtime.bundle.bundle import Bundle, read_bundle, update_manifest

from .configs import EngineBuildConfig, VariantCheck
from .encoder_variants import AgreementMeter, held_out_volumes

#: A plan must give what ONNX Runtime gives on the graph it was built from: the worst output row's cosine.
PLAN_MIN_COSINE = 0.999
#: The fusion's attention outputs, and how far a plan's may be from ONNX Runtime's, as a share of the largest weight
#: (so the bound follows the slice count: weights are near 1/K, and 1% of the largest is 4e-4 at K = 24 with
#: uniform weights, where the absolute bound this replaced was 1e-3). The fp16 ONNX graphs give α and γ within 1e-5
#: of fp32's (tests/test_encoder_precision.py); a plan of the same graph should be nearer still (not measured
#: here, there is no GPU). Two slices swapping their weights moved the quick model's largest weight by 3%.
ATTENTION_OUTPUTS = ("alpha", "gamma")
PLAN_ATTENTION_REL = 0.01


def build_bundle_engines(bundle_dir: str, precision: str = EngineBuildConfig.precision,
                         max_slices: int | None = EngineBuildConfig.max_slices,
                         max_prompt_tokens: int = EngineBuildConfig.max_prompt_tokens,
                         workspace_gib: float = EngineBuildConfig.workspace_gib, log=print) -> dict:
    """Build vit/aggregator/fusion plans from the bundle's graphs of ``precision`` (``auto``: fp16 where the
    bundle has it, else fp32), with shape profiles from the manifest's recorded I/O signature, each checked
    against ONNX Runtime on the same graph right after it is built."""
    import_tensorrt()  # EngineUnavailable, in one line, before anything is read
    b = read_bundle(bundle_dir)
    have = b.encoder_precisions()
    if precision == "auto":
        from samf.runtime.inference.pipeline import AUTO_PRECISION

        precision = next(p for p in AUTO_PRECISION["gpu"] if p in have)
    graphs = [p for p in have if p in ("fp32", "fp16")]  # int8 and bf16 are CPU variants (ONNX Runtime, OpenVINO)
    if precision not in graphs:
        raise SamfError(f"bundle has no {precision} encoder graphs to build TensorRT plans from (it has "
                        f"{', '.join(graphs)})")
    profiles = shape_profiles(b.manifest, max_slices, max_prompt_tokens)
    sources = b.encoder_files(precision)
    feeds = check_feeds(b)
    plans, parity, facts = {}, {}, {}
    for name, prof in profiles.items():
        plan = f"{name}-{precision}.plan"
        log(f"build-engines: {name} ({precision}) ...")
        onnx = b.open(sources[name])  # built from the very file that was verified
        try:
            facts = build_plan(onnx.path, os.path.join(bundle_dir, plan), prof, workspace_gib,
                               timing_cache=os.path.join(bundle_dir, "timing.cache"))
            parity[name] = check_plan(os.path.join(bundle_dir, plan), onnx.path, feeds[name])
        finally:
            onnx.close()
        log(f"build-engines: {plan}: worst cosine with ONNX Runtime {parity[name]['cos_min']:.5f}, "
            f"max |diff| {parity[name]['max_abs_diff']:.2g} ({parity[name]['rel_diff']:.1e} of the largest output)")
        plans[name] = plan
    entry = dict(facts, precision=precision, plans=plans, parity_vs_onnxruntime=parity)

    def add(m):
        m["engines"]["tensorrt"] = [e for e in m["engines"].get("tensorrt", [])
                                    if (e.get("gpu"), e.get("tensorrt"), e.get("precision", "fp32"))
                                    != (entry["gpu"], entry["tensorrt"], precision)]
        m["engines"]["tensorrt"].append(entry)
        for p in plans.values():
            m["files"][p] = {}
    update_manifest(bundle_dir, add)
    return entry


def shape_profiles(manifest: dict, max_slices: int | None = EngineBuildConfig.max_slices,
                   max_prompt_tokens: int = EngineBuildConfig.max_prompt_tokens) -> dict:
    """``{module: {input: (min, opt, max)}}`` from the manifest's recorded I/O signature: each dynamic axis gets
    its range (``slices``: 1 to ``max_slices``, optimal at the model's slice count; ``tokens``: 1 to
    ``max_prompt_tokens``, optimal at 32; ``batch``: 1, one scan per call), fixed axes their size."""
    if "io_signature" not in manifest:
        raise SamfError("the bundle's manifest records no I/O signature (an older export): rebuild it with "
                        "`samf-export bundle`")
    K = manifest["model"]["image"]["aggregator"]["n_slices"]
    ranges = dict(slices=(1, K, max(max_slices or K, K)), tokens=(1, min(32, max_prompt_tokens), max_prompt_tokens),
                  batch=(1, 1, 1))
    out = {}
    for module, sig in manifest["io_signature"].items():
        out[module] = {}
        for name, spec in sig["inputs"].items():
            dims = [ranges.get(d) if isinstance(d, str) else (d, d, d) for d in spec["shape"]]
            if any(r is None for r in dims):
                raise SamfError(f"{module}.onnx input {name} has a dynamic axis samf does not know: {spec['shape']}")
            out[module][name] = tuple(tuple(r[i] for r in dims) for i in range(3))
    return out


def check_feeds(bundle: Bundle) -> dict:
    """Inputs to check each plan with: the slices of a held-out phantom, the fp32 ViT's embeddings of them and
    its aggregator's tokens, and a small random prompt (no LLM is needed)."""
    from samf.engines.onnxruntime_engine import OrtModule
    from samf.runtime.scan.preprocess import preprocess

    slices = preprocess(held_out_volumes(VariantCheck(scans=1))[0], bundle.preprocess)
    files = bundle.encoder_files("fp32")
    z2d = OrtModule(bundle.path(files["vit"]), prefer_gpu=False)(slices=slices)[None]
    z3d = OrtModule(bundle.path(files["aggregator"]), prefer_gpu=False)(z2d=z2d)
    d_text = bundle.manifest["model"]["image"]["fusion"]["d_text"]
    text = np.random.default_rng(0).normal(0, 0.05, (1, 12, d_text)).astype(np.float32)
    return dict(vit=dict(slices=slices), aggregator=dict(z2d=z2d),
                fusion=dict(z2d=z2d, z3d=z3d, text=text, text_mask=np.ones((1, 12), np.int64)))


def check_plan(plan_path: str, onnx_path: str, feeds: dict) -> dict:
    """The plan against ONNX Runtime on the graph it was built from, every output (the fusion's attention too);
    the plan is removed and :class:`SamfError` raised when the worst output row's cosine is below
    :data:`PLAN_MIN_COSINE`, or the attention weights differ by more than :data:`PLAN_ATTENTION_REL` of the largest
    weight. Returns ``cos_min``, ``max_abs_diff`` and ``rel_diff`` (the worst output's max |diff| over its largest
    value)."""
    from samf.engines.onnxruntime_engine import OrtModule
    from samf.engines.tensorrt_engine import TrtModule

    ref = OrtModule(onnx_path).outputs_of(**feeds)
    trt = TrtModule(plan_path)
    try:
        got = trt.outputs_of(**feeds)
    finally:
        trt.close()
    if set(got) != set(ref):
        os.remove(plan_path)
        raise SamfError(f"TensorRT plan {os.path.basename(plan_path)} has outputs {sorted(got)}, its graph "
                        f"{sorted(ref)} (not kept)")
    meter = AgreementMeter()
    meter.add(ref, got)
    fig = meter.figures()
    out = dict(cos_min=round(fig["cos_min"], 6), max_abs_diff=round(fig["max_abs_diff"], 6), rel_diff=fig["rel_diff"])
    # Attention weights are near-uniform distributions: a row cosine stays near 1 even when slices swap places.
    attention = max((fig["outputs"][n]["rel_diff"] for n in ATTENTION_OUTPUTS if n in fig["outputs"]), default=0.0)
    why = None
    if not out["cos_min"] >= PLAN_MIN_COSINE:
        why = f"worst cosine {out['cos_min']:.4f} < {PLAN_MIN_COSINE}"
    elif not attention <= PLAN_ATTENTION_REL:
        why = f"attention weights differ by {attention:.1e} of the largest weight > {PLAN_ATTENTION_REL}"
    if why:
        os.remove(plan_path)
        raise SamfError(f"TensorRT plan {os.path.basename(plan_path)} differs from ONNX Runtime on its graph: {why} "
                        "(not kept)")
    return out


def build_plan(onnx_path: str, plan_path: str, profiles: dict, workspace_gib: float = EngineBuildConfig.workspace_gib,
               timing_cache: str | None = None) -> dict:
    """Build a strongly typed plan from ONNX (precision comes from the graph, as TensorRT 11 requires).

    ``profiles``: ``{input: (min_shape, opt_shape, max_shape)}`` for the dynamic inputs. Returns facts
    about the build (TensorRT version, GPU name, compute capability) for the bundle manifest.
    """
    trt, cudart = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SamfError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache:
        blob = open(timing_cache, "rb").read() if os.path.exists(timing_cache) else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SamfError(f"TensorRT failed to build {onnx_path}")
    with atomic_file(plan_path, "wb") as f:
        f.write(plan)
    if cache is not None:
        with atomic_file(timing_cache, "wb") as f:
            f.write(memoryview(cache.serialize()))
    props = cuda_ok(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return dict(tensorrt=trt.__version__, gpu=name.strip("\x00"), compute_capability=f"{props.major}.{props.minor}")
