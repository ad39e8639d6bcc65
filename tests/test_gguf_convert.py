"""GGUF conversion streams tensors: exact values in the asked type, memory near one tensor, refusals up front."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_runner import run_cli
from phi3_factory import small_phi3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    return {d: small_phi3(root / d, d) for d in ("float32", "bfloat16")}


def _source(ckpt: str) -> dict:
    """GGUF tensor name -> the checkpoint's torch tensor (output.weight from lm_head)."""
    import gguf
    from safetensors.torch import load_file

    state = load_file(os.path.join(ckpt, "model.safetensors"))
    n_layer = json.load(open(os.path.join(ckpt, "config.json")))["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, n_layer)
    return {names.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in state.items()}


@pytest.mark.parametrize("outtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("src", ["float32", "bfloat16"])
def test_gguf_tensors_equal_the_checkpoint(checkpoints, tmp_path, src, outtype):
    import gguf
    import torch

    from samf.export.gguf_convert import convert_to_gguf

    out = convert_to_gguf(checkpoints[src], str(tmp_path / "m.gguf"), outtype)
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary left behind
    reader = gguf.GGUFReader(out)
    ftype = reader.fields["general.file_type"]
    assert int(ftype.parts[ftype.data[0]][0]) == {"F32": 0, "F16": 1, "BF16": 32}[outtype]
    source = _source(checkpoints[src])
    assert {t.name for t in reader.tensors} == set(source)
    for t in reader.tensors:
        ref = source[t.name]
        want = outtype if ref.ndim == 2 else "F32"  # norms stay F32, as llama.cpp's converter keeps them
        assert t.tensor_type.name == want, t.name
        if want == "BF16":
            got = np.asarray(t.data).view(np.uint16).reshape(ref.shape)
            exp = ref.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            if src == "float32":  # rounded, not truncated garbage: within half a bf16 step of the source
                wide = torch.from_numpy(got.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
                assert np.all(np.abs(wide - ref.numpy()) <= np.abs(ref.numpy()) * 2.0 ** -8)
        else:
            got = np.asarray(t.data).reshape(ref.shape)
            exp = ref.float().numpy().astype(np.float16 if want == "F16" else np.float32)
        assert got.dtype == exp.dtype and np.array_equal(got, exp), t.name


def test_a_failed_conversion_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    from samf.export import gguf_convert

    real, calls = gguf_convert._read_tensor, []

    def failing(*a):
        calls.append(a)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*a)

    monkeypatch.setattr(gguf_convert, "_read_tensor", failing)
    with pytest.raises(OSError):
        gguf_convert.convert_to_gguf(checkpoints["float32"], str(tmp_path / "m.gguf"), "F16")
    assert os.listdir(tmp_path) == []


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so the child would start at pytest's own peak.
RSS_SCRIPT = """
import sys
import gguf, numpy, safetensors, sentencepiece, torch  # the converter's own imports, in the baseline
from samf.export.gguf_convert import convert_to_gguf
def peak():
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
before = peak()
convert_to_gguf(sys.argv[1], sys.argv[2], sys.argv[3])
print(before, peak())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux's /proc")
def test_conversion_memory_does_not_grow_with_the_model(tmp_path):
    """A ~210 MB fp32 checkpoint to F16: the peak grows by about one tensor, not by the model (it was 309 MB)."""
    ckpt = small_phi3(tmp_path / "big", "float32", hidden=1024, intermediate=2048, layers=5)
    size = os.path.getsize(os.path.join(ckpt, "model.safetensors"))
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, ckpt, str(tmp_path / "big.gguf"), "F16"],
                          capture_output=True, text=True, check=True)
    before, after = (int(x) * 1024 for x in proc.stdout.split())  # kB
    print(f"checkpoint {size / 1e6:.0f} MB, peak RSS {before / 1e6:.0f} -> {after / 1e6:.0f} MB while converting")
    assert after - before < 0.5 * size
    assert os.path.getsize(tmp_path / "big.gguf") < 0.55 * size  # F16: half the fp32 bytes, plus the vocab


def _edited(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


@pytest.mark.parametrize("changes, words", [
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 16, "long_factor": [1.0] * 16}), "LongRoPE"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0}), "LongRoPE"),
    (dict(architectures=["LlamaForCausalLM"], model_type="llama"), "LlamaForCausalLM"),
])
def test_gguf_cli_refuses_what_it_cannot_convert(checkpoints, tmp_path, changes, words):
    ckpt = _edited(checkpoints["float32"], tmp_path / "model-128k", **changes)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    proc = run_cli("samf-export", "gguf", ckpt, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert ckpt in lines[0] and words in lines[0], lines[0]
    assert os.listdir(out.parent) == []
