"""The slices the model sees, as PNG files a radiologist can check before trusting a report."""

from __future__ import annotations

import os

import numpy as np

from ..atomic import atomic_dir
from ..scan.ct import Volume
from ..scan.preprocess import PLANES, PreprocessConfig, preprocess

WINDOW_NAMES = ("lung", "mediastinum", "bone")


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round((x + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def scan_folder_name(source: str) -> str:
    """The folder a scan's slices go to: its file or folder name without the extension."""
    name = os.path.basename(os.path.normpath(source))
    for ext in (".nii.gz", ".nii", ".npy"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or "scan"
    return name or "scan"


def write_slice_pngs(vol: Volume, cfg: PreprocessConfig, out_dir: str) -> list:
    """``plane_k_window.png`` for every slice and window, and ``montage_<plane>.png`` (windows as rows), as one
    folder ``out_dir`` that appears whole or not at all: a run killed half-way leaves the previous folder (or
    none), never one scan's slices mixed with another's. Returns the file names."""
    from PIL import Image

    x = preprocess(vol, cfg)                         # [3S, C, H, W] in [-1, 1]
    S, C = cfg.slices_per_plane, cfg.channels
    names = [WINDOW_NAMES[c] if c < len(WINDOW_NAMES) else f"window{c}" for c in range(C)]
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    files = []
    with atomic_dir(out_dir) as tmp:

        def save(name, img):
            Image.fromarray(to_uint8(img)).save(os.path.join(tmp, name), format="PNG")
            files.append(name)

        for p, plane in enumerate(PLANES):
            block = x[p * S:(p + 1) * S]
            for k in range(S):
                for c in range(C):
                    save(f"{plane}_{k:02d}_{names[c]}.png", block[k, c])
            save(f"montage_{plane}.png",
                 np.concatenate([np.concatenate(list(block[:, c]), axis=1) for c in range(C)]))
    return files
