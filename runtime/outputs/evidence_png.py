"""The slices that mattered, drawn: the top slices of each plane as PNGs, a montage that frames them, and
``evidence.json`` (:class:`~samf.runtime.inference.evidence.Evidence` as JSON), written as one folder.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..atomic import atomic_dir
from ..inference.evidence import TOP_PER_PLANE, Evidence
from ..scan.preprocess import PLANES
from .slices_png import to_uint8

#: Frame colour of a top slice in the montage, best first (colour-blind-safe: orange, sky blue, bluish green).
RANK_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115))


def evidence_montage(slices: np.ndarray, evidence: Evidence, n: int = TOP_PER_PLANE, channel: int = 0) -> np.ndarray:
    """``[3·S, C, H, W]`` slices in [-1, 1] -> an RGB uint8 montage, a row per plane: the top ``n`` slices of each
    plane framed (orange, blue, green for ranks 1-3), and under every slice a bar as long as its score relative
    to the highest."""
    S, H, W = evidence.slices_per_plane, slices.shape[-2], slices.shape[-1]
    border, bar = max(2, H // 40), max(4, H // 12)
    score = evidence.score()
    peak = float(score.max()) or 1.0
    rows = []
    for p in range(3):
        ranks = {k: r for r, k in enumerate(evidence.top(p, n))}
        tiles = []
        for k in range(S):
            gray = to_uint8(slices[p * S + k, channel])
            tile = np.full((H + bar + 2 * border, W + 2 * border, 3), 32, np.uint8)
            tile[border:border + H, border:border + W] = gray[..., None]
            if k in ranks:
                colour = RANK_COLOURS[ranks[k] % len(RANK_COLOURS)]
                frame = tile[:H + 2 * border]  # a view: drawing on it draws on the tile
                frame[:border] = frame[-border:] = colour
                frame[:, :border] = frame[:, -border:] = colour
            length = int(round(W * float(score[p * S + k]) / peak))
            tile[H + 2 * border + 1:H + 2 * border + bar - 1, border:border + length] = (200, 200, 200)
            tiles.append(tile)
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def write_evidence(out_dir: str, slices: np.ndarray, evidence: Evidence, n: int = TOP_PER_PLANE,
                   extra: dict | None = None) -> list:
    """``evidence.json``, ``<plane>_top<rank>_slice<k>.png`` (lung window, the model's first channel) and
    ``montage.png`` in ``out_dir``, which appears whole or not at all. Returns the file names."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    S, files = evidence.slices_per_plane, []
    record = evidence.to_dict(n)
    with atomic_dir(out_dir) as tmp:
        for p, plane in enumerate(PLANES):
            for entry in record["top"][plane]:
                name = f"{plane}_top{entry['rank']}_slice{entry['slice']:02d}.png"
                Image.fromarray(to_uint8(slices[p * S + entry["slice"], 0])).save(os.path.join(tmp, name))
                entry["png"] = name
                files.append(name)
        Image.fromarray(evidence_montage(slices, evidence, n)).save(os.path.join(tmp, "montage.png"))
        files.append("montage.png")
        with open(os.path.join(tmp, "evidence.json"), "w") as f:
            json.dump({**record, **(extra or {})}, f, indent=1)
        files.append("evidence.json")
    return files
