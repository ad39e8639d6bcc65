"""ONNX encoders in a bundle -> TensorRT plans for the GPU at hand, recorded in the bundle's manifest.

Torch-free: runs on a GPU machine with only the runtime's dependencies and TensorRT. Loading a plan is
:mod:`samf.engines.tensorrt_engine`'s job."""

from __future__ import annotations

import os

from samf.engines.tensorrt_engine import cuda_ok, import_tensorrt
from samf.errors import SamfError
from samf.runtime.atomic import atomic_file
from samf.runtime.bundle import read_bundle, update_manifest


def build_bundle_engines(bundle_dir: str, max_slices: int | None = None, max_prompt_tokens: int = 256,
                         workspace_gib: float = 4.0, log=print) -> dict:
    """Build vit/aggregator/fusion plans with shape profiles from the bundle's config."""
    import_tensorrt()  # EngineUnavailable, in one line, before anything is read
    b = read_bundle(bundle_dir)
    img = b.manifest["model"]["image"]
    v, a, f = img["vit"], img["aggregator"], img["fusion"]
    K = a["n_slices"]
    kmax = max_slices or K
    C, S = v["in_chans"], v["img_size"]
    profiles = {
        "vit": {"slices": ((1, C, S, S), (K, C, S, S), (kmax, C, S, S))},
        "aggregator": {"z2d": ((1, K, v["embed_dim"]),) * 3},
        "fusion": {"z2d": ((1, K, v["embed_dim"]),) * 3,
                   "z3d": ((1, a["n_tokens"], a["out_dim"]),) * 3,
                   "text": ((1, 1, f["d_text"]), (1, 32, f["d_text"]), (1, max_prompt_tokens, f["d_text"])),
                   "text_mask": ((1, 1), (1, 32), (1, max_prompt_tokens))},
    }
    plans, facts = {}, {}
    for name, prof in profiles.items():
        plan = f"{name}.plan"
        log(f"build-engines: {name} ...")
        onnx = b.open(f"{name}.onnx")  # built from the very file that was verified
        try:
            facts = build_plan(onnx.path, os.path.join(bundle_dir, plan), prof, workspace_gib,
                               timing_cache=os.path.join(bundle_dir, "timing.cache"))
        finally:
            onnx.close()
        plans[name] = plan
    entry = dict(facts, plans=plans)

    def add(m):
        m["engines"]["tensorrt"] = [e for e in m["engines"].get("tensorrt", [])
                                    if (e.get("gpu"), e.get("tensorrt")) != (entry["gpu"], entry["tensorrt"])]
        m["engines"]["tensorrt"].append(entry)
        for p in plans.values():
            m["files"][p] = {}
    update_manifest(bundle_dir, add)
    return entry


def build_plan(onnx_path: str, plan_path: str, profiles: dict, workspace_gib: float = 4.0,
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
