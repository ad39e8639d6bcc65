"""The LLM is whatever folder the user points at: its own tokenizer, end tokens and chat template, from training
to the GGUF, checked with Phi-3-mini's real vocabulary and llama.cpp's own tokenizer test vectors."""

import json
import os
import shutil

import pytest
from cli_runner import invoke_cli
from phi3_folder import ADDED, tokenizer_vectors, write_phi3_folder

from samf.runtime.inference.prompt import REPORT_REQUESTS, mcq_answer, mcq_request
from samf.train.llm_folder import LLMFolderError, LLMTokenizer
from samf.train.run_files import TOKENIZER_MODEL

END, USER, ASSISTANT, ENDOFTEXT = 32007, 32010, 32001, 32000
LM_STEPS, FT_STEPS = 300, 200


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A small Phi-3 (hidden 64, 1 layer) with the real vocabulary and chat template, saved in bf16."""
    return write_phi3_folder(str(tmp_path_factory.mktemp("phi3") / "llm"), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=1, num_attention_heads=4)


@pytest.fixture(scope="module")
def phi3_gguf(phi3, tmp_path_factory):
    from samf.export.gguf_convert import convert_to_gguf

    return convert_to_gguf(phi3, str(tmp_path_factory.mktemp("gguf") / "llm.gguf"), "F32")


def _corpus() -> list:
    """Report requests, phantom reports, questions and answers: the text the LLM reads and writes."""
    import numpy as np

    from samf.runtime.tools.phantom import sample_findings, write_questions, write_report

    rng = np.random.default_rng(0)
    texts = list(REPORT_REQUESTS)
    for _ in range(40):
        f = sample_findings(rng)
        texts.append(write_report(f, rng))
        for q in write_questions(f, rng):
            texts += [mcq_request(q["question"], q["choices"]), mcq_answer(q["answer"], q["choices"])]
    return texts


def test_the_layout_is_phi3s_chat_template(phi3):
    lay = LLMTokenizer(phi3).layout
    assert lay.chat_template and lay.bos == 1
    assert lay.before_image == (USER,)                 # the image rows open the user turn
    assert lay.prompt_format == "{request}"
    assert lay.after_prompt == (END, ASSISTANT)       # <|end|> <|assistant|> (the folder's tokenizer drops "\n")
    assert lay.answer_end == END                       # training teaches <|end|>, generation stops on it ...
    assert {END, ASSISTANT, ENDOFTEXT} <= lay.stop_ids()  # ... and on every end token generation_config names
    assert lay.notes["before_image"] == "<|user|>\n"


def test_the_plain_layout_without_a_chat_template(phi3, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(phi3, folder)
    cfg = json.load(open(folder / "tokenizer_config.json"))
    del cfg["chat_template"]
    json.dump(cfg, open(folder / "tokenizer_config.json", "w"))
    lay = LLMTokenizer(str(folder)).layout
    assert not lay.chat_template and lay.before_image == lay.after_prompt == ()
    assert lay.prompt_text("Describe.") == "Question: Describe. Answer:" and lay.answer_end == ENDOFTEXT


def test_gguf_tokenizer_gives_llama_cpps_expected_ids_and_the_folders(phi3, phi3_gguf):
    """llama.cpp's own test vectors on the GGUF we wrote; the folder's tokenizer (transformers) agrees with it on
    report text; special tokens keep their ids and are CONTROL tokens."""
    from samf.engines.llama_cpp_engine import LlamaCppLLM

    llm = LlamaCppLLM(phi3_gguf, n_ctx=256)
    try:
        vectors = tokenizer_vectors()
        assert len(vectors) >= 46
        for text, ids in vectors:
            assert llm.tokenize(text) == ids, repr(text)
        tok = LLMTokenizer(phi3)
        for text in _corpus():
            assert llm.tokenize(text) == tok.encode(text), text
        raw = llm.llm.tokenize(b"<|user|>x<|end|>", add_bos=False, special=True)
        assert raw[0] == USER and raw[-1] == END
    finally:
        llm.close()


def test_gguf_end_tokens_and_template_are_the_folders(phi3, phi3_gguf):
    import gguf

    fields = gguf.GGUFReader(phi3_gguf).fields
    value = {k: fields[k].contents() for k in fields if k.startswith("tokenizer.") and "ggml.token" not in k
             and "scores" not in k and "merges" not in k}
    assert value["tokenizer.ggml.bos_token_id"] == 1
    assert value["tokenizer.ggml.eos_token_id"] == ENDOFTEXT
    assert value["tokenizer.ggml.eot_token_id"] == END
    assert value["tokenizer.chat_template"] == LLMTokenizer(phi3).hf.chat_template
    tokens = fields["tokenizer.ggml.tokens"]
    names = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert len(names) == 32064 and all(names[i] == c for i, c in ADDED.items())
    types = fields["tokenizer.ggml.token_type"]
    assert all(int(types.parts[types.data[i]][0]) == gguf.TokenType.CONTROL for i in ADDED)


def _broken(phi3, tmp_path, change) -> str:
    folder = tmp_path / "llm"
    shutil.copytree(phi3, folder)
    change(folder)
    return str(folder)


def _edit_json(path, **kv):
    d = json.load(open(path))
    d.update(kv)
    json.dump(d, open(path, "w"))


@pytest.mark.parametrize("what, change, message", [
    ("no tokenizer", lambda f: [os.remove(f / n) for n in (TOKENIZER_MODEL, "tokenizer.json")], "has no tokenizer"),
    ("tokenizer larger than the model", lambda f: _edit_json(f / "config.json", vocab_size=32000),
     "tokenizer has 32011 tokens but config.json's vocab_size is 32000"),
    ("no config", lambda f: os.remove(f / "config.json"), "not an LLM folder"),
])
def test_a_folder_samf_cannot_use_is_refused_in_one_line(phi3, tmp_path, what, change, message):
    with pytest.raises(LLMFolderError, match=message):
        LLMTokenizer(_broken(phi3, tmp_path, change))


def test_the_command_line_refuses_such_a_folder_before_writing_anything(phi3, tmp_path):
    """One case through ``samf-train init`` (every refusal above is the same LLMFolderError on its way out)."""
    folder = _broken(phi3, tmp_path, lambda f: _edit_json(f / "config.json", vocab_size=32000))
    run = str(tmp_path / "run")
    # In this process (the message and the exit code are what is tested): a fresh one imports torch and transformers.
    proc = invoke_cli("samf-train", "init", "--run", run, "--preset", "paper", "--llm-path", folder)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "vocab_size is 32000" in lines[0]
    assert not os.path.exists(run)                    # refused before anything was written


@pytest.mark.slow
def test_a_phi3_with_the_real_vocabulary_learns_to_stop_in_torch_and_in_the_runtime(tmp_path):
    """A small Phi-3 with the real vocabulary and chat template, trained on phantoms the way the demo trains its
    tiny model (continued LM pretraining on the report language, then SAMF + LoRA), writes reports that end on
    an end token well before the token limit, and the runtime's report (F32 GGUF, greedy) is the PyTorch one."""
    import torch

    from samf.export.bundle_writer import write_bundle
    from samf.runtime.inference.pipeline import ReportPipeline
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.runtime.tools.phantom import generate_phantom_dataset
    from samf.train import finetune as FT
    from samf.train import merge as M
    from samf.train import run_folder as R
    from samf.train import stages as S
    from samf.train.data import load_split
    from samf.train.dino import DinoConfig
    from samf.train.vlm import SamfVLM, prompt_ids

    llm = write_phi3_folder(str(tmp_path / "phi3"))          # hidden 128, 2 layers, bf16, random weights
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    generate_phantom_dataset(data, 120, 4, seed=2, progress=False)
    R.init_run(run, R.tiny_preset(llm))
    pre = PreprocessConfig.from_dict(R.read_run(run)["preprocess"])
    train, test = load_split(data, "train", pre, progress=False), load_split(data, "test", pre, progress=False)
    S.stage_pretrain_2d(run, train, DinoConfig(steps=5), progress=False)
    S.stage_pretrain_lm(run, train, S.LMConfig(steps=LM_STEPS), progress=False)
    FT.stage_finetune(run, train, FT.FinetuneConfig(steps=FT_STEPS), progress=False)
    merged = M.stage_merge(run)
    bundle = str(tmp_path / "bundle")
    write_bundle(merged, bundle, quants=(), keep_unquantized="F32", log=lambda m: None)

    vlm = SamfVLM.from_checkpoint(merged)
    tok = R.base_tokenizer(run)
    assert vlm.layout.answer_end == END and vlm.layout.chat_template
    prompt = prompt_ids(tok, REPORT_REQUESTS[0])
    pipe = ReportPipeline(bundle, quant="F32", encoders="fp32")  # PyTorch runs the fp32 encoders
    try:
        for ex in test:
            ids, logits = vlm.generate(torch.from_numpy(ex.slices), prompt, 200, return_logits=True)
            assert int(logits[-1].argmax()) == END and len(ids) < 200   # it stopped itself, on <|end|>
            res = pipe.report(os.path.join(data, ex.image), max_new_tokens=200)
            assert res.token_ids == ids and res.text == tok.decode(ids)
            assert "nodule" in res.text or "effusion" in res.text, res.text  # report language, not noise
    finally:
        pipe.close()
