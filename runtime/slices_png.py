"""The slices the model sees, as PNG files a radiologist can check before trusting a report."""

from __future__ import annotations

import os

import numpy as np

from .atomic import atomic_file
from .ct import Volume
from .preprocess import PLANES, PreprocessConfig, preprocess

WINDOW_NAMES = ("lung", "mediastinum", "bone")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round((x + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def write_slice_pngs(vol: Volume, cfg: PreprocessConfig, out_dir: str) -> list:
    """``plane_k_window.png`` for every slice and window, and ``montage_<plane>.png`` (windows as rows).

    Each file is written atomically; nothing else in ``out_dir`` is touched. Returns the file names.
    """
    from PIL import Image

    x = preprocess(vol, cfg)                         # [3S, C, H, W] in [-1, 1]
    S, C = cfg.slices_per_plane, cfg.channels
    names = [WINDOW_NAMES[c] if c < len(WINDOW_NAMES) else f"window{c}" for c in range(C)]
    os.makedirs(out_dir, exist_ok=True)
    files = []

    def save(name, img):
        with atomic_file(os.path.join(out_dir, name), "wb") as f:
            Image.fromarray(_to_uint8(img)).save(f, format="PNG")
        files.append(name)

    for p, plane in enumerate(PLANES):
        block = x[p * S:(p + 1) * S]
        for k in range(S):
            for c in range(C):
                save(f"{plane}_{k:02d}_{names[c]}.png", block[k, c])
        save(f"montage_{plane}.png", np.concatenate([np.concatenate(list(block[:, c]), axis=1) for c in range(C)]))
    return files
