"""The fidelity contract: every exported artifact agrees with the PyTorch model it came from."""

import json
import os

import numpy as np
import pytest
import torch

from samf.errors import SamfError
from samf.runtime.inference.prompt import REPORT_REQUESTS, format_prompt


@pytest.fixture(scope="module")
def vlm(quick):
    from samf.train.vlm import SamfVLM

    return SamfVLM.from_checkpoint(quick.merged)


@pytest.fixture(scope="module")
def tok(quick):
    from samf.train.llm_folder import LLMTokenizer

    return LLMTokenizer(quick.merged)


@pytest.fixture(scope="module")
def prompt(tok):
    from samf.train.vlm import prompt_ids

    return prompt_ids(tok, REPORT_REQUESTS[0])


@pytest.fixture(scope="module")
def llm_f32(quick):
    from samf.engines.llama_cpp_engine import LlamaCppLLM

    llm = LlamaCppLLM(os.path.join(quick.bundle, "llm-F32.gguf"), n_ctx=512, n_batch=8)
    yield llm
    llm.close()


def test_merged_checkpoint_is_plain_hugging_face(quick):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(quick.merged)
    assert type(m).__name__ == "Phi3ForCausalLM"
    assert not any("lora" in k for k in m.state_dict())


@pytest.mark.parametrize("name", ["vit", "aggregator", "fusion"])
def test_onnx_runtime_matches_pytorch(vlm, quick, name):
    """On 4 other inputs, within the export's bound (relative to each output's size); the manifest records the
    export's own figures, every output's, and the bound they were held to."""
    from samf.export.onnx_export import ONNX_AGREEMENT, module_specs, validate_onnx

    spec = next(s for s in module_specs(vlm) if s.name == name)
    fig = validate_onnx(spec, os.path.join(quick.bundle, f"{name}.onnx"), seeds=(11, 12, 13, 14))
    assert ONNX_AGREEMENT.misses(fig) is None, fig
    assert set(fig["outputs"]) == set(spec.outputs) and fig["inputs"] == 4
    manifest = json.load(open(os.path.join(quick.bundle, "manifest.json")))
    recorded = manifest["fidelity"]["onnx"][name]
    assert recorded["bound"] == dict(rel_diff=ONNX_AGREEMENT.rel_diff, cos_min=ONNX_AGREEMENT.cos_min)
    assert ONNX_AGREEMENT.misses(recorded) is None and set(recorded["outputs"]) == set(spec.outputs)
    assert manifest["fidelity"]["onnx_max_abs_diff"][name] == recorded["max_abs_diff"]  # the older key, kept


def test_vit_onnx_on_real_slices(vlm, quick):
    """Real slices sit near the standardisation's mean, where dividing by the standard deviations makes rounding as
    large as the values: the bound holds on the CLS vectors the rounding happened in (``OnnxSpec.units``)."""
    from samf.engines.onnxruntime_engine import OrtModule
    from samf.export.encoder_variants import AgreementMeter
    from samf.export.onnx_export import ONNX_AGREEMENT, module_specs

    x = quick.test[0].slices
    got = OrtModule(os.path.join(quick.bundle, "vit.onnx"))(slices=x)
    with torch.no_grad():
        ref = vlm.encoder.embed_slices(torch.from_numpy(x)).numpy()
    meter = AgreementMeter()
    meter.add(dict(z2d=ref), dict(z2d=got), module_specs(vlm)[0].units)
    assert ONNX_AGREEMENT.misses(meter.figures()) is None, meter.figures()


def test_llama_cpp_tokenizer_matches_the_folders_tokenizer(quick, tok, llm_f32):
    """llama.cpp (GGUF vocabulary) and the merged folder's own tokenizer (transformers) and the SentencePiece
    model it was built from cut every text of the corpus into the same ids."""
    import sentencepiece as spm

    from samf.train.data import text_corpus
    from samf.train.run_files import TOKENIZER_MODEL

    sp = spm.SentencePieceProcessor(model_file=os.path.join(quick.merged, TOKENIZER_MODEL))
    texts = text_corpus(quick.test) + [format_prompt(r) for r in REPORT_REQUESTS]
    for t in texts:
        assert llm_f32.tokenize(t) == tok.encode(t) == sp.encode(t), t


def test_gguf_token_embeddings_equal_the_checkpoint(quick, vlm):
    from samf.engines.llama_cpp_engine import GGUFTokenEmbeddings

    ids = [1, 5, 17, 300]
    got = GGUFTokenEmbeddings(os.path.join(quick.bundle, "llm-F32.gguf"))(ids)
    ref = vlm.token_embeddings(torch.tensor(ids)).detach().numpy()
    assert np.array_equal(got, ref)


def test_llama_cpp_matches_transformers_with_injected_embeddings(quick, vlm, prompt, llm_f32):
    """Same image prefix and prompt: identical greedy tokens over the whole report, logits close."""
    lay = vlm.layout
    worst = 0.0
    for ex in quick.test[:4]:
        slices = torch.from_numpy(ex.slices)
        ids_t, logits_t = vlm.generate(slices, prompt, 96, return_logits=True)
        with torch.no_grad():
            pid = torch.tensor([prompt])
            prefix = vlm.image_prefix(slices[None], pid, torch.ones_like(pid))[0].numpy()
        out = llm_f32.generate(lay.head(), prefix, lay.tail(prompt), lay.stop_ids(), 96, return_logits=True)
        assert out["ids"] == ids_t
        assert len(ids_t) > 10  # a whole report, not a stub
        worst = max(worst, float(np.abs(out["logits"] - logits_t.numpy()).max()))
    print(f"max |logit llama.cpp - transformers| = {worst:.2e}")
    assert worst < 1e-2, f"max logit difference {worst:.2e}"


def test_runtime_report_equals_pytorch_report(quick, vlm, tok, prompt):
    from samf.runtime.inference.pipeline import ReportPipeline

    pipe = ReportPipeline(quick.bundle, quant="F32", encoders="fp32")
    try:
        for ex in quick.test[:6]:
            ref = tok.decode(vlm.generate(torch.from_numpy(ex.slices), prompt, 256))
            got = pipe.report(os.path.join(quick.data, ex.image)).text
            assert got == ref
    finally:
        pipe.close()


def test_runtime_evidence_is_pytorchs_attention(quick, vlm, prompt):
    """α and the prompt-averaged γ that fusion.onnx hands the runtime are SAMF.attend's on the same scan and prompt,
    and the evidence ranks the slices by them."""
    from samf.runtime.inference.pipeline import ReportPipeline

    pipe = ReportPipeline(quick.bundle, quant="F32", encoders="fp32")
    try:
        assert pipe.has_attention
        for ex in quick.test[:3]:
            ev = pipe.report(os.path.join(quick.data, ex.image), max_new_tokens=1).evidence
            with torch.no_grad():
                z2d, z3d = vlm.encoder(torch.from_numpy(ex.slices)[None])
                text = vlm.token_embeddings(torch.tensor([prompt]))
                _, alpha, gamma = vlm.fusion.attend(z2d, z3d, text, torch.ones(1, len(prompt)))
            assert np.abs(ev.alpha - alpha[0].numpy()).max() < 1e-5
            assert np.abs(ev.gamma - gamma[0].numpy()).max() < 1e-5
            S = ev.slices_per_plane
            for p in range(3):
                score = (alpha[0] + gamma[0]).numpy()[p * S:(p + 1) * S]
                assert ev.top(p, 1) == [int(np.argmax(score))]
    finally:
        pipe.close()


def test_runtime_answer_equals_pytorch_answer(quick, vlm, tok):
    """A multiple-choice answer, both ways: generated, the same greedy text as PyTorch (24 tokens, as evaluation
    generates) and the letter the parser reads from it; chosen (the default), the same likeliest of the four as
    PyTorch's teacher-forced losses pick, with scores that agree to float noise (that a trained model answers with
    a letter is test_learning's)."""
    from samf.runtime.inference.pipeline import ReportPipeline
    from samf.runtime.inference.prompt import mcq_answer, mcq_choice_of
    from samf.train.vlm import choose_mcq, generate_mcq, mcq_sample

    ex = quick.test[0]
    refs, _ = generate_mcq(vlm, tok, [ex])
    chosen, _ = choose_mcq(vlm, tok, [ex])
    assert ex.questions and len(refs) == len(ex.questions) == len(chosen)
    x = torch.from_numpy(ex.slices)[None]
    with ReportPipeline(quick.bundle, quant="F32", encoders="fp32") as pipe:
        for q, ref, pick in zip(ex.questions, refs, chosen):
            scan = os.path.join(quick.data, ex.image)
            letter, res = pipe.answer(scan, q["question"], q["choices"], 24, method="generate")
            assert res.text == ref and letter == mcq_choice_of(ref)
            letter, res = pipe.answer(scan, q["question"], q["choices"])
            assert res.text == pick == mcq_answer(letter, q["choices"]) and set(res.choice_nll) == set("ABCD")
            with torch.no_grad():
                torch_nll = [float(vlm(x, [mcq_sample(tok, q)[0]], [tok.encode(mcq_answer(c, q["choices"]))]))
                             for c in "ABCD"]
            assert np.allclose(list(res.choice_nll.values()), torch_nll, rtol=1e-3, atol=1e-3), (res.choice_nll,
                                                                                                torch_nll)
    with ReportPipeline(quick.bundle, quant="F32", encoders="fp32") as pipe, pytest.raises(SamfError, match="method"):
        pipe.answer(os.path.join(quick.data, ex.image), "Q?", ["a", "b", "c", "d"], method="vote")


@pytest.mark.slow
def test_quantized_q8_mostly_agrees(trained):
    """Q8_0 is allowed to differ; how much is measured here (and in benchmarks/), not assumed. On the trained
    model: the nearly flat logits of a barely trained one flip under any quantization."""
    from samf.runtime.inference.pipeline import ReportPipeline
    from samf.runtime.tools.phantom import parse_report

    texts = {}
    for q in ("F32", "Q8_0"):
        pipe = ReportPipeline(trained.bundle, quant=q, encoders="fp32")
        texts[q] = [pipe.report(os.path.join(trained.data, ex.image)).text for ex in trained.test]
        pipe.close()
    pairs = list(zip(texts["F32"], texts["Q8_0"]))
    same = sum(a == b for a, b in pairs)
    same_findings = sum(parse_report(a) == parse_report(b) for a, b in pairs)
    # All 48 held-out scans, not the first 6: those held 3 of the 6 differing reports of a run whose 48 gave 42
    # (2026-12-04; the demo's model: 176/200). The floor is 3 in 4 (it was 4 in 6).
    print(f"Q8_0 == F32: {same}/{len(pairs)} reports, {same_findings}/{len(pairs)} findings")
    assert same >= 0.75 * len(pairs), f"Q8_0 report equals F32 report for only {same}/{len(pairs)} scans"


def test_llama_cpp_loss_matches_transformers(quick, vlm, tok, prompt):
    """Teacher-forced loss of the reference report: the runtime's figure equals the training loss."""
    from samf.runtime.inference.pipeline import ReportPipeline

    pipe = ReportPipeline(quick.bundle, quant="F32", encoders="fp32")
    try:
        for ex in quick.test[:3]:
            with torch.no_grad():
                ref = vlm(torch.from_numpy(ex.slices)[None], [prompt], [tok.encode(ex.report)])
            got = pipe.report_nll(os.path.join(quick.data, ex.image), ex.report)
            assert abs(got - float(ref)) < 1e-3, (got, float(ref))
    finally:
        pipe.close()


def test_vqa_command_answers_both_ways(quick):
    from cli_runner import invoke_cli, run_cli

    from samf.runtime.inference.pipeline import ReportPipeline

    ex = quick.test[0]
    q, scan = ex.questions[0], os.path.join(quick.data, ex.image)
    args = ["samf", "vqa", scan, "--bundle", quick.bundle, "--quant", "F32", "--encoders", "fp32",
            "--question", q["question"], *[a for c in q["choices"] for a in ("--choice", c)]]
    with ReportPipeline(quick.bundle, quant="F32", encoders="fp32") as pipe:
        for method in ("choices", "generate"):
            letter, res = pipe.answer(scan, q["question"], q["choices"], method=method)
            # `samf vqa` in a fresh interpreter once, then in this process (invoke_cli): the same answer both ways
            out = run_cli(*args) if method == "choices" else invoke_cli(*args, "--method", method)
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == f"{letter or '?'}  ({res.text})"
