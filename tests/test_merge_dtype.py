"""Phi-3 is loaded, fine-tuned and merged in the dtype its checkpoint was saved in: bf16 stays bf16."""

import json
import os
import shutil

import pytest

from samf.train.run_files import FINETUNE_DIR, LM_BASE_DIR, TOKENIZER_DIR


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.runtime.tools.phantom import generate_phantom_dataset
    from samf.train import run_folder as R
    from samf.train.data import load_split

    data = str(tmp_path_factory.mktemp("data"))
    generate_phantom_dataset(data, 4, 0, seed=3, progress=False)
    return load_split(data, "train", PreprocessConfig.from_dict(R.tiny_preset()["preprocess"]), progress=False)


def _merged(run, examples, dtype: str) -> tuple:
    """A tiny run whose language base (bf16-representable weights) is saved in ``dtype``: tokenizer,
    2 fine-tune steps, merge. Returns the merged folder and the losses."""
    import torch

    from samf.train import finetune as FT
    from samf.train import merge as M
    from samf.train import run_folder as R
    from samf.train import stages as S
    from samf.train.data import text_corpus
    from samf.train.vlm import TinyLLMConfig, build_phi3

    R.init_run(run, R.tiny_preset())
    sp = S.stage_tokenizer(run, text_corpus(examples), vocab_size=400)
    torch.manual_seed(0)
    llm = build_phi3(sp.vocab_size(), TinyLLMConfig(**R.read_run(run)["llm"])).to(torch.bfloat16)
    llm.to(getattr(torch, dtype)).save_pretrained(os.path.join(run, LM_BASE_DIR))
    shutil.copytree(os.path.join(run, TOKENIZER_DIR), os.path.join(run, LM_BASE_DIR), dirs_exist_ok=True)
    losses = FT.stage_finetune(run, examples, FT.FinetuneConfig(steps=2, batch_size=2, save_every=1000), progress=False)
    return M.stage_merge(run), losses


def _dtypes(path: str) -> set:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_bf16_base_merges_to_a_bf16_checkpoint_half_the_size(tmp_path, examples):
    import torch

    from samf.train.vlm import SamfVLM

    sizes, losses = {}, {}
    for dtype, st in (("float32", "F32"), ("bfloat16", "BF16")):
        merged, losses[dtype] = _merged(str(tmp_path / dtype), examples, dtype)
        weights = os.path.join(merged, "model.safetensors")
        assert _dtypes(weights) == {st}
        assert json.load(open(os.path.join(merged, "config.json")))["dtype"] == dtype
        adapter = os.path.join(tmp_path, dtype, FINETUNE_DIR, "adapter_model.safetensors")
        assert _dtypes(adapter) == {"F32"}  # LoRA weights trained in fp32 over either base
        sizes[dtype] = os.path.getsize(weights)
        vlm = SamfVLM.from_checkpoint(merged)  # loads in its own dtype and still runs on CPU
        assert vlm.llm.dtype == getattr(torch, dtype)
        ids = vlm.generate(torch.from_numpy(examples[0].slices), [5, 6, 7], max_new_tokens=3)
        assert len(ids) <= 3
    assert losses["bfloat16"] == losses["float32"]  # same values: on CPU the bf16 base trained in fp32
    print(f"merged LLM: fp32 {sizes['float32'] / 1e6:.2f} MB, bf16 {sizes['bfloat16'] / 1e6:.2f} MB")
    assert 0.45 < sizes["bfloat16"] / sizes["float32"] < 0.55
