"""Synthetic chest-CT phantoms with known findings, their reports and multiple-choice questions.

The phantoms are the demo's data and the test suite's fixture: every finding is known, so learning,
export and generation can be checked for real. numpy only (no torch), seeded and deterministic.

Frame: the canonical one of ``samf.runtime.ct`` -- a ``[Z, Y, X]`` float32 array in Hounsfield units,
Z toward the head (superior), Y toward the front (anterior), X toward the patient's right (RAS+). So the
patient's left lung sits at small X.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

SIDES = ("left", "right")
LOBES = ("upper", "lower")
EFFUSIONS = ("none", "left", "right", "bilateral")

#: Tissue densities in HU (textbook values).
HU = dict(air=-1000.0, lung=-850.0, emphysema=-950.0, fat=-100.0, soft=40.0, blood=45.0,
          fluid=15.0, bone=700.0, nodule=30.0)


@dataclass(frozen=True)
class Findings:
    """What a phantom shows; the ground truth its report and questions are written from."""

    nodule: bool = False
    nodule_side: str = "none"   # left / right / none
    nodule_lobe: str = "none"   # upper / lower / none
    nodule_size_mm: int = 0
    effusion: str = "none"      # none / left / right / bilateral
    cardiomegaly: bool = False
    emphysema: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Phantom:
    """One synthetic scan: HU volume, voxel spacing, findings, report and multiple-choice questions."""

    volume: np.ndarray          # [Z, Y, X] float32 HU
    spacing: tuple              # (sz, sy, sx) in mm
    findings: Findings
    report: str
    questions: list             # list of dicts: question, choices (4), answer ("A".."D")


def sample_findings(rng: np.random.Generator) -> Findings:
    """Each finding independently, at rates that keep every class well represented."""
    nodule = bool(rng.random() < 0.5)
    return Findings(
        nodule=nodule,
        nodule_side=str(rng.choice(SIDES)) if nodule else "none",
        nodule_lobe=str(rng.choice(LOBES)) if nodule else "none",
        nodule_size_mm=int(rng.integers(12, 31)) if nodule else 0,
        effusion=str(rng.choice(EFFUSIONS)),
        cardiomegaly=bool(rng.random() < 0.5),
        emphysema=bool(rng.random() < 0.5),
    )


def _ellipsoid(grid, center, radii):
    z, y, x = grid
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + \
        ((x - center[2]) / radii[2]) ** 2 <= 1.0


def render_volume(findings: Findings, rng: np.random.Generator, shape=(64, 96, 96),
                  spacing=(5.0, 4.0, 4.0)) -> np.ndarray:
    """Draw a chest at ``spacing`` mm: body, fat, lungs, mediastinum, heart, spine, ribs, then the findings.

    Geometry is in millimetres so the same anatomy comes out at any resolution. Individual anatomy
    varies (body size, lung size, heart position) so the model has to look, not memorise.
    """
    nz, ny, nx = shape
    sz, sy, sx = spacing
    z = (np.arange(nz, dtype=np.float32) - nz / 2) * sz
    y = (np.arange(ny, dtype=np.float32) - ny / 2) * sy
    x = (np.arange(nx, dtype=np.float32) - nx / 2) * sx
    grid = np.meshgrid(z, y, x, indexing="ij", sparse=True)
    Z, Y, X = grid
    jit = lambda s: float(1.0 + rng.uniform(-s, s))  # noqa: E731 - anatomical variation factor

    fov_y, fov_x = ny * sy, nx * sx
    body_ry, body_rx = 0.36 * fov_y * jit(0.05), 0.45 * fov_x * jit(0.05)
    vol = np.full(shape, HU["air"], dtype=np.float32)
    body = (Y / body_ry) ** 2 + (X / body_rx) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    vol[body] = HU["fat"]
    muscle = (Y / (body_ry - 12)) ** 2 + (X / (body_rx - 12)) ** 2 <= 1.0
    vol[np.broadcast_to(muscle, shape)] = HU["soft"]

    # Ribs: a thin bony ring inside the muscle layer, interrupted every few centimetres along Z.
    ring = np.abs(np.sqrt((Y / (body_ry - 16)) ** 2 + (X / (body_rx - 16)) ** 2) - 1.0) < 0.03
    rib_z = (np.mod(Z, 30.0) < 12.0)
    vol[np.broadcast_to(ring & rib_z, shape)] = HU["bone"]

    # Lungs: two ellipsoids left and right of the midline, the chest's upper two thirds and more.
    zext = nz * sz
    lung_c_z = 0.05 * zext
    lung_r = (0.42 * zext * jit(0.05), 0.62 * body_ry * jit(0.05), 0.36 * body_rx * jit(0.05))
    lung_dx = 0.48 * body_rx
    lung_density = HU["emphysema"] if findings.emphysema else HU["lung"]
    lungs = {}
    for side, sign in (("left", -1.0), ("right", 1.0)):
        c = (lung_c_z, 0.05 * body_ry, sign * lung_dx)
        lungs[side] = (c, lung_r, _ellipsoid(grid, c, lung_r))
        vol[lungs[side][2]] = lung_density
    if findings.emphysema:
        # Bullae: small air pockets scattered through both lungs.
        for side in SIDES:
            c, r, mask = lungs[side]
            for _ in range(int(rng.integers(5, 9))):
                off = rng.uniform(-0.6, 0.6, size=3) * np.asarray(r)
                rb = float(rng.uniform(6, 12))
                vol[_ellipsoid(grid, np.asarray(c) + off, (rb, rb, rb)) & mask] = HU["air"]

    # Mediastinum between the lungs, heart in its lower anterior part, shifted to the patient's left.
    med = _ellipsoid(grid, (lung_c_z, 0.1 * body_ry, 0.0), (lung_r[0], 0.5 * body_ry, 0.2 * body_rx))
    vol[med & ~lungs["left"][2] & ~lungs["right"][2]] = HU["soft"]
    heart_scale = 1.6 if findings.cardiomegaly else 1.0
    heart_r = np.array([0.16 * zext, 0.30 * body_ry, 0.26 * body_rx]) * heart_scale * jit(0.06)
    heart_c = (lung_c_z - 0.18 * zext, 0.25 * body_ry, -0.12 * body_rx)
    vol[_ellipsoid(grid, heart_c, heart_r)] = HU["blood"]
    # Aorta descending beside the spine.
    aorta = ((Y + 0.45 * body_ry) / 11.0) ** 2 + ((X + 0.12 * body_rx) / 11.0) ** 2 <= 1.0
    vol[np.broadcast_to(aorta, shape) & (Z < lung_c_z + lung_r[0] * 0.7)] = HU["blood"]
    # Spine: a vertebral column posterior in the midline.
    spine = ((Y + 0.78 * body_ry) / 16.0) ** 2 + (X / 16.0) ** 2 <= 1.0
    vol[np.broadcast_to(spine, shape)] = HU["bone"]

    # Pleural effusion: fluid layering in the dependent (posterior, inferior) part of the lung.
    eff_sides = {"none": (), "left": ("left",), "right": ("right",), "bilateral": SIDES}[findings.effusion]
    for side in eff_sides:
        c, r, mask = lungs[side]
        depth = float(rng.uniform(0.45, 0.65))
        dependent = (Y < c[1] - r[1] + 2 * depth * r[1]) & (Z < c[0] + 0.2 * r[0])
        vol[mask & dependent] = HU["fluid"]

    # Nodule: a soft-tissue sphere in the named lobe (upper = above the lung centre).
    if findings.nodule:
        c, r, mask = lungs[findings.nodule_side]
        dz = (0.45 if findings.nodule_lobe == "upper" else -0.4) * r[0]
        ncenter = (c[0] + dz, c[1] + float(rng.uniform(0.0, 0.35)) * r[1],
                   c[2] + float(rng.uniform(-0.3, 0.3)) * r[2])
        rad = findings.nodule_size_mm / 2.0
        vol[_ellipsoid(grid, ncenter, (rad, rad, rad))] = HU["nodule"]

    vol += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    return np.clip(vol, -1024.0, 3071.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Reports: varied sentences written from the findings; normal findings are stated as well.

_NODULE_POS = (
    "A {size} mm nodule is seen in the {side} {lobe} lobe.",
    "There is a {size} mm pulmonary nodule in the {side} {lobe} lobe.",
    "A solid nodule measuring {size} mm is present in the {side} {lobe} lobe.",
)
_NODULE_NEG = (
    "No pulmonary nodules are identified.",
    "No pulmonary nodule is seen.",
    "The lungs show no nodules.",
)
_EMPH_POS = (
    "Emphysematous changes are present in both lungs.",
    "There is emphysema with bullae in both lungs.",
)
_EMPH_NEG = (
    "Lung parenchyma is normal without emphysema.",
    "No emphysema is seen.",
)
_EFF_POS = (
    "A {side} pleural effusion is present.",
    "There is a {side} pleural effusion.",
)
_EFF_BIL = (
    "Bilateral pleural effusions are present.",
    "There are bilateral pleural effusions.",
)
_EFF_NEG = (
    "No pleural effusion.",
    "There is no pleural effusion.",
)
_CARDIO_POS = (
    "The heart is enlarged, consistent with cardiomegaly.",
    "Cardiomegaly is noted.",
)
_CARDIO_NEG = (
    "Heart size is normal.",
    "The heart is normal in size.",
)


def write_report(f: Findings, rng: np.random.Generator) -> str:
    """A findings paragraph: lungs, emphysema, pleura, heart, each sentence drawn from a small bank."""
    pick = lambda bank: bank[int(rng.integers(len(bank)))]  # noqa: E731
    parts = []
    if f.nodule:
        parts.append(pick(_NODULE_POS).format(size=f.nodule_size_mm, side=f.nodule_side, lobe=f.nodule_lobe))
    else:
        parts.append(pick(_NODULE_NEG))
    parts.append(pick(_EMPH_POS if f.emphysema else _EMPH_NEG))
    if f.effusion == "none":
        parts.append(pick(_EFF_NEG))
    elif f.effusion == "bilateral":
        parts.append(pick(_EFF_BIL))
    else:
        parts.append(pick(_EFF_POS).format(side=f.effusion))
    parts.append(pick(_CARDIO_POS if f.cardiomegaly else _CARDIO_NEG))
    return " ".join(parts)


def parse_report(text: str) -> dict:
    """Read the findings back out of a report (generated or reference); ``None`` where it says nothing.

    The inverse of :func:`write_report`, used to score generated reports finding by finding.
    """
    t = text.lower()
    out: dict = dict(nodule=None, nodule_side=None, nodule_lobe=None, effusion=None,
                     cardiomegaly=None, emphysema=None)
    m = re.search(r"\b(left|right) (upper|lower) lobe", t)
    if m:
        out.update(nodule=True, nodule_side=m.group(1), nodule_lobe=m.group(2))
    elif re.search(r"no pulmonary nodule|no nodule", t):
        out.update(nodule=False, nodule_side="none", nodule_lobe="none")
    if "bilateral pleural effusion" in t:
        out["effusion"] = "bilateral"
    elif re.search(r"no pleural effusion", t):
        out["effusion"] = "none"
    else:
        m = re.search(r"\b(left|right) pleural effusion", t)
        if m:
            out["effusion"] = m.group(1)
    if re.search(r"cardiomegaly|heart is enlarged", t):
        out["cardiomegaly"] = True
    elif re.search(r"heart size is normal|heart is normal in size", t):
        out["cardiomegaly"] = False
    if re.search(r"without emphysema|no emphysema", t):
        out["emphysema"] = False
    elif "emphysema" in t:
        out["emphysema"] = True
    return out


#: The findings scored per phantom; nodule side/lobe only count where a nodule is present.
SCORED = ("nodule", "nodule_side", "nodule_lobe", "effusion", "cardiomegaly", "emphysema")


def truth_of(f: Findings) -> dict:
    d = f.to_dict()
    return {k: d[k] for k in SCORED}


# ----------------------------------------------------------------------------------------------
# Multiple-choice questions, M3D-VQA style: four choices, one right, letter answer.

def _mcq(rng, question, right, wrong):
    choices = [right] + list(wrong)[:3]
    order = rng.permutation(4)
    choices = [choices[i] for i in order]
    letter = "ABCD"[int(np.where(order == 0)[0][0])]
    return dict(question=question, choices=choices, answer=letter)


def write_questions(f: Findings, rng: np.random.Generator) -> list:
    eff = {"none": "no pleural effusion", "left": "left pleural effusion",
           "right": "right pleural effusion", "bilateral": "bilateral pleural effusions"}
    qs = [_mcq(rng, "Which pleural finding is present?", eff[f.effusion],
               [v for k, v in eff.items() if k != f.effusion])]
    heart = "enlarged" if f.cardiomegaly else "normal"
    qs.append(_mcq(rng, "What is the size of the heart?", heart,
                   ["normal" if f.cardiomegaly else "enlarged", "absent", "dextroposed"]))
    loc = f"{f.nodule_side} {f.nodule_lobe} lobe" if f.nodule else "no nodule"
    all_locs = [f"{s} {lo} lobe" for s in SIDES for lo in LOBES] + ["no nodule"]
    wrong = [v for v in all_locs if v != loc]
    wrong = [wrong[i] for i in rng.permutation(len(wrong))]
    qs.append(_mcq(rng, "Where is the lung nodule?", loc, wrong))
    return qs


def make_phantom(seed: int, shape=(64, 96, 96), spacing=(5.0, 4.0, 4.0)) -> Phantom:
    """The phantom with this seed: the same seed always gives the same volume, report and questions."""
    rng = np.random.default_rng(seed)
    f = sample_findings(rng)
    vol = render_volume(f, rng, shape=shape, spacing=spacing)
    return Phantom(volume=vol, spacing=tuple(float(s) for s in spacing), findings=f,
                   report=write_report(f, rng), questions=write_questions(f, rng))
