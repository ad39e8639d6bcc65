"""Synthetic chest-CT phantoms with known findings, their reports and multiple-choice questions.

The phantoms are the demo's data, ``samf bench``'s default scans and the test suite's fixture: every finding
is known, so learning, export and generation can be checked for real. numpy only (no torch), seeded and
deterministic; :func:`generate_phantom_dataset` writes a dataset folder (NIfTI scans, CSVs, questions) that
training and the runtime read like any other.

Frame: the canonical one of ``samf.runtime.scan.ct`` -- a ``[Z, Y, X]`` float32 array in Hounsfield units,
Z toward the head (superior), Y toward the front (anterior), X toward the patient's right (RAS+). So the
patient's left lung sits at small X.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from ..atomic import atomic_file
from ..progress import progress_bar
from ..scan.ct import save_nifti

SIDES = ("left", "right")
LOBES = ("upper", "lower")
EFFUSIONS = ("none", "left", "right", "bilateral")
#: Where a lung-parenchyma finding sits: "none" or "<side> <lobe>".
LOCATIONS = ("none",) + tuple(f"{s} {lo}" for s in SIDES for lo in LOBES)

#: Tissue densities in HU (textbook values).
HU = dict(air=-1000.0, lung=-850.0, emphysema=-950.0, fat=-100.0, soft=40.0, blood=45.0,
          fluid=15.0, bone=700.0, nodule=30.0, metal=3000.0, calcium=500.0, ground_glass=-550.0,
          mosaic_low=-930.0, mosaic_high=-740.0, septum=-150.0, fibrosis=-50.0)

#: Rate of each finding beyond the first four: rare enough that reports stay short, common enough to learn.
EXTRA_RATE = 0.15


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
    # The rest of CT-RATE's 18 abnormalities that a phantom can show.
    medical_material: bool = False          # a pacemaker with its lead
    arterial_calcification: bool = False    # calcified plaques in the aortic wall
    coronary_calcification: bool = False
    pericardial_effusion: bool = False
    hiatal_hernia: bool = False
    lymphadenopathy: bool = False           # enlarged hilar nodes
    atelectasis: str = "none"               # none / left / right (plate atelectasis at the base)
    lung_opacity: str = "none"              # a LOCATION: ground glass
    consolidation: str = "none"             # a LOCATION: airspace consolidation
    mosaic_attenuation: bool = False
    septal_thickening: bool = False         # interlobular septal thickening
    fibrotic_sequela: bool = False          # subpleural fibrotic bands at the apices
    bronchiectasis: bool = False
    peribronchial_thickening: bool = False

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
    masks: dict = dataclasses.field(default_factory=dict)  # with_masks: where located findings are (render_volume)


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
        **sample_extras(rng),
    )


def sample_extras(rng: np.random.Generator, rate: float = EXTRA_RATE) -> dict:
    """The findings beyond the first four, each present with probability ``rate`` (drawn in the order of
    :class:`Findings`' fields, so a given seed keeps its phantom)."""
    out = {}
    for f in dataclasses.fields(Findings)[7:]:
        present = bool(rng.random() < rate)
        kind = EXTRA_BY_NAME[f.name].kind
        if kind == "bool":
            out[f.name] = present
        elif kind == "side":
            out[f.name] = str(rng.choice(SIDES)) if present else "none"
        else:
            out[f.name] = str(rng.choice(LOCATIONS[1:])) if present else "none"
    return out


def _ellipsoid(grid, center, radii):
    z, y, x = grid
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + \
        ((x - center[2]) / radii[2]) ** 2 <= 1.0


def render_volume(findings: Findings, rng: np.random.Generator, shape=(64, 96, 96),
                  spacing=(5.0, 4.0, 4.0), masks: dict | None = None) -> np.ndarray:
    """Draw a chest at ``spacing`` mm: body, fat, lungs, mediastinum, heart, spine, ribs, then the findings.

    Geometry is in millimetres so the same anatomy comes out at any resolution. Individual anatomy
    varies (body size, lung size, heart position) so the model has to look, not memorise. ``masks``, when
    given, receives where the located findings were drawn (``effusion_left``/``effusion_right``, ``nodule``),
    as boolean ``[Z, Y, X]`` arrays: the ground truth the evidence slices are measured against.
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
        if masks is not None:
            masks[f"effusion_{side}"] = mask & dependent

    # Nodule: a soft-tissue sphere in the named lobe (upper = above the lung centre).
    if findings.nodule:
        c, r, mask = lungs[findings.nodule_side]
        dz = (0.45 if findings.nodule_lobe == "upper" else -0.4) * r[0]
        ncenter = (c[0] + dz, c[1] + float(rng.uniform(0.0, 0.35)) * r[1],
                   c[2] + float(rng.uniform(-0.3, 0.3)) * r[2])
        rad = findings.nodule_size_mm / 2.0
        nodule = _ellipsoid(grid, ncenter, (rad, rad, rad))
        vol[nodule] = HU["nodule"]
        if masks is not None:
            masks["nodule"] = np.broadcast_to(nodule, shape)

    anatomy = dict(grid=grid, lungs=lungs, body=(body_ry, body_rx), heart=(heart_c, heart_r), zext=zext,
                   lung_c_z=lung_c_z, spacing=spacing)
    _render_extras(vol, findings, rng, anatomy)

    vol += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    return np.clip(vol, -1024.0, 3071.0).astype(np.float32)


def _lobe_centre(lungs, location: str, rng) -> tuple:
    side, lobe = location.split()
    c, r, mask = lungs[side]
    dz = (0.45 if lobe == "upper" else -0.4) * r[0]
    return (c[0] + dz, c[1] + float(rng.uniform(-0.1, 0.3)) * r[1], c[2] + float(rng.uniform(-0.2, 0.2)) * r[2]), mask


def _render_extras(vol, f: Findings, rng, a: dict) -> None:
    """Draw the CT-RATE findings beyond the first four, each where radiologists would look for it, in the
    order of their ``layer`` (diffuse lung patterns first, so that focal findings sit on top of them).

    Structures are at least a voxel thick at the demo's 4-5 mm so they are there to be seen.
    """
    for spec in sorted(EXTRA_FINDINGS, key=lambda spec: spec.layer):
        value = getattr(f, spec.name)
        if value and value != "none":
            spec.draw(vol, value, rng, a)


# The drawing of each further finding: (volume, its value, rng, the anatomy render_volume laid out).

def _draw_mosaic(vol, value, rng, a) -> None:
    """Lobular patches darker and brighter than normal lung."""
    for side in SIDES:
        c, r, mask = a["lungs"][side]
        for _ in range(10):
            off = rng.uniform(-0.7, 0.7, size=3) * np.asarray(r)
            rb = float(rng.uniform(15, 25))
            dens = HU["mosaic_low"] if rng.random() < 0.5 else HU["mosaic_high"]
            vol[_ellipsoid(a["grid"], np.asarray(c) + off, (rb, rb, rb)) & mask] = dens


def _outer_lung(a, side, depth):
    """The lung of ``side`` beyond ``depth`` of its normalised radius, and its centre and radii."""
    Z, Y, X = a["grid"]
    c, r, mask = a["lungs"][side]
    d = ((Z - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((X - c[2]) / r[2]) ** 2
    return mask & (d > depth), c, r


def _draw_septal(vol, value, rng, a) -> None:
    """A reticular grid of thickened septa in the outer lung."""
    _, Y, X = a["grid"]
    vox = max(a["spacing"])
    for side in SIDES:
        outer, _, _ = _outer_lung(a, side, 0.7)
        net = (np.mod(Y, 20.0) < vox) | (np.mod(X, 20.0) < vox)
        vol[outer & net] = HU["septum"]


def _draw_fibrotic(vol, value, rng, a) -> None:
    """Irregular subpleural bands at both apices."""
    Z, Y, X = a["grid"]
    vox = max(a["spacing"])
    for side in SIDES:
        outer, c, r = _outer_lung(a, side, 0.6)
        bands = np.mod(Y + 0.5 * X, 12.0) < vox
        vol[outer & (Z > c[0] + 0.45 * r[0]) & bands] = HU["fibrosis"]


def _draw_ground_glass(vol, location, rng, a) -> None:
    centre, mask = _lobe_centre(a["lungs"], location, rng)
    rad = float(rng.uniform(22, 32))
    vol[_ellipsoid(a["grid"], centre, (rad, rad * 0.8, rad * 0.8)) & mask] = HU["ground_glass"]


def _draw_consolidation(vol, location, rng, a) -> None:
    centre, mask = _lobe_centre(a["lungs"], location, rng)
    rad = float(rng.uniform(28, 38))
    vol[_ellipsoid(a["grid"], centre, (rad, rad * 0.9, rad * 0.7)) & mask] = HU["soft"]


def _draw_airways(vol, a, lumen: float, wall: float, zone) -> None:
    """Three airways per lung running head-feet through ``zone``: soft-tissue walls around an air lumen."""
    _, Y, X = a["grid"]
    for side in SIDES:
        c, r, mask = a["lungs"][side]
        for dy, dx in ((-0.2, -0.25), (0.25, 0.2), (0.0, 0.0)):
            rr = np.sqrt((Y - c[1] - dy * r[1]) ** 2 + (X - c[2] - dx * r[2]) ** 2)
            vol[mask & zone & (rr < lumen + wall)] = HU["soft"]
            vol[mask & zone & (rr < lumen)] = HU["air"]


def _draw_bronchiectasis(vol, value, rng, a) -> None:
    """Dilated thin-walled airways in the lower lungs."""
    _draw_airways(vol, a, 7.0, max(a["spacing"]), a["grid"][0] < a["lung_c_z"])


def _draw_peribronchial(vol, value, rng, a) -> None:
    """Airways of normal calibre with thick walls, mid-chest."""
    _draw_airways(vol, a, 3.0, 1.5 * max(a["spacing"]), np.abs(a["grid"][0] - a["lung_c_z"]) < 40.0)


def _draw_atelectasis(vol, side, rng, a) -> None:
    """Plate atelectasis: a flat band across the lower lobe."""
    Z, Y, _ = a["grid"]
    c, r, mask = a["lungs"][side]
    zc = c[0] - 0.45 * r[0]
    vol[mask & (np.abs(Z - zc) < max(4.0, max(a["spacing"]))) & (Y > c[1] - 0.3 * r[1])] = HU["soft"]


def _draw_lymphadenopathy(vol, value, rng, a) -> None:
    """Enlarged nodes at both hila, bulging into the lungs."""
    for side, sign in (("left", -1.0), ("right", 1.0)):
        c, r, _ = a["lungs"][side]
        rad = float(rng.uniform(12, 16))
        vol[_ellipsoid(a["grid"], (c[0] + 0.1 * r[0], c[1], c[2] - sign * 0.75 * r[2]), (rad, rad, rad))] = HU["soft"]


def _draw_pericardial_effusion(vol, value, rng, a) -> None:
    """A fluid rim around the heart."""
    heart_c, heart_r = a["heart"]
    vol[_ellipsoid(a["grid"], heart_c, np.asarray(heart_r) + 8.0) & ~_ellipsoid(a["grid"], heart_c, heart_r)] = \
        HU["fluid"]


def _draw_coronary_calcification(vol, value, rng, a) -> None:
    """Calcified specks along the anterior heart surface."""
    heart_c, heart_r = a["heart"]
    vox = max(a["spacing"])
    for t in np.linspace(-0.6, 0.6, 4):
        p = (heart_c[0] + t * heart_r[0], heart_c[1] + 0.9 * heart_r[1] * np.cos(t), heart_c[2] + t * heart_r[2])
        vol[_ellipsoid(a["grid"], p, (vox, vox, vox))] = HU["calcium"]


def _draw_arterial_calcification(vol, value, rng, a) -> None:
    """Plaques in the descending aortic wall."""
    body_ry, body_rx = a["body"]
    vox = max(a["spacing"])
    for zz in rng.uniform(-0.3, 0.3, size=4) * a["zext"]:
        p = (zz, -0.45 * body_ry + 10.0, -0.12 * body_rx + float(rng.choice([-10.0, 10.0])))
        vol[_ellipsoid(a["grid"], p, (vox, vox, vox))] = HU["calcium"]


def _draw_hiatal_hernia(vol, value, rng, a) -> None:
    """Stomach above the diaphragm behind the heart: a soft wall, air over fluid inside."""
    Z = a["grid"][0]
    body_ry, body_rx = a["body"]
    heart_c, heart_r = a["heart"]
    c = (heart_c[0] - 0.6 * heart_r[0], -0.3 * body_ry, -0.05 * body_rx)
    vol[_ellipsoid(a["grid"], c, (22.0, 18.0, 20.0))] = HU["soft"]
    inner = _ellipsoid(a["grid"], c, (16.0, 12.0, 14.0))
    vol[inner & (Z > c[0])] = HU["air"]
    vol[inner & (Z <= c[0])] = HU["fluid"]


def _draw_pacemaker(vol, value, rng, a) -> None:
    """A pacemaker in the left chest wall, its lead into the heart."""
    Z, Y, X = a["grid"]
    body_ry, body_rx = a["body"]
    heart_c, _ = a["heart"]
    vox = max(a["spacing"])
    box = (np.abs(Z - 0.3 * a["zext"]) < 12) & (np.abs(Y - 0.85 * body_ry) < max(5.0, vox)) & \
          (np.abs(X + 0.5 * body_rx) < 18)
    vol[box] = HU["metal"]
    for t in np.linspace(0.0, 1.0, 12):
        p = (0.3 * a["zext"] * (1 - t) + heart_c[0] * t, 0.85 * body_ry * (1 - t) + heart_c[1] * t,
             -0.5 * body_rx * (1 - t) + heart_c[2] * t)
        vol[_ellipsoid(a["grid"], p, (vox, vox, vox))] = HU["metal"]


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


@dataclass(frozen=True)
class ExtraFinding:
    """One CT-RATE finding beyond the first four: everything the phantoms know about it, in one place.

    Adding a finding is adding one record to :data:`EXTRA_FINDINGS` and its field to :class:`Findings` (a test
    checks the two agree); sampling, drawing, the report, its parser, the CT-RATE label and the question all
    read the record."""

    name: str          # the field of Findings
    kind: str          # "bool" (present or not), "side" (left/right) or "location" (side and lobe)
    label: str         # CT-RATE's abnormality label
    sentences: tuple   # what a report says when present ({side}/{lobe} from the value); silent when absent
    mention: str       # how parse_report recognises it in a sentence (a regex, lower case)
    option: str        # its plain name as a multiple-choice option
    draw: object       # draw(volume, value, rng, anatomy)
    layer: int = 3     # drawing order: 0 diffuse lung patterns, 1 opacities, 2 airways, 3 the rest


#: The further findings, in the order reports state them.
EXTRA_FINDINGS = (
    ExtraFinding("lung_opacity", "location", "Lung opacity",
                 ("A ground-glass opacity is seen in the {side} {lobe} lobe.",
                  "There is a ground-glass opacity in the {side} {lobe} lobe."),
                 r"ground-glass opacity", "ground-glass opacity", _draw_ground_glass, layer=1),
    ExtraFinding("consolidation", "location", "Consolidation",
                 ("Consolidation is present in the {side} {lobe} lobe.",
                  "There is an area of consolidation in the {side} {lobe} lobe."),
                 r"consolidation", "consolidation", _draw_consolidation, layer=1),
    ExtraFinding("atelectasis", "side", "Atelectasis",
                 ("Plate atelectasis is seen in the {side} lower lobe.",
                  "There is atelectasis at the {side} lung base."),
                 r"atelectasis", "atelectasis", _draw_atelectasis),
    ExtraFinding("mosaic_attenuation", "bool", "Mosaic attenuation pattern",
                 ("A mosaic attenuation pattern is seen in both lungs.",),
                 r"mosaic", "mosaic attenuation", _draw_mosaic, layer=0),
    ExtraFinding("septal_thickening", "bool", "Interlobular septal thickening",
                 ("Interlobular septal thickening is seen in the periphery of both lungs.",),
                 r"septal thickening", "septal thickening", _draw_septal, layer=0),
    ExtraFinding("fibrotic_sequela", "bool", "Pulmonary fibrotic sequela",
                 ("Fibrotic sequelae are seen at both lung apices.",),
                 r"fibrotic", "fibrotic sequela", _draw_fibrotic, layer=0),
    ExtraFinding("bronchiectasis", "bool", "Bronchiectasis",
                 ("Bronchiectasis is present in both lower lobes.",
                  "There are bronchiectatic changes in both lower lobes."),
                 r"bronchiecta", "bronchiectasis", _draw_bronchiectasis, layer=2),
    ExtraFinding("peribronchial_thickening", "bool", "Peribronchial thickening",
                 ("There is peribronchial thickening in both lungs.",),
                 r"peribronchial", "peribronchial thickening", _draw_peribronchial, layer=2),
    ExtraFinding("lymphadenopathy", "bool", "Lymphadenopathy",
                 ("Enlarged hilar lymph nodes are present, consistent with lymphadenopathy.",
                  "There is bilateral hilar lymphadenopathy."),
                 r"lymph", "lymphadenopathy", _draw_lymphadenopathy),
    ExtraFinding("pericardial_effusion", "bool", "Pericardial effusion",
                 ("A pericardial effusion is present.", "There is pericardial effusion."),
                 r"pericardial effusion", "pericardial effusion", _draw_pericardial_effusion),
    ExtraFinding("coronary_calcification", "bool", "Coronary artery wall calcification",
                 ("Coronary artery calcification is present.", "There are calcifications in the coronary arteries."),
                 r"coronary", "coronary calcification", _draw_coronary_calcification),
    ExtraFinding("arterial_calcification", "bool", "Arterial wall calcification",
                 ("Calcified atherosclerotic plaques are seen in the aortic wall.",
                  "There is atherosclerotic calcification of the aorta."),
                 r"aort", "aortic calcification", _draw_arterial_calcification),
    ExtraFinding("hiatal_hernia", "bool", "Hiatal hernia",
                 ("A hiatal hernia is seen.", "There is a hiatal hernia."),
                 r"hiatal hernia", "hiatal hernia", _draw_hiatal_hernia),
    ExtraFinding("medical_material", "bool", "Medical material",
                 ("A cardiac pacemaker with its lead is in place.", "A pacemaker device and lead are noted."),
                 r"pacemaker", "pacemaker", _draw_pacemaker),
)
EXTRA_BY_NAME = {spec.name: spec for spec in EXTRA_FINDINGS}
EXTRAS = tuple(EXTRA_BY_NAME)
#: The CT-RATE label of each of the first four findings (the further ones carry theirs).
CORE_LABELS = {"nodule": "Lung nodule", "effusion": "Pleural effusion", "cardiomegaly": "Cardiomegaly",
               "emphysema": "Emphysema"}


def write_report(f: Findings, rng: np.random.Generator) -> str:
    """A findings paragraph: lungs, emphysema, pleura, heart, then any further finding, each sentence drawn
    from a small bank."""
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
    for spec in EXTRA_FINDINGS:
        value = getattr(f, spec.name)
        if value and value != "none":
            side, _, lobe = str(value).partition(" ")
            parts.append(pick(spec.sentences).format(side=side, lobe=lobe))
    return " ".join(parts)


def parse_report(text: str) -> dict:
    """Read the findings back out of a report (generated or reference); ``None`` where it says nothing.

    The inverse of :func:`write_report`, sentence by sentence, used to score generated reports finding by
    finding. The further findings are only ever stated when present, so silence means absent.
    """
    out: dict = dict(nodule=None, nodule_side=None, nodule_lobe=None, effusion=None,
                     cardiomegaly=None, emphysema=None)
    out.update({spec.name: (False if spec.kind == "bool" else "none") for spec in EXTRA_FINDINGS})
    for t in re.split(r"(?<=\.)\s+", text.lower()):
        loc = re.search(r"\b(left|right) (upper|lower) lobe", t)
        side = re.search(r"\b(left|right)\b", t)
        if "nodule" in t:
            if re.search(r"no pulmonary nodule|no nodule", t):
                out.update(nodule=False, nodule_side="none", nodule_lobe="none")
            elif loc:
                out.update(nodule=True, nodule_side=loc.group(1), nodule_lobe=loc.group(2))
        if "pleural effusion" in t:
            if "bilateral pleural effusion" in t:
                out["effusion"] = "bilateral"
            elif "no pleural effusion" in t:
                out["effusion"] = "none"
            elif m := re.search(r"\b(left|right) pleural effusion", t):
                out["effusion"] = m.group(1)
        if re.search(r"cardiomegaly|heart is enlarged", t):
            out["cardiomegaly"] = True
        elif re.search(r"heart size is normal|heart is normal in size", t):
            out["cardiomegaly"] = False
        if re.search(r"without emphysema|no emphysema", t):
            out["emphysema"] = False
        elif "emphysema" in t:
            out["emphysema"] = True
        for spec in EXTRA_FINDINGS:
            if re.search(spec.mention, t):
                if spec.kind == "location":
                    out[spec.name] = f"{loc.group(1)} {loc.group(2)}" if loc else out[spec.name]
                elif spec.kind == "side":
                    out[spec.name] = side.group(1) if side else out[spec.name]
                else:
                    out[spec.name] = True
    return out


def _form(template: str) -> str:
    fills = {"size": r"\d+", "side": "(?:left|right)", "lobe": "(?:upper|lower)"}
    return re.sub(r"\\\{(\w+)\\\}", lambda m: fills[m.group(1)], re.escape(template))


#: Every sentence a phantom report can hold, as one regular expression (sizes, sides and lobes filled in).
SENTENCE_FORMS = re.compile("|".join(
    _form(t) for bank in (_NODULE_POS, _NODULE_NEG, _EMPH_POS, _EMPH_NEG, _EFF_POS, _EFF_BIL, _EFF_NEG, _CARDIO_POS,
                          _CARDIO_NEG, *(spec.sentences for spec in EXTRA_FINDINGS)) for t in bank))


def report_sentences(text: str) -> list:
    """A report cut into its sentences (after each full stop)."""
    return [t for t in re.split(r"(?<=\.)\s+", text.strip()) if t]


def is_grammatical(sentence: str) -> bool:
    """Whether a sentence is one of the phantom grammar's forms, word for word (a generated report's sentence
    that is not, "There is a left upper lobe.", is broken)."""
    return SENTENCE_FORMS.fullmatch(sentence) is not None


#: The findings scored per phantom; nodule side/lobe only count where a nodule is present.
SCORED = ("nodule", "nodule_side", "nodule_lobe", "effusion", "cardiomegaly", "emphysema")


def truth_of(f: Findings) -> dict:
    d = f.to_dict()
    return {k: d[k] for k in SCORED}


def parsed_truth(f: Findings) -> dict:
    """What :func:`parse_report` should read from a faithful report of ``f``."""
    d = f.to_dict()
    d.pop("nodule_size_mm")
    return d


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
    present = [k for k in EXTRAS if getattr(f, k) not in (False, "none")]
    absent = [EXTRA_BY_NAME[k].option for k in EXTRAS if k not in present]
    absent = [absent[i] for i in rng.permutation(len(absent))]
    right = EXTRA_BY_NAME[present[int(rng.integers(len(present)))]].option if present else "none of these"
    qs.append(_mcq(rng, "Which of these abnormalities is seen?", right, absent[:3]))
    return qs


def make_phantom(seed: int, shape=(64, 96, 96), spacing=(5.0, 4.0, 4.0), with_masks: bool = False) -> Phantom:
    """The phantom with this seed: the same seed always gives the same volume, report and questions
    (``with_masks`` adds where its located findings are, and changes nothing else)."""
    rng = np.random.default_rng(seed)
    f = sample_findings(rng)
    masks: dict | None = {} if with_masks else None
    vol = render_volume(f, rng, shape=shape, spacing=spacing, masks=masks)
    return Phantom(volume=vol, spacing=tuple(float(s) for s in spacing), findings=f,
                   report=write_report(f, rng), questions=write_questions(f, rng), masks=masks or {})


#: The columns of a SAMF dataset CSV (``train.csv``, ``test.csv``).
CSV_FIELDS = ("image", "caption", "label")


def write_dataset_csv(path: str, rows: list) -> None:
    """A dataset CSV (:data:`CSV_FIELDS`), written atomically."""
    with atomic_file(path) as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


def _write_phantom(job: tuple) -> tuple:
    """One phantom of a dataset written as NIfTI: ``(split, csv row, its questions)`` (a worker's task)."""
    out_dir, i, phantom_seed, split, shape, spacing = job
    p = make_phantom(phantom_seed, shape=shape, spacing=spacing)
    rel = f"scans/phantom_{i:05d}.nii.gz"
    save_nifti(os.path.join(out_dir, rel), p.volume, p.spacing)
    return split, dict(image=rel, caption=p.report, label=json.dumps(p.findings.to_dict())), \
        [dict(image=rel, **q) for q in p.questions]


def generate_phantom_dataset(out_dir: str, n_train: int, n_test: int, seed: int = 0,
                             shape=(64, 96, 96), spacing=(5.0, 4.0, 4.0), progress: bool = True,
                             test_seed: int | None = None, workers: int = 1) -> dict:
    """Write ``n_train + n_test`` phantoms as NIfTI with their reports, labels and questions. Phantom ``i`` is
    ``make_phantom(seed * 1_000_003 + i)``; with ``test_seed`` the held-out ones come from that seed's own
    sequence instead (phantoms no training set of another seed holds). ``workers`` > 1 draws them in that many
    processes (each ends with this one, :mod:`samf.runtime.workers`); the files are the same."""
    import concurrent.futures as cf
    import multiprocessing

    from ..workers import DieWithParent

    os.makedirs(os.path.join(out_dir, "scans"), exist_ok=True)
    rows = {"train": [], "test": []}
    questions = []
    total = n_train + n_test
    jobs = [(out_dir, i, (test_seed * 1_000_003 + i - n_train) if test_seed is not None and i >= n_train
             else seed * 1_000_003 + i, "train" if i < n_train else "test", shape, spacing) for i in range(total)]
    pool = None if workers <= 1 or total < 2 * workers else cf.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=DieWithParent())
    try:
        done = pool.map(_write_phantom, jobs, chunksize=16) if pool else map(_write_phantom, jobs)
        for split, row, qs in progress_bar(done, total=total, desc="phantoms", disable=not progress, unit="scan"):
            rows[split].append(row)
            questions += qs
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    for split, r in rows.items():
        write_dataset_csv(os.path.join(out_dir, f"{split}.csv"), r)
    with atomic_file(os.path.join(out_dir, "questions.jsonl")) as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    return {k: len(v) for k, v in rows.items()}
