"""The paper preset end to end, as a team with Phi-3-mini would run it: ViT-B/16 at 224², and an LLM folder of
Phi-3-mini's real width and vocabulary (two layers, random weights, bf16 as the hub ships it), through every
command from ``init`` to ``samf report`` and ``samf vqa``, within 16 GB."""

import json
import os
import resource
import time

import pytest
from cli_runner import run_cli
from phi3_folder import MINI, write_phi3_folder

from samf.train.run_files import MERGED_DIR

GB = 1 << 30


def _cli(tool, *args):
    t = time.time()
    proc = run_cli(tool, *args, timeout=1200)
    assert proc.returncode == 0, f"{tool} {args[0]}: {proc.stderr[-3000:]}"
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)  # the largest child so far
    print(f"{tool} {args[0]}: {time.time() - t:.0f} s, peak RSS of the commands so far {peak:.2f} GB")
    return proc.stdout


@pytest.mark.slow
def test_paper_preset_from_init_to_report_within_16_gb(tmp_path):
    import torch

    from samf.runtime.inference.prompt import REPORT_REQUESTS
    from samf.runtime.scan.preprocess import PreprocessConfig
    from samf.runtime.tools.phantom import generate_phantom_dataset
    from samf.train import run_folder as R
    from samf.train.data import load_split
    from samf.train.vlm import SamfVLM, prompt_ids

    llm = write_phi3_folder(str(tmp_path / "phi3-mini"), num_hidden_layers=2, **MINI)
    data, run, bundle = (str(tmp_path / d) for d in ("data", "run", "bundle"))
    common = ["--data", data, "--run", run, "--quiet"]
    generate_phantom_dataset(data, 8, 1, seed=4, progress=False)
    _cli("samf-train", "init", "--run", run, "--preset", "paper", "--llm-path", llm)
    _cli("samf-train", "pretrain-2d", *common, "--steps", "2")
    _cli("samf-train", "finetune", *common, "--steps", "2")
    _cli("samf-train", "merge", "--run", run)
    merged = os.path.join(run, MERGED_DIR)
    # The encoder variants checked on 2 phantoms, 8 tokens each (the default 20 x 256 takes minutes here).
    _cli("samf-export", "bundle", merged, "--out", bundle, "--quant", "Q8_0", "--quant", "Q4_K_M",
         "--check-scans", "2", "--check-tokens", "8")
    scan = os.path.join(data, "scans", "phantom_00008.nii.gz")
    got = json.loads(_cli("samf", "report", scan, "--bundle", bundle, "--quant", "F32", "--max-tokens", "12",
                          "--json", "--encoders", "fp32"))
    for quant in ("Q8_0", "Q4_K_M"):
        out = json.loads(_cli("samf", "report", scan, "--bundle", bundle, "--quant", quant, "--max-tokens", "12",
                              "--json"))
        assert out["report"] is not None and out["encoders"] in ("bf16", "int8", "fp32")
    vqa = _cli("samf", "vqa", scan, "--bundle", bundle, "--question", "Which side?", "--choice", "left",
               "--choice", "right", "--choice", "both", "--choice", "neither")
    assert vqa.strip()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"peak RSS of the commands: {peak / GB:.2f} GB")
    assert peak < 16 * GB

    manifest = json.load(open(os.path.join(bundle, "manifest.json")))
    assert manifest["model"]["llm"]["hidden_size"] == 3072 and manifest["model"]["llm"]["vocab_size"] == 32064
    assert manifest["prompt"]["layout"]["answer_end"] == 32007
    vlm = SamfVLM.from_checkpoint(merged)                     # the PyTorch pipeline, greedy, same prompt,
    vlm.llm.float()  # in fp32 as the F32 GGUF computes (bf16 arithmetic flips near-ties of a barely trained model)
    tok = R.base_tokenizer(run)
    pre = PreprocessConfig.from_dict(R.read_run(run)["preprocess"])
    ex = load_split(data, "test", pre, progress=False)[0]
    ids = vlm.generate(torch.from_numpy(ex.slices), prompt_ids(tok, REPORT_REQUESTS[0]), 12)
    assert got["report"] == tok.decode(ids)
