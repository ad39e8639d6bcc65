"""A random-weight model of the real shapes, exported into an ordinary bundle: for measuring latency and
throughput on a hospital's own machine before it has trained weights (``samf-export synthetic-bundle``).

The checkpoint is laid out as ``samf-train merge`` writes one (a Phi-3 folder with its tokenizer, the image
modules, their config and the preprocessing), so the bundle goes through the same :func:`write_bundle`, with
the same validation, as a trained model's. The paper preset is DINO ViT-B/16 at 224², 3×8 slices, 32 volume
tokens, and a Phi-3-mini-shaped LLM (3072 wide, 32 layers unless told fewer, real vocabulary, bf16). The
slice-embedding standardisation is measured on a few phantoms, as training measures it on its data.
"""

from __future__ import annotations

import json
import os
import shutil

from samf.errors import SamfError

from .configs import PRESETS, SyntheticConfig, VariantCheck

#: The tiny preset's LLM: the demo's width with the real vocabulary.
TINY_LLM = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2)


def write_synthetic_checkpoint(out: str, preset: str = SyntheticConfig.preset, layers: int | None = None,
                               dtype: str = "bfloat16", seed: int = SyntheticConfig.seed) -> str:
    """A merged-checkpoint folder of random weights at ``preset``'s shapes (``layers`` overrides the LLM's
    depth). The LLM is streamed to disk a tensor at a time; the image modules are small."""
    import torch

    from samf.train.llm_folder import LLMTokenizer
    from samf.train.run_folder import PREPROCESS_FILE, paper_preset, tiny_preset
    from samf.train.synthetic_llm import PHI3_MINI, write_phi3_folder
    from samf.train.vlm import ImageConfig, SamfVLM

    if preset not in PRESETS:
        raise SamfError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    if layers is not None and layers < 1:
        raise SamfError(f"--layers must be at least 1, not {layers}")
    shape = dict(PHI3_MINI if preset == "paper" else TINY_LLM)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    write_phi3_folder(out, dtype=dtype, seed=seed, **shape)
    run = (paper_preset if preset == "paper" else tiny_preset)(out)
    torch.manual_seed(seed)
    vlm = SamfVLM(ImageConfig.from_dict(run["image"]), None, LLMTokenizer(out).layout)
    calibrate_on_phantoms(vlm, run["preprocess"], seed)
    vlm.save_image_modules(out)
    with open(os.path.join(out, PREPROCESS_FILE), "w") as f:
        json.dump(run["preprocess"], f, indent=2)
    return out


#: Phantoms the random ViT's slice-embedding standardisation is measured on (training uses 32 scans).
CALIBRATION_PHANTOMS = 4


def calibrate_on_phantoms(vlm, preprocess_cfg: dict, seed: int) -> None:
    """Measure the slice-embedding standardisation on a few phantoms, as training does on its data: without it
    the ViT's output is the raw CLS vector, whose spread around its mean is a quarter of its norm, and precision
    variants checked on it would look four times better than on a trained model."""
    import torch

    from samf.runtime.scan.ct import Volume
    from samf.runtime.scan.preprocess import PreprocessConfig, preprocess
    from samf.runtime.tools.phantom import make_phantom

    pre = PreprocessConfig.from_dict(preprocess_cfg)
    phantoms = (make_phantom(seed * 1_000_003 + i) for i in range(CALIBRATION_PHANTOMS))
    vlm.encoder.eval()
    vlm.encoder.calibrate(torch.from_numpy(preprocess(Volume(p.volume, p.spacing, "phantom"), pre)) for p in phantoms)


def write_synthetic_bundle(out_dir: str, preset: str = SyntheticConfig.preset, layers: int | None = None,
                           quants=SyntheticConfig.quants, base: str = SyntheticConfig.base,
                           checkpoint: str | None = None, seed: int = SyntheticConfig.seed,
                           precisions=VariantCheck.precisions, log=print) -> dict:
    """Random weights of ``preset``'s shapes -> a bundle at ``out_dir``; returns its manifest. The defaults are
    :class:`~samf.export.configs.SyntheticConfig`'s (``samf-export synthetic-bundle``'s).

    The checkpoint goes to ``checkpoint`` when given (kept: the PyTorch pipeline runs from it), else to a
    temporary folder beside ``out_dir`` that is removed afterwards."""
    from .bundle_writer import write_bundle

    keep = checkpoint is not None
    ckpt = checkpoint or f"{out_dir.rstrip('/')}.checkpoint-{os.getpid()}"
    if os.path.exists(ckpt) and os.listdir(ckpt):
        raise SamfError(f"{ckpt} exists and is not empty; choose another --checkpoint")
    try:
        log(f"synthetic: {preset} preset, random weights -> {ckpt}")
        write_synthetic_checkpoint(ckpt, preset, layers, seed=seed)
        # Random weights: the variants' embeddings are checked on two phantoms; their reports mean nothing.
        return write_bundle(ckpt, out_dir, quants=tuple(quants), keep_unquantized=base,
                            check=VariantCheck(precisions=tuple(precisions), scans=2, report_tokens=0), log=log)
    finally:
        if not keep:
            shutil.rmtree(ckpt, ignore_errors=True)


def random_image_model(image_cfg, seed: int, calib: list) -> tuple:
    """``(model, factor)``: a seeded image-side model as the classes initialise it (no LLM), the standardisation
    measured on ``calib`` slices. Odd seeds have every weight matrix and embedding scaled by ``factor`` =
    2**U(-1, 2) (trained weights are not the init's size; even seeds: 1). What the export check is calibrated and
    tested on (benchmarks/export_tolerances.py, tests/test_export_agreement.py)."""
    import numpy as np
    import torch

    from samf.train.vlm import SamfVLM

    torch.manual_seed(seed)
    vlm = SamfVLM(image_cfg, None, None).eval()
    factor = 1.0
    if seed % 2:
        factor = float(2 ** np.random.default_rng(seed).uniform(-1, 2))
        with torch.no_grad():
            for name, p in vlm.named_parameters():
                if p.dim() >= 2 or name.endswith(("pos_embed", "cls_token", "queries", "slice_pos")):
                    p.mul_(factor)
    vlm.encoder.calibrate(torch.from_numpy(x) for x in calib)
    return vlm, factor
