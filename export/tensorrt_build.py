"""ONNX encoders in a bundle -> TensorRT plans for the GPU at hand, recorded in the bundle's manifest."""

from __future__ import annotations

import os

from samf.runtime.bundle import read_bundle

from .bundle_writer import update_manifest


def build_bundle_engines(bundle_dir: str, max_slices: int | None = None, max_prompt_tokens: int = 256,
                         workspace_gib: float = 4.0, log=print) -> dict:
    """Build vit/aggregator/fusion plans with shape profiles from the bundle's config."""
    from samf.engines.tensorrt_engine import build_plan  # raises EngineUnavailable without TensorRT

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
