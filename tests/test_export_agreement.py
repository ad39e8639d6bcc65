"""The export's ONNX check (ONNX Runtime against PyTorch, each output relative to its own size): random models of
both presets pass it, whatever their weights, and a graph broken in one place fails it, each module and each of
the fusion's outputs. The figures behind the bound: benchmarks/export-tolerances.md."""

import json
import os

import numpy as np
import pytest

from samf.errors import ExportCheckFailed
from samf.export.onnx_export import ONNX_AGREEMENT, export_graph, export_one, module_specs, validate_onnx
from samf.export.synthetic import random_image_model


def image_config(preset: str, tmp_path):
    from samf.train.run_folder import paper_preset, tiny_preset
    from samf.train.vlm import ImageConfig

    if preset == "tiny":
        p = tiny_preset()
    else:  # the preset reads only the LLM's width (Phi-3-mini's 3072) from the folder
        folder = tmp_path / "phi3-width"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(dict(architectures=["Phi3ForCausalLM"], hidden_size=3072)))
        p = paper_preset(str(folder))
    return ImageConfig.from_dict(p["image"]), p["preprocess"]


def phantom_slices(seeds, pre: dict) -> list:
    from samf.runtime.scan.ct import Volume
    from samf.runtime.scan.preprocess import PreprocessConfig, preprocess
    from samf.runtime.tools.phantom import make_phantom

    cfg = PreprocessConfig.from_dict(pre)
    return [preprocess(Volume(p.volume, p.spacing, "phantom"), cfg) for p in (make_phantom(s) for s in seeds)]


def random_model(cfg, seed: int, calib: list):
    """A seeded random model (odd seeds with scaled weights): export/synthetic.py's random_image_model."""
    return random_image_model(cfg, seed, calib)[0]


def break_graph(src: str, dst: str, module: str, how: str) -> None:
    """``src`` with one error written to ``dst``: ``swap``: two rows of one weight matrix exchanged (the ViT's middle
    MLP, the aggregator's input projection, the fusion's 2D projection); ``scale``: one attention scale squared
    (1/d instead of 1/sqrt(d)); ``mean`` (ViT): two entries of the standardisation's mean exchanged; ``gamma``
    (fusion): the scale of the text-to-slice attention squared."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    nodes, inits = model.graph.node, {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in nodes for o in n.output}

    def node(suffix):
        return next(n for n in nodes if n.name.endswith(suffix))

    def replace(init, array):
        init.CopyFrom(numpy_helper.from_array(array.astype(np.float32), init.name))

    if how == "swap":
        init = inits[next(n for n in nodes if n.op_type == "MatMul" and n.input[1] in inits
                          and any(k in n.name for k in ("mlp/fc1", "in_proj", "proj_2d"))).input[1]]
        w = numpy_helper.to_array(init).copy()
        w[[0, 1]] = w[[1, 0]]
        replace(init, w)
    elif how in ("scale", "gamma"):
        mul = node("/Mul_5" if how == "gamma" else "/Mul") if module == "fusion" else node("blocks.0/attn/Mul")
        attr = next(a for i in mul.input if i in producer and producer[i].op_type == "Constant"
                    for a in producer[i].attribute if a.name == "value")
        v = numpy_helper.to_array(attr.t)
        attr.t.CopyFrom(numpy_helper.from_array((v * v).astype(np.float32)))
    elif how == "mean":
        init = next(i for i in inits.values() if i.name.endswith("slice_mean"))
        m = numpy_helper.to_array(init).copy()
        m[[0, 1]] = m[[1, 0]]
        replace(init, m)
    onnx.save(model, dst)


WRONG = dict(vit=("swap", "scale", "mean"), aggregator=("swap", "scale"), fusion=("swap", "scale", "gamma"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg, pre = image_config("tiny", tmp_path_factory.mktemp("tiny"))
    return cfg, phantom_slices(range(5000, 5002), pre)


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """The standardisation measured on one phantom's 24 slices (ViT-B/16 on a 2-core CPU: each scan costs as
    much as one of the export's checks)."""
    cfg, pre = image_config("paper", tmp_path_factory.mktemp("paper"))
    return cfg, phantom_slices(range(5000, 5001), pre)


def export_all(vlm, out_dir) -> dict:
    """Every module through the export's own check (export_one raises when one misses)."""
    return {s.name: export_one(s, os.path.join(out_dir, f"{s.name}.onnx")) for s in module_specs(vlm)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tiny_models_pass_the_export_check(tiny, tmp_path, seed):
    figures = export_all(random_model(tiny[0], seed, tiny[1]), str(tmp_path))
    for name, fig in figures.items():
        assert fig["bound"] == dict(rel_diff=ONNX_AGREEMENT.rel_diff, cos_min=ONNX_AGREEMENT.cos_min)
        assert fig["rel_diff"] <= ONNX_AGREEMENT.rel_diff / 10, (name, fig)  # a wide margin, not just a pass
    assert set(figures["fusion"]["outputs"]) == {"fused", "alpha", "gamma"}


@pytest.mark.slow
def test_twenty_four_random_tiny_models_pass_the_export_check(tiny, tmp_path):
    worst = {}
    for seed in range(100, 124):
        for name, fig in export_all(random_model(tiny[0], seed, tiny[1]), str(tmp_path)).items():
            worst[name] = max(worst.get(name, 0.0), fig["rel_diff"])
    print("worst rel_diff over 24 tiny inits:", worst)
    assert max(worst.values()) <= ONNX_AGREEMENT.rel_diff / 10


def test_a_graph_broken_in_one_place_fails_the_check(tiny, tmp_path):
    """Each module with a swapped weight and a wrong constant; every output of the fusion is caught on its own."""
    vlm = random_model(tiny[0], 0, tiny[1])
    for spec in module_specs(vlm):
        good, bad = str(tmp_path / f"{spec.name}.onnx"), str(tmp_path / f"{spec.name}-bad.onnx")
        export_graph(spec, good)  # that it passes: test_random_tiny_models_pass_the_export_check[0]
        for how in WRONG[spec.name]:
            break_graph(good, bad, spec.name, how)
            fig = validate_onnx(spec, bad, seeds=(1,))  # a broken graph shows on any input
            assert ONNX_AGREEMENT.misses(fig) is not None, (spec.name, how, fig)
            assert fig["rel_diff"] >= 10 * ONNX_AGREEMENT.rel_diff, (spec.name, how, fig["rel_diff"])
            if spec.name == "fusion":  # the attention outputs are held on their own, not only through the rows
                changed = ("fused", "alpha", "gamma") if how == "swap" else ("fused", "gamma" if how == "gamma"
                                                                              else "alpha")
                for out in changed:
                    assert fig["outputs"][out]["rel_diff"] > ONNX_AGREEMENT.rel_diff, (how, out, fig["outputs"])


def test_a_failed_check_stops_the_export_and_leaves_no_file(tiny, tmp_path, monkeypatch):
    import samf.export.onnx_export as ox

    real = ox.export_graph

    def broken(spec, path):
        real(spec, path)
        break_graph(path, path, spec.name, "swap")

    monkeypatch.setattr(ox, "export_graph", broken)
    spec = next(s for s in module_specs(random_model(tiny[0], 0, tiny[1])) if s.name == "aggregator")
    with pytest.raises(ExportCheckFailed, match=r"aggregator: ONNX Runtime differs from PyTorch: z3d: max \|diff\|"):
        export_one(spec, str(tmp_path / "aggregator.onnx"))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_random_paper_models_pass_the_export_check(paper, tmp_path, seed):
    """ViT-B/16 at 224², the aggregator, and the fusion at Phi-3-mini's width, each export checked as
    ``samf-export bundle`` checks it; 20 inits (about 2 minutes each on 2 busy cores)."""
    figures = export_all(random_model(paper[0], seed, paper[1]), str(tmp_path))
    print(f"paper init {seed}:", {n: f["rel_diff"] for n, f in figures.items()})
    for name, fig in figures.items():
        assert fig["rel_diff"] <= ONNX_AGREEMENT.rel_diff / 10, (name, fig)


@pytest.mark.slow
def test_a_broken_paper_graph_fails_the_check(paper, tmp_path):
    vlm = random_model(paper[0], 0, paper[1])
    for spec in module_specs(vlm):
        good, bad = str(tmp_path / f"{spec.name}.onnx"), str(tmp_path / f"{spec.name}-bad.onnx")
        export_graph(spec, good)
        for how in WRONG[spec.name]:
            break_graph(good, bad, spec.name, how)
            fig = validate_onnx(spec, bad, seeds=(1,))
            assert ONNX_AGREEMENT.misses(fig) is not None and fig["rel_diff"] >= 10 * ONNX_AGREEMENT.rel_diff, \
                (spec.name, how, fig)
        os.remove(good)
