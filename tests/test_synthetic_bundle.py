"""A random-weight bundle of the real shapes for benchmarking, and the export checks every bundle gets: the
Phi-3-mini-shaped folder streams its weights, the export never loads the LLM in PyTorch, each GGUF is checked
against its source, and a bundle is verified once, when it is written."""

import json
import os

import pytest
from cli_runner import run_cli
from phi3_factory import small_phi3

from samf.errors import ExportCheckFailed
from samf.train.synthetic_llm import write_phi3_folder


def test_the_folder_streams_into_shards_that_transformers_loads_as_phi3_initialises(tmp_path):
    import torch

    from samf.train.vlm import load_phi3

    folder = write_phi3_folder(str(tmp_path / "phi3"), hidden_size=96, intermediate_size=192, num_attention_heads=4,
                               num_hidden_layers=3, shard_bytes=3 << 20)  # ~13 MB of bf16 -> several shards
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    model = load_phi3(folder)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 32064
    sd = model.state_dict()
    assert set(sd) == set(index["weight_map"])
    assert all(torch.all(v == 1) for k, v in sd.items() if k.endswith("norm.weight"))
    emb = sd["model.embed_tokens.weight"].float()
    assert torch.all(emb[32000] == 0) and abs(float(emb.std()) - 0.02) < 1e-3
    assert abs(float(sd["model.layers.2.mlp.down_proj.weight"].float().std()) - 0.02) < 1e-3


def test_phi3_tensor_shapes_are_the_models_state_dict():
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from samf.train.synthetic_llm import PHI3_MINI, phi3_tensor_shapes

    for kw in (dict(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_hidden_layers=3),
               dict(PHI3_MINI, num_hidden_layers=2), dict(hidden_size=128, intermediate_size=320,
                                                          num_attention_heads=8, num_key_value_heads=2,
                                                          num_hidden_layers=2)):
        cfg = Phi3Config(vocab_size=32064, tie_word_embeddings=False, **kw)
        with torch.device("meta"):
            model = [(k, tuple(v.shape)) for k, v in Phi3ForCausalLM(cfg).state_dict().items()]
        assert phi3_tensor_shapes(cfg) == model, kw


def _corrupt(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(8)
        f.seek(offset)
        f.write(bytes(x ^ 0x5A for x in b))


def test_gguf_checks_catch_a_changed_tensor(tmp_path):
    from samf.engines.llama_cpp_engine import gguf_tensor_infos
    from samf.export.gguf_convert import (
        check_gguf_against_checkpoint,
        check_quantized_gguf,
        convert_to_gguf,
        quantize_gguf,
    )

    ckpt = small_phi3(tmp_path / "phi3", "bfloat16")
    base = convert_to_gguf(ckpt, str(tmp_path / "f16.gguf"), "F16")
    assert check_gguf_against_checkpoint(ckpt, base, "F16") == 2 * 6 + 3  # 6 per layer; embeddings, final norm, head
    q8 = quantize_gguf(base, str(tmp_path / "q8.gguf"), "Q8_0")
    errs = check_quantized_gguf(base, q8)
    assert 0 < errs["Q8_0"] < 0.01

    _corrupt(base, gguf_tensor_infos(base)["blk.1.ffn_down.weight"][2] + 64)
    with pytest.raises(ExportCheckFailed, match="blk.1.ffn_down.weight does not hold"):
        check_gguf_against_checkpoint(ckpt, base, "F16")
    _corrupt(q8, gguf_tensor_infos(q8)["blk.0.attn_qkv.weight"][2] + 34)  # inside the first row's second block
    with pytest.raises(ExportCheckFailed, match="blk.0.attn_qkv.weight"):
        check_quantized_gguf(convert_to_gguf(ckpt, str(tmp_path / "f16b.gguf"), "F16"), q8)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """``samf-export synthetic-bundle`` at the tiny preset (the paper one is the same code, measured in
    benchmarks/paper-scale.md), with its checkpoint kept."""
    root = tmp_path_factory.mktemp("synthetic")
    bundle, ckpt = str(root / "bundle"), str(root / "checkpoint")
    proc = run_cli("samf-export", "synthetic-bundle", "--preset", "tiny", "--quant", "Q8_0", "--quant", "Q4_K_M",
                   "--checkpoint", ckpt, "--precision", "fp16", "--out", bundle)  # int8: test_encoder_precision
    assert proc.returncode == 0, proc.stderr
    return bundle, ckpt, proc.stdout


def test_synthetic_bundle_is_an_ordinary_validated_bundle(synthetic):
    bundle, ckpt, out = synthetic
    m = json.load(open(os.path.join(bundle, "manifest.json")))
    assert m["llm"]["files"] == {"F16": "llm-F16.gguf", "Q8_0": "llm-Q8_0.gguf", "Q4_K_M": "llm-Q4_K_M.gguf"}
    assert m["model"]["llm"]["vocab_size"] == 32064 and m["prompt"]["layout"]["answer_end"] == 32007
    fid = m["fidelity"]["gguf_relative_rms_error"]
    assert fid["F16"] == "bit-exact" and fid["Q8_0"]["Q8_0"] < 0.01 and 0 < fid["Q4_K_M"]["Q4_K"] < 0.14
    assert "tensors equal the checkpoint's" in out and "random weights" in out
    assert "encoders: fp32" in out and m["encoders"]["fp32"]["files"]["vit"] == "vit.onnx"
    assert set(m["encoders"]) | set(m["fidelity"].get("encoders_rejected", {})) == {"fp32", "fp16"}
    from samf.train.vlm import SamfVLM

    enc = SamfVLM.from_checkpoint(ckpt, with_llm=False).encoder  # standardised as training standardises
    assert float(enc.slice_mean.abs().max()) > 0 and float((enc.slice_std - 1).abs().max()) > 0
    assert sorted(os.listdir(os.path.dirname(bundle))) == ["bundle", "checkpoint"]  # nothing half-written left


def test_a_fresh_bundle_needs_no_hashing(synthetic, monkeypatch):
    """The export fills the verification cache with what it hashed (that an edit after it is still caught is
    test_bundle_verify's)."""
    from samf.runtime.bundle import bundle as B

    bundle, _, _ = synthetic
    hashed = []
    real = B.hash_fd
    monkeypatch.setattr(B, "hash_fd", lambda fd, *a, **k: hashed.append(fd) or real(fd, *a, **k))
    B.read_bundle(bundle, quant="Q4_K_M")
    assert hashed == []


def test_bench_runs_on_phantoms_with_fixed_length_reports(synthetic, tmp_path):
    bundle, _, _ = synthetic
    out = tmp_path / "bench.json"
    proc = run_cli("samf", "bench", "--bundle", bundle, "--scans", "2", "--quant", "Q4_K_M", "--quant", "F16",
                   "--new-tokens", "9", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["data"] == "2 synthetic phantoms (seed 7)" and res["new_tokens"] == 9
    for run in res["runs"]:
        assert run["new_tokens"] == 9 and run["decode_tok_s"] > 0 and run["reference_nll"] is None
        assert run["prompt_tokens"] > m_image_tokens(bundle) and run["peak_rss_mb"] > 0
        assert {"load", "preprocess", "vit", "aggregator", "fusion", "llm_prefill", "llm_decode"} <= set(run["stages"])
    assert "| Q4_K_M |" in proc.stdout and "| F16 |" in proc.stdout


def m_image_tokens(bundle: str) -> int:
    return json.load(open(os.path.join(bundle, "manifest.json")))["model"]["image_tokens"]


def test_both_pipelines_decode_a_fixed_number_of_tokens_when_asked(synthetic):
    """``stop_at_end=False``, for speed comparisons on random weights (which never say their end token on cue):
    exactly the tokens asked for, with the PyTorch pipeline's stages timed."""
    import torch

    from samf.runtime.inference.pipeline import ReportPipeline
    from samf.runtime.inference.prompt import REPORT_REQUESTS
    from samf.runtime.scan.ct import Volume
    from samf.runtime.scan.preprocess import preprocess
    from samf.runtime.tools.phantom import make_phantom
    from samf.train.llm_folder import LLMTokenizer
    from samf.train.vlm import SamfVLM, prompt_ids

    bundle, ckpt, _ = synthetic
    p = make_phantom(3)
    vol = Volume(p.volume, p.spacing, "phantom")
    pipe = ReportPipeline(bundle, quant="F16")
    res = pipe.report(vol, max_new_tokens=12, stop_at_end=False)
    pipe.close()
    assert len(res.token_ids) == 12 and res.decode_steps == 11

    vlm = SamfVLM.from_checkpoint(ckpt)
    timings = {}
    ids = vlm.generate(torch.from_numpy(preprocess(vol, pipe.pre)), prompt_ids(LLMTokenizer(ckpt), REPORT_REQUESTS[0]),
                       12, stop_at_end=False, timings=timings)
    assert set(timings) == {"encoder", "fusion", "prefill", "decode"}
    assert len(ids) == 12 and all(v > 0 for v in timings.values())


def test_the_export_never_loads_the_llm_in_pytorch(synthetic, tmp_path, monkeypatch):
    """Phi-3-mini in bf16 is 7.6 GB: the bundle writer reads its config, tokenizer and tensors, never the model."""
    from samf.export.bundle_writer import write_bundle
    from samf.train import vlm

    def refuse(*a, **k):
        raise AssertionError("the export loaded the LLM in PyTorch")

    monkeypatch.setattr(vlm, "load_phi3", refuse)
    from samf.export.encoder_variants import VariantCheck

    m = write_bundle(synthetic[1], str(tmp_path / "bundle"), quants=(), keep_unquantized="F32", log=lambda *_: None,
                     check=VariantCheck(scans=2, report_tokens=8))  # the variants' check runs llama.cpp too
    assert m["model"]["llm"] == dict(arch="phi3", hidden_size=128, vocab_size=32064, num_hidden_layers=2)


def test_the_tensor_tables_and_token_rows_are_gguf_pys(synthetic, tmp_path):
    """samf walks a GGUF's header itself (gguf-py's reader takes 1.6 s per file at this vocabulary): the same
    names, types, shapes, offsets and sizes as gguf-py reads, for every type the bundle holds. The runtime maps
    the prompt's embeddings at the offset the export recorded; the rows are the table gguf-py reads."""
    import gguf
    import numpy as np

    from samf.engines.llama_cpp_engine import GGUFTokenEmbeddings, gguf_tensor_infos
    from samf.errors import SamfError

    bundle, _, _ = synthetic
    m = json.load(open(os.path.join(bundle, "manifest.json")))
    ids = [1, 32010, 450, 29871, 32007, 32063]
    for quant, name in m["llm"]["files"].items():
        path = os.path.join(bundle, name)
        tensors = gguf.GGUFReader(path).tensors
        assert gguf_tensor_infos(path) == {
            t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.data_offset),
                     int(t.n_bytes)) for t in tensors}, quant
        table = next(t for t in tensors if t.name == "token_embd.weight")
        want = gguf.quants.dequantize(np.asarray(table.data)[ids], table.tensor_type).reshape(len(ids), -1)
        got = GGUFTokenEmbeddings(path, m["llm"]["token_embd"][quant])(ids)
        assert got.shape == (len(ids), 128) and np.array_equal(got, want.astype(np.float32)), quant
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(os.path.join(bundle, "llm-F16.gguf"), "rb").read(300_000))  # inside the vocabulary
    for path, words in ((cut, "runs past the end|unpack"), (tmp_path, "not a readable GGUF"),
                        (os.path.join(bundle, "vit.onnx"), "not a little-endian GGUF")):
        with pytest.raises(SamfError, match=words):
            gguf_tensor_infos(str(path))


def test_repacked_and_mapped_4bit_weights_give_the_same_logits(synthetic):
    """``repack`` changes how llama.cpp lays the Q4_K weights out in memory, not what they compute."""
    import numpy as np

    import samf.engines.llama_cpp_engine as E

    bundle, _, _ = synthetic
    path = os.path.join(bundle, "llm-Q4_K_M.gguf")
    default = E._llama_cpp().llama_cpp.llama_model_default_params
    rows = np.random.default_rng(0).normal(0, 0.02, size=(8, 128)).astype(np.float32)
    logits = []
    for repack in (True, False):
        llm = E.LlamaCppLLM(path, n_ctx=128, repack=repack)
        logits.append(llm.generate([1, 32010], rows, [450, 32007, 32001], set(), 4, return_logits=True)["logits"])
        llm.close()
    assert E._llama_cpp().llama_cpp.llama_model_default_params is default  # the choice was for one load only
    assert logits[0].shape == (4, 32064)
    assert np.abs(logits[0] - logits[1]).max() < 1e-3 * np.abs(logits[1]).max() + 1e-4


@pytest.mark.parametrize("edit,words", [
    (lambda m: (m["model"]["image"]["fusion"].update(d_llm=64), m["model"]["llm"].update(hidden_size=64)),
     "the LLM is 128 wide"),
    (lambda m: (m["model"]["image"]["vit"].update(img_size=64), m["preprocess"].update(image_size=64)),
     "vit.onnx takes slices of [3, 48, 48]"),
])
def test_engines_that_do_not_take_what_the_manifest_says_are_refused_at_load(synthetic, tmp_path, edit, words):
    """A manifest edited consistently (and resealed) still has to match the engines it names."""
    import shutil

    from samf.errors import BundleError
    from samf.runtime.bundle.manifest import seal
    from samf.runtime.inference.pipeline import ReportPipeline

    bundle = str(tmp_path / "bundle")
    shutil.copytree(synthetic[0], bundle)
    path = os.path.join(bundle, "manifest.json")
    m = json.load(open(path))
    edit(m)
    json.dump(seal(m), open(path, "w"))
    with pytest.raises(BundleError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ReportPipeline(bundle, quant="Q8_0")
