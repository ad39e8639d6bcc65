"""Build a bundle from a merged checkpoint: ONNX encoders, GGUF LLM (+quantized), manifest; atomically.

Everything is written into ``OUT.tmp-<pid>`` and renamed into place only once every artifact exists and
has been validated, so a failed export never leaves a half bundle, and an existing bundle at ``OUT`` is
only replaced by a complete one. A folder at ``OUT`` that is not a bundle is never replaced.
"""

from __future__ import annotations

import datetime
import json
import os

from samf import __version__
from samf.runtime.atomic import atomic_dir, atomic_file
from samf.runtime.bundle import MANIFEST, SCHEMA_VERSION, sha256_of
from samf.runtime.errors import SamfError
from samf.runtime.prompt import REPORT_REQUESTS

from .gguf_convert import convert_to_gguf, quantize_gguf
from .onnx_export import OPSET, export_onnx


def write_bundle(ckpt_dir: str, out_dir: str, quants=("Q8_0",), keep_unquantized: str = "F32",
                 log=print) -> dict:
    """Export the merged checkpoint at ``ckpt_dir`` into a verified bundle at ``out_dir``; returns the manifest."""
    import llama_cpp
    import onnxruntime

    from samf.engines.llama_cpp_engine import quiet_native_stderr
    from samf.train.vlm import SamfVLM

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise SamfError(f"{out_dir} exists and is not a samf bundle; refusing to replace it (choose another --out)")
    with open(os.path.join(ckpt_dir, "preprocess.json")) as f:
        preprocess = json.load(f)
    vlm = SamfVLM.from_checkpoint(ckpt_dir)
    with atomic_dir(out_dir) as tmp:
        log("export: ONNX (vit, aggregator, fusion) + ONNX Runtime check")
        diffs = export_onnx(vlm, tmp)
        log("export: " + ", ".join(f"{k} max|ORT-torch|={v:.1e}" for k, v in diffs.items()))
        llm_files = {}
        base = f"llm-{keep_unquantized}.gguf"
        log(f"export: GGUF {keep_unquantized}")
        convert_to_gguf(ckpt_dir, os.path.join(tmp, base), keep_unquantized)
        llm_files[keep_unquantized] = base
        for q in quants:
            log(f"export: quantize {q} with llama.cpp")
            name = f"llm-{q}.gguf"
            with quiet_native_stderr():
                quantize_gguf(os.path.join(tmp, base), os.path.join(tmp, name), q)
            llm_files[q] = name
        cfg = vlm.llm.config
        image_cfg = vlm.image_cfg.to_dict()
        manifest = dict(
            schema=SCHEMA_VERSION,
            samf_version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source_checkpoint=os.path.abspath(ckpt_dir),
            model=dict(image=image_cfg, image_tokens=image_cfg["aggregator"]["n_tokens"],
                       llm=dict(arch="phi3", hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                                num_hidden_layers=cfg.num_hidden_layers)),
            preprocess=preprocess,
            prompt=dict(layout=vlm.layout.to_dict(), report_requests=list(REPORT_REQUESTS),
                        sequence="[bos] before_image [image x N] prompt_text after_prompt | answer answer_end"),
            llm=dict(default=quants[0] if quants else keep_unquantized, files=llm_files),
            engines=dict(onnxruntime=dict(version=onnxruntime.__version__, opset=OPSET),
                         llama_cpp=dict(llama_cpp_python=llama_cpp.__version__), tensorrt=[]),
            fidelity=dict(onnx_max_abs_diff=diffs),
        )
        manifest["files"] = {n: dict(sha256=sha256_of(os.path.join(tmp, n)), size=os.path.getsize(os.path.join(tmp, n)))
                             for n in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    return manifest


def update_manifest(bundle_dir: str, update) -> dict:
    """Apply ``update(manifest)`` and rehash the listed files; the manifest is replaced atomically."""
    path = os.path.join(bundle_dir, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    update(manifest)
    for name in list(manifest["files"]):
        p = os.path.join(bundle_dir, name)
        manifest["files"][name] = dict(sha256=sha256_of(p), size=os.path.getsize(p))
    with atomic_file(path) as f:
        json.dump(manifest, f, indent=2)
    return manifest
