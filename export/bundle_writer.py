"""Build a bundle from a merged checkpoint: ONNX encoders, GGUF LLM (+quantized), manifest; atomically.

Everything is written into ``OUT.tmp-<pid>`` and renamed into place only once every artifact exists and
has been validated, so a failed export never leaves a half bundle, and an existing bundle at ``OUT`` is
only replaced by a complete one. A folder at ``OUT`` that is not a bundle is never replaced.

Memory stays near the size of one tensor whatever the LLM's size: the LLM is never loaded in PyTorch (the ONNX
export needs only the image modules), the GGUF is written and checked one tensor at a time, and llama.cpp
quantizes from the GGUF. Each artifact is validated against its source right after it is made: ONNX Runtime
against PyTorch (each output relative to its own size: :data:`~samf.export.onnx_export.ONNX_AGREEMENT`), the
GGUF tensor by tensor against the safetensors, each quantized GGUF against the unquantized one, and the fp16 and
int8 encoders against the fp32 ones with the runtime's own pipeline (:mod:`samf.export.encoder_variants`; a
variant that misses its tolerance is not written). The hashes written into the manifest are remembered as
verified, so the first start after an export does not hash the bundle again.
"""

from __future__ import annotations

import datetime
import json
import os

from samf import __version__
from samf.errors import SamfError
from samf.runtime.atomic import atomic_dir
from samf.runtime.bundle.bundle import MANIFEST, SCHEMA_VERSION, sha256_of
from samf.runtime.bundle.manifest import seal
from samf.runtime.bundle.verified import VerifiedCache
from samf.runtime.inference.prompt import REPORT_REQUESTS
from samf.train.run_files import PREPROCESS_FILE, TRAINING_FILE

from .configs import BundleConfig, VariantCheck
from .encoder_variants import add_encoder_variants, variant_files
from .gguf_convert import check_gguf_against_checkpoint, check_quantized_gguf, convert_to_gguf, quantize_gguf
from .onnx_export import OPSET, export_onnx_checked, io_signature


def write_bundle(ckpt_dir: str, out_dir: str, quants=BundleConfig.quants, keep_unquantized: str = BundleConfig.base,
                 check: VariantCheck | None = None, log=print) -> dict:
    """Export the merged checkpoint at ``ckpt_dir`` into a verified bundle at ``out_dir``; returns the manifest.

    ``quants`` and ``keep_unquantized``: :class:`~samf.export.configs.BundleConfig`'s ``quants`` and ``base``.
    ``check``: which encoder precisions besides fp32 to make and how to check them (default: ``VariantCheck()``,
    the defaults of ``samf-export bundle``)."""
    import llama_cpp
    import onnxruntime

    from samf.engines.llama_cpp_engine import token_embd_location
    from samf.engines.native import quiet_native_stderr
    from samf.train.llm_folder import read_llm_config
    from samf.train.vlm import SamfVLM

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise SamfError(f"{out_dir} exists and is not a samf bundle; refusing to replace it (choose another --out)")
    with open(os.path.join(ckpt_dir, PREPROCESS_FILE)) as f:
        preprocess = json.load(f)
    llm_cfg = read_llm_config(ckpt_dir)
    vlm = SamfVLM.from_checkpoint(ckpt_dir, with_llm=False)
    with atomic_dir(out_dir) as tmp:
        log("export: ONNX (vit, aggregator, fusion) + ONNX Runtime check")
        onnx_figures = export_onnx_checked(vlm, tmp)
        log("export: " + ", ".join(f"{k} max|ORT-torch|={v['max_abs_diff']:.1e} ({v['rel_diff']:.1e} of the "
                                   f"largest output)" for k, v in onnx_figures.items()))
        llm_files = {}
        base = f"llm-{keep_unquantized}.gguf"
        log(f"export: GGUF {keep_unquantized}")
        convert_to_gguf(ckpt_dir, os.path.join(tmp, base), keep_unquantized)
        n = check_gguf_against_checkpoint(ckpt_dir, os.path.join(tmp, base), keep_unquantized)
        log(f"export: {base}: all {n} tensors equal the checkpoint's in {keep_unquantized}")
        llm_files[keep_unquantized] = base
        gguf_fidelity = {keep_unquantized: "bit-exact"}
        for q in quants:
            log(f"export: quantize {q} with llama.cpp")
            name = f"llm-{q}.gguf"
            with quiet_native_stderr():
                quantize_gguf(os.path.join(tmp, base), os.path.join(tmp, name), q)
            errs = check_quantized_gguf(os.path.join(tmp, base), os.path.join(tmp, name))
            log(f"export: {name}: relative RMS error against {base}: "
                + ", ".join(f"{t} {e:.3f}" for t, e in sorted(errs.items()) if t != "F32"))
            llm_files[q] = name
            gguf_fidelity[q] = {t: round(e, 5) for t, e in sorted(errs.items())}
        image_cfg = vlm.image_cfg.to_dict()
        manifest = dict(
            schema=SCHEMA_VERSION,
            samf_version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source_checkpoint=os.path.abspath(ckpt_dir),
            model=dict(image=image_cfg, image_tokens=image_cfg["aggregator"]["n_tokens"],
                       llm=dict(arch="phi3", hidden_size=llm_cfg["hidden_size"], vocab_size=llm_cfg["vocab_size"],
                                num_hidden_layers=llm_cfg["num_hidden_layers"])),
            preprocess=preprocess,
            prompt=dict(layout=vlm.layout.to_dict(), report_requests=list(REPORT_REQUESTS),
                        sequence="[bos] before_image [image x N] prompt_text after_prompt | answer answer_end"),
            llm=dict(default=quants[0] if quants else keep_unquantized, files=llm_files,
                     token_embd={q: token_embd_location(os.path.join(tmp, n)) for q, n in llm_files.items()}),
            encoders=dict(fp32=dict(files=variant_files("fp32"))),
            # Every precision keeps these (fp16 and int8 graphs take and give fp32).
            io_signature={m: io_signature(os.path.join(tmp, f)) for m, f in variant_files("fp32").items()},
            engines=dict(onnxruntime=dict(version=onnxruntime.__version__, opset=OPSET),
                         llama_cpp=dict(llama_cpp_python=llama_cpp.__version__), tensorrt=[]),
            # onnx: each module's figures and the bound they were held to; onnx_max_abs_diff: the same worst
            # absolute differences under their old key (samf demo's summary reads it).
            fidelity=dict(onnx=onnx_figures, onnx_max_abs_diff={k: v["max_abs_diff"] for k, v in onnx_figures.items()},
                          gguf_relative_rms_error=gguf_fidelity),
        )
        training = os.path.join(ckpt_dir, TRAINING_FILE)
        if os.path.exists(training):  # the recipe's switches (train/merge.py: training_record)
            with open(training) as f:
                manifest["training"] = json.load(f)
        _write_manifest(tmp, manifest)  # the variants are checked by the runtime, which reads it
        kept, rejected = add_encoder_variants(tmp, keep_unquantized, check or VariantCheck(), log)
        manifest["encoders"].update(kept)
        if rejected:
            manifest["fidelity"]["encoders_rejected"] = rejected
        _write_manifest(tmp, manifest)
    remember_verified(out_dir, manifest)
    return manifest


def _write_manifest(tmp: str, manifest: dict) -> None:
    """List every file in ``tmp`` with its sha256 and size (reusing the entries of files already listed at the
    same size: this process wrote them) and write the sealed manifest."""
    known = manifest.get("files", {})
    files = {}
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        if name == MANIFEST or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        files[name] = known[name] if known.get(name, {}).get("size") == size else dict(sha256=sha256_of(path),
                                                                                       size=size)
    manifest["files"] = files
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(seal(manifest), f, indent=2)


def remember_verified(bundle_dir: str, manifest: dict) -> None:
    """Record the files this process just hashed as verified, so the first start does not hash them again.

    Their bytes were written and hashed by this process a moment before; the cache keys each on its stat now,
    so any later change is still caught on the next use."""
    cache = VerifiedCache()
    for name, meta in manifest["files"].items():
        path = os.path.join(bundle_dir, name)
        cache.add(path, meta["sha256"], cache.stamp(path))
    cache.save()
