"""How far ONNX Runtime's fp32 graphs are from PyTorch's fp32 modules when the export is right (float noise), and
how far when it is wrong (a swapped weight, a wrong constant): what the export check's bound is chosen between.

    python benchmarks/export_tolerances.py --preset tiny --inits 24 \
        --out benchmarks/results/export-tolerances-tiny.json
    python benchmarks/export_tolerances.py --preset paper --inits 3 \
        --out benchmarks/results/export-tolerances-paper.json

Each init is a fresh model of the preset's shapes (``tiny_preset``; ``paper_preset``: ViT-B/16 at 224², the
aggregator, the fusion at Phi-3-mini's width 3072), seeded, initialised as the model classes initialise; every
second init has its weight matrices and embeddings multiplied by a factor between 0.5 and 4 (trained weights are
not the init's size). The slice-embedding standardisation is measured on phantom slices, as training does (at a
random init the CLS features of CT slices hardly differ, so it divides by small standard deviations: the
amplification that made an absolute bound fail). Each module is exported as ``samf-export bundle`` exports it and
compared by :func:`samf.export.onnx_export.validate_onnx` on the export's own 3 random inputs; the ViT also on one
phantom's slices, and both again on its standardised output (``standardised_*``: the figures an export check that
ignores the standardisation would see). Then each graph is broken on purpose, in one place, and compared again
(``--wrong-inputs`` random inputs):

- ``swap``: two rows of one weight matrix swapped (two input features exchanged);
- ``weight``: one weight of that matrix moved by its matrix's RMS;
- ``weight/10``: by a tenth of it;
- ``scale``: one attention scale constant 1% off;
- ``scale^2``: one attention scale squared (1/d instead of 1/sqrt(d));
- ``eps``: LayerNorm's epsilon 1e-5 instead of 1e-6 (every LayerNorm; the ViT and the aggregator);
- ``mean`` (ViT): two entries of the standardisation's mean swapped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np


def image_config(preset: str, work: str):
    from samf.train.run_folder import paper_preset, tiny_preset
    from samf.train.vlm import ImageConfig

    if preset == "tiny":
        return ImageConfig.from_dict(tiny_preset()["image"]), tiny_preset()["preprocess"]
    folder = os.path.join(work, "phi3-width")  # the preset reads only the LLM's width from the folder
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072), f)
    p = paper_preset(folder)
    return ImageConfig.from_dict(p["image"]), p["preprocess"]


def phantom_slices(seeds, pre: dict) -> list:
    from samf.runtime.scan.ct import Volume
    from samf.runtime.scan.preprocess import PreprocessConfig, preprocess
    from samf.runtime.tools.phantom import make_phantom

    cfg = PreprocessConfig.from_dict(pre)
    return [preprocess(Volume(p.volume, p.spacing, "phantom"), cfg) for p in (make_phantom(s) for s in seeds)]


# ---------------------------------------------------------------------------------------------- wrong graphs

def _weight_of(model, node_pattern: str):
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if re.fullmatch(node_pattern, n.name))
    init = inits[node.input[1]]
    return init, onnx.numpy_helper.to_array(init).copy()


def _constant_of(model, node_pattern: str):
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if re.fullmatch(node_pattern, n.name))
    const = next(producer[i] for i in node.input if i in producer and producer[i].op_type == "Constant")
    return next(a for a in const.attribute if a.name == "value")


def break_graph(src: str, dst: str, how: str, module: str, depth: int) -> None:
    """``src`` with one deliberate error (see the module's docstring) written to ``dst``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    mid = depth // 2
    matmul = {"vit": rf"/vit/blocks\.{mid}/mlp/fc1/MatMul", "aggregator": r"/agg/in_proj/MatMul",
              "fusion": r"/proj_2d/MatMul"}[module]
    scale = {"vit": rf"/vit/blocks\.{mid}/attn/Mul", "aggregator": r"/agg/blocks\.0/attn/Mul",
             "fusion": r"/Mul"}[module]
    if how in ("swap", "weight", "weight/10"):
        init, w = _weight_of(model, matmul)
        if how == "swap":
            w[[0, 1]] = w[[1, 0]]
        else:
            w[0, 0] += float(np.sqrt((w ** 2).mean())) * (1.0 if how == "weight" else 0.1)
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    elif how in ("scale", "scale^2"):
        attr = _constant_of(model, scale)
        v = numpy_helper.to_array(attr.t).copy()
        v = v * 1.01 if how == "scale" else v * v  # 1/d instead of 1/sqrt(d)
        attr.t.CopyFrom(numpy_helper.from_array(v.astype(np.float32), attr.t.name))
    elif how == "eps":
        for n in model.graph.node:
            if n.op_type == "LayerNormalization":
                for a in n.attribute:
                    if a.name == "epsilon":
                        a.f = 1e-5
    elif how == "mean":
        init = next(i for i in model.graph.initializer if i.name.endswith("slice_mean"))
        m = numpy_helper.to_array(init).copy()
        m[[0, 1]] = m[[1, 0]]
        init.CopyFrom(numpy_helper.from_array(m, init.name))
    else:
        raise ValueError(how)
    onnx.save(model, dst)


WRONG = {"vit": ("swap", "weight", "weight/10", "scale", "scale^2", "eps", "mean"),
         "aggregator": ("swap", "weight", "weight/10", "scale", "scale^2", "eps"),
         "fusion": ("swap", "weight", "weight/10", "scale", "scale^2")}


# ---------------------------------------------------------------------------------------------- measuring

def measure_init(cfg, pre, seed, calib, held, work, wrong_inputs: int) -> dict:
    import dataclasses

    import torch

    from samf.export.onnx_export import export_graph, module_specs, validate_onnx
    from samf.export.synthetic import random_image_model

    t = time.time()
    vlm, factor = random_image_model(cfg, seed, calib)
    out = dict(seed=seed, weight_factor=round(factor, 4), modules={})
    for spec in module_specs(vlm):
        path = os.path.join(work, f"{spec.name}.onnx")
        export_graph(spec, path)
        rec = dict(dummy=validate_onnx(spec, path))
        if spec.name == "vit":
            # The same figures taken on the standardised output instead of the CLS vectors (the naive way).
            plain = dataclasses.replace(spec, units={})
            real = [(torch.from_numpy(x),) for x in held]
            rec["real_slices"] = validate_onnx(spec, path, inputs=real)
            rec["standardised_dummy"] = validate_onnx(plain, path)
            rec["standardised_real_slices"] = validate_onnx(plain, path, inputs=real)
            rec["slice_std"] = [float(vlm.encoder.slice_std.min()), float(vlm.encoder.slice_std.max())]
        if wrong_inputs:
            rec["wrong"] = {}
            depth = cfg.vit.depth if spec.name == "vit" else cfg.aggregator.depth
            for how in WRONG[spec.name]:
                bad = os.path.join(work, f"{spec.name}-wrong.onnx")
                break_graph(path, bad, how, spec.name, depth)
                rec["wrong"][how] = validate_onnx(spec, bad, seeds=range(1, 1 + wrong_inputs))
        out["modules"][spec.name] = rec
    out["seconds"] = round(time.time() - t, 1)
    return out


def summary(inits: list) -> dict:
    """Worst noise over the inits (per module and output), and the mildest wrong-graph figure per error."""
    s = {}
    for m in inits[0]["modules"]:
        recs = [i["modules"][m] for i in inits]
        row = {}
        for kind in ("dummy", "real_slices", "standardised_dummy", "standardised_real_slices"):
            if kind in recs[0]:
                outs = recs[0][kind]["outputs"]
                row[kind] = {o: dict(rel_diff=max(r[kind]["outputs"][o]["rel_diff"] for r in recs),
                                     rel_rms=max(r[kind]["outputs"][o]["rel_rms"] for r in recs),
                                     one_minus_cos=max(1 - r[kind]["outputs"][o]["cos_min"] for r in recs),
                                     max_abs_diff=max(r[kind]["outputs"][o]["max_abs_diff"] for r in recs),
                                     max_abs_diff_min=min(r[kind]["outputs"][o]["max_abs_diff"] for r in recs),
                                     max_abs=[min(r[kind]["outputs"][o]["max_abs"] for r in recs),
                                              max(r[kind]["outputs"][o]["max_abs"] for r in recs)])
                             for o in outs}
        if "slice_std" in recs[0]:
            row["slice_std"] = [min(r["slice_std"][0] for r in recs), max(r["slice_std"][1] for r in recs)]
        if "wrong" in recs[0]:
            row["wrong_mildest"] = {how: dict(rel_diff=min(r["wrong"][how]["rel_diff"] for r in recs),
                                              one_minus_cos=min(1 - r["wrong"][how]["cos_min"] for r in recs))
                                    for how in recs[0]["wrong"]}
        s[m] = row
    return s


def dumps(result: dict) -> str:
    """The result as JSON: everything indented but the inits, one line each."""
    head = json.dumps({k: v for k, v in result.items() if k != "inits"}, indent=1)
    return head[:-2] + ',\n "inits": [\n  ' + ",\n  ".join(json.dumps(i) for i in result["inits"]) + "\n ]\n}\n"


def main(argv=None) -> int:
    import onnxruntime
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    ap.add_argument("--inits", type=int, default=24)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--calibration-scans", type=int, default=None, help="default: tiny 8, paper 2")
    ap.add_argument("--wrong-inputs", type=int, default=3, help="random inputs each broken graph is compared on "
                    "(0: no broken graphs)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = tempfile.mkdtemp(prefix="export-tolerances-")
    cfg, pre = image_config(a.preset, work)
    n_cal = a.calibration_scans or (8 if a.preset == "tiny" else 2)
    calib = phantom_slices(range(5000, 5000 + n_cal), pre)
    held = phantom_slices([6000], pre)
    inits = []
    for seed in range(a.first_seed, a.first_seed + a.inits):
        inits.append(measure_init(cfg, pre, seed, calib, held, work, a.wrong_inputs))
        s = summary(inits[-1:])
        print(f"init {seed} (x{inits[-1]['weight_factor']}, {inits[-1]['seconds']} s): "
              + "; ".join(f"{m} " + ", ".join(f"{o} {f['rel_diff']:.1e}" for o, f in r["dummy"].items())
                          for m, r in s.items()), flush=True)
    result = dict(preset=a.preset, image=cfg.to_dict(), calibration_scans=n_cal, threads=a.threads,
                  machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                               cpus=os.cpu_count(), python=sys.version.split()[0]),
                  versions=dict(torch=torch.__version__, onnxruntime=onnxruntime.__version__),
                  summary=summary(inits), inits=inits)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(dumps(result))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
