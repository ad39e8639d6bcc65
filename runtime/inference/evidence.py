"""The slices that mattered: the fusion's attention over the model's slices, traced back to the scan.

``fusion.onnx`` outputs, next to the fused rows, α (which slices weigh in the volume summary, SAMF eq. 6) and,
with the Ao2D term, γ averaged over the prompt's tokens (which slices the prompt attends to). Both are
distributions over the ``3·S`` slices. Slices are ranked per plane by their mean, ``(α + γ) / 2`` (α alone
without Ao2D), and reported with both weights, their place in the scan (patient coordinates, mm) and, where the
scan is a DICOM series, the source image they fall on.

The record lives here, with the result that carries it; the images drawn from it are
:mod:`samf.runtime.outputs.evidence_png`.

Attention is what the model weighed, not a segmentation: ``benchmarks/evidence.md`` measures how often the top
slices fall on a phantom's finding, against chance.
"""

from __future__ import annotations

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
