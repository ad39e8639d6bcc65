"""The slices that mattered: the fusion's attention over the model's slices, traced back to the scan.

``fusion.onnx`` outputs, next to the fused rows, α (which slices weigh in the volume summary, SAMF eq. 6) and,
with the Ao2D term, γ averaged over the prompt's tokens (which slices the prompt attends to). Both are
distributions over the ``3·S`` slices. Slices are ranked per plane by their mean, ``(α + γ) / 2`` (α alone
without Ao2D), and reported with both weights, their place in the scan (patient coordinates, mm) and, where the
scan is a DICOM series, the source image they fall on.

Attention is what the model weighed, not a segmentation: ``benchmarks/evidence.md`` measures how often the top
slices fall on a phantom's finding, against chance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..scan.preprocess import PLANES, SlicePlacement

#: Top slices per plane shown by default.
TOP_PER_PLANE = 3
#: The patient axis (LPS) each plane's position is given along, and its name: a PACS shows an axial slice's
#: location as its S coordinate, a coronal one's as P, a sagittal one's as L.
PLANE_AXIS = {"axial": (2, "S"), "coronal": (1, "P"), "sagittal": (0, "L")}
#: What the weights are, said wherever they are shown (measured: benchmarks/evidence.md).
NOTE = "attention weights: what the fusion weighed, not a localisation of a finding"
NO_ATTENTION = ("this bundle's fusion.onnx outputs no attention weights (exported before samf had them): "
                "export the bundle again with `samf-export bundle` to get the evidence slices")


@dataclass
class Evidence:
    """α and γ over one scan's ``3·S`` slices, with where those slices are."""

    alpha: np.ndarray                  # [3·S], sums to 1
    gamma: np.ndarray | None           # [3·S], sums to 1; None without Ao2D
    placement: SlicePlacement

    @property
    def slices_per_plane(self) -> int:
        return self.placement.positions.shape[1]

    @property
    def ranking(self) -> str:
        return "alpha" if self.gamma is None else "mean of alpha and gamma"

    def score(self) -> np.ndarray:
        """What the slices are ranked by: ``(α + γ) / 2``, or α without γ."""
        return self.alpha if self.gamma is None else (self.alpha + self.gamma) / 2.0

    def top(self, plane: int, n: int = TOP_PER_PLANE) -> list:
        """The ``n`` highest-scored slices of ``plane`` (0 axial, 1 coronal, 2 sagittal), as indices within it."""
        S = self.slices_per_plane
        block = self.score()[plane * S:(plane + 1) * S]
        return [int(k) for k in np.argsort(-block, kind="stable")[:n]]

    def describe(self, plane: int, k: int) -> dict:
        """One slice: plane, index, weights, where it is and the voxel range it reads. Where: its patient
        coordinate along the plane's axis (``location_axis`` S, P or L), or, for a volume whose file records no
        position (.npy), mm from the first voxel along the canonical axis (Z, Y or X)."""
        name, S = PLANES[plane], self.slices_per_plane
        axis, letter = PLANE_AXIS[name]
        if self.placement.affine is None:
            location, letter = float(self.placement.positions[plane, k]) * self.placement.spacing[plane], "ZYX"[plane]
        else:
            location = float(self.placement.patient_point(plane, k)[axis])
        lo, hi = self.placement.voxel_range(plane, k)
        out = dict(plane=name, slice=k, input_index=plane * S + k, alpha=round(float(self.alpha[plane * S + k]), 6),
                   location_mm=round(location, 2), location_axis=letter, voxels=[lo, hi])
        if self.gamma is not None:
            out["gamma"] = round(float(self.gamma[plane * S + k]), 6)
        return out

    def to_dict(self, n: int = TOP_PER_PLANE) -> dict:
        """The JSON form: the ranking, the top ``n`` per plane (best first), and every slice's weights."""
        return dict(ranking=self.ranking, note=NOTE, positioned=self.placement.affine is not None,
                    top={PLANES[p]: [dict(rank=r + 1, **self.describe(p, k)) for r, k in enumerate(self.top(p, n))]
                         for p in range(3)},
                    alpha=[round(float(a), 6) for a in self.alpha],
                    gamma=None if self.gamma is None else [round(float(g), 6) for g in self.gamma])


def evidence_of(outputs: dict, placement: SlicePlacement) -> Evidence | None:
    """The fusion's outputs (``{"fused", "alpha"[, "gamma"]}`` for one scan) as :class:`Evidence`; None for a
    bundle whose fusion outputs the fused rows only."""
    if "alpha" not in outputs:
        return None
    gamma = outputs.get("gamma")
    return Evidence(alpha=np.asarray(outputs["alpha"], np.float64).reshape(-1),
                    gamma=None if gamma is None else np.asarray(gamma, np.float64).reshape(-1), placement=placement)


# ------------------------------------------------------------------------------------------------ images

#: Frame colour of a top slice in the montage, best first (colour-blind-safe: orange, sky blue, bluish green).
RANK_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115))


def evidence_montage(slices: np.ndarray, evidence: Evidence, n: int = TOP_PER_PLANE, channel: int = 0) -> np.ndarray:
    """``[3·S, C, H, W]`` slices in [-1, 1] -> an RGB uint8 montage, a row per plane: the top ``n`` slices of each
    plane framed (orange, blue, green for ranks 1-3), and under every slice a bar as long as its score relative
    to the highest."""
    from ..outputs.slices_png import to_uint8

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

    from ..atomic import atomic_dir
    from ..outputs.slices_png import to_uint8

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
