"""Turn a canonical HU volume into the slices the model sees; training and runtime share this exact code.

For each plane (axial, coronal, sagittal) ``S`` slices are placed evenly over the body (not over the air
around it), each sampled straight onto an ``image_size``² grid at ``pixel_spacing_mm`` centred on the
body, i.e. resampling, cropping and resizing happen in one separable linear interpolation. Each HU window
becomes a channel (lung, mediastinum, bone by default), mapped to [0, 1] then normalised to [-1, 1].
Volumes already normalised to [0, 1] (M3D, ``intensity == "unit"``) were windowed before we got them: their
value goes to every channel, mapped to [-1, 1] the same way. numpy only, vectorised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from samf.errors import ScanError

from .ct import Volume
from .guards import MIN_EXTENT_MM

PLANES = ("axial", "coronal", "sagittal")
#: (centre, width) in HU; the three standard chest windows, one channel each.
DEFAULT_WINDOWS = ((-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0))
#: What one slice shows: the thin plane at its position, or the maximum / mean over the slab it stands for
#: (the ``slab_samples`` planes evenly between it and its neighbours' midpoints).
SLAB_MODES = ("thin", "mip", "mean")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides what the model sees; written into the bundle manifest."""

    image_size: int = 224                 # ViT input side (224 for DINO ViT-B/16)
    pixel_spacing_mm: float = 1.5         # 224 px × 1.5 mm = a 336 mm field of view, a whole chest
    slices_per_plane: int = 8             # S; the model gets 3·S slices
    windows: tuple = DEFAULT_WINDOWS      # one channel per (centre, width) HU window
    body_threshold_hu: float = -500.0     # voxels above this are "body" when placing slices
    body_threshold_unit: float = 0.05     # the same for volumes normalised to [0, 1] (M3D)
    min_extent_mm: float = MIN_EXTENT_MM  # refuse scans thinner than this along any axis
    slab: str = "thin"                    # one of SLAB_MODES: "thin", or "mip"/"mean" over each slice's slab
    slab_samples: int = 5                 # planes sampled across each slab (mip/mean)

    @property
    def n_slices(self) -> int:
        return 3 * self.slices_per_plane

    @property
    def channels(self) -> int:
        return len(self.windows)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["windows"] = [list(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        d = dict(d)
        d["windows"] = tuple(tuple(float(v) for v in w) for w in d.get("windows", DEFAULT_WINDOWS))
        return cls(**d)


def _interp_axis(arr: np.ndarray, axis: int, coords: np.ndarray, fill: float) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional voxel ``coords``; outside -> ``fill``."""
    n = arr.shape[axis]
    i0 = np.floor(coords).astype(np.int64)
    w = (coords - i0).astype(np.float32)
    a0 = np.take(arr, np.clip(i0, 0, n - 1), axis=axis)
    a1 = np.take(arr, np.clip(i0 + 1, 0, n - 1), axis=axis)
    shape = [1] * arr.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    out = a0 * (1.0 - w) + a1 * w
    inside = ((coords >= 0.0) & (coords <= n - 1)).reshape(shape)
    return np.where(inside, out, np.float32(fill)).astype(np.float32, copy=False)


def body_box(vol: Volume, threshold: float) -> np.ndarray:
    """[3, 2] (lo, hi) voxel index per axis of everything denser than ``threshold``."""
    mask = vol.hu > threshold
    box = np.zeros((3, 2))
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            unit = "HU" if vol.intensity == "hu" else "(normalised)"
            raise ScanError(f"{vol.source}: no body found (nothing above {threshold:g} {unit})")
        box[ax] = idx[0], idx[-1]
    return box


@dataclass(frozen=True)
class SlicePlacement:
    """Where the model's ``3·S`` slices lie in the volume, so that a slice's weight can be traced back to anatomy
    (and, for DICOM, to a source image).

    ``positions[p, k]``: slice ``k`` of plane ``p`` (axial, coronal, sagittal) as a fractional voxel index along
    the plane's normal in the canonical ``[Z, Y, X]`` array (axial -> Z, coronal -> Y, sagittal -> X);
    ``step[p]``: voxels between neighbouring slices (the slab a ``mip``/``mean`` slice covers); ``centre``: the
    voxel the in-plane grids are centred on; ``affine``: canonical voxel ``(x, y, z)`` -> RAS mm (nibabel's), or
    None where the file records no position (then positions are measured from the first voxel)."""

    positions: np.ndarray
    step: np.ndarray
    centre: np.ndarray
    spacing: tuple
    thin: bool
    affine: np.ndarray | None = None

    def voxel_range(self, plane: int, k: int) -> tuple:
        """The closed range of voxel indices along the plane's normal that slice ``k`` reads: the two voxels a
        thin slice interpolates between, or its whole slab."""
        p = float(self.positions[plane, k])
        half = 0.0 if self.thin else float(self.step[plane]) / 2.0
        return int(np.floor(p - half)), int(np.ceil(p + half))

    def patient_point(self, plane: int, k: int) -> np.ndarray:
        """The slice's centre in DICOM patient coordinates (LPS, mm)."""
        zyx = np.array(self.centre, dtype=np.float64)
        zyx[plane] = self.positions[plane, k]
        if self.affine is None:
            ras = zyx[::-1] * np.asarray(self.spacing[::-1])
        else:
            ras = (np.asarray(self.affine) @ np.append(zyx[::-1], 1.0))[:3]
        return ras * np.array([-1.0, -1.0, 1.0])

    def patient_normal(self, plane: int) -> np.ndarray:
        """The unit normal of plane ``plane`` in patient coordinates (LPS)."""
        axis = np.zeros(4)
        axis[2 - plane] = 1.0  # canonical array axis `plane` is nibabel's axis 2 - plane
        ras = (np.asarray(self.affine) @ axis)[:3] if self.affine is not None else axis[:3]
        lps = ras * np.array([-1.0, -1.0, 1.0])
        return lps / np.linalg.norm(lps)


def place_slices(vol: Volume, cfg: PreprocessConfig) -> SlicePlacement:
    """Where :func:`cut_slices` puts its slices: ``S`` per plane, evenly over the body's extent along the plane's
    normal; refuses a scan too small to place them in."""
    hu, sp = vol.hu, np.asarray(vol.spacing, dtype=np.float64)
    extent = np.asarray(hu.shape) * sp
    if (extent < cfg.min_extent_mm).any() or min(hu.shape) < 2:
        raise ScanError(f"{vol.source}: scan extent {np.round(extent).astype(int).tolist()} mm is too small "
                        f"(every axis needs at least {cfg.min_extent_mm:.0f} mm)")
    unit = vol.intensity == "unit"
    box = body_box(vol, cfg.body_threshold_unit if unit else cfg.body_threshold_hu)
    S = cfg.slices_per_plane
    step = (box[:, 1] - box[:, 0]) / S
    positions = box[:, :1] + (np.arange(S)[None, :] + 0.5) * step[:, None]
    return SlicePlacement(positions=positions, step=step, centre=box.mean(axis=1), spacing=tuple(vol.spacing),
                          thin=cfg.slab == "thin", affine=vol.affine)


def cut_slices(vol: Volume, cfg: PreprocessConfig, placement: SlicePlacement | None = None) -> np.ndarray:
    """Slices ``[3·S, H, W]`` in the volume's values (HU, or [0, 1] for ``unit`` volumes): S per plane, in
    radiological display orientation, where :func:`place_slices` puts them."""
    hu, sp = vol.hu, np.asarray(vol.spacing, dtype=np.float64)
    placement = placement or place_slices(vol, cfg)
    unit = vol.intensity == "unit"
    centre_mm = placement.centre * sp
    S, n = cfg.slices_per_plane, cfg.image_size
    half = n * cfg.pixel_spacing_mm / 2.0
    # In-plane sampling grid in mm around the body centre, one per axis, converted to voxel coordinates.
    offs = (np.arange(n) + 0.5) * cfg.pixel_spacing_mm - half
    grid = [(centre_mm[a] + offs) / sp[a] for a in range(3)]
    # Display orientation: superior/anterior at the top, patient's right on the image's left.
    z_down, y_down, x_rl = grid[0][::-1], grid[1][::-1], grid[2][::-1]
    air = 0.0 if unit else -1024.0
    out = []
    for normal, (row_ax, rows), (col_ax, cols) in (
        (0, (1, y_down), (2, x_rl)),      # axial: rows anterior→posterior, cols right→left
        (1, (0, z_down), (2, x_rl)),      # coronal: rows superior→inferior, cols right→left
        (2, (0, z_down), (1, y_down)),    # sagittal: rows superior→inferior, cols anterior→posterior
    ):
        step, pos = placement.step[normal], placement.positions[normal]
        m = 1 if cfg.slab == "thin" else cfg.slab_samples
        if m > 1:  # m planes evenly across each slab, reduced below
            pos = (pos[:, None] + ((np.arange(m) + 0.5) / m - 0.5)[None, :] * step).ravel()
        s = _interp_axis(hu, normal, pos, air)          # slices stacked along `normal`
        if cfg.slab == "mean" and m > 1:
            # The in-plane interpolation below is linear with the same weights on every slice, so the slab's
            # mean can be taken first: m times less in-plane work, the same slices.
            s = _reduce_slab(s, normal, S, m, np.mean)
        s = _interp_axis(s, row_ax, rows, air)
        s = _interp_axis(s, col_ax, cols, air)
        if cfg.slab == "mip" and m > 1:  # the maximum does not commute with interpolation: taken last
            s = _reduce_slab(s, normal, S, m, np.max)
        # Put the slice axis first, rows second, columns third.
        out.append(np.moveaxis(s, (normal, row_ax, col_ax), (0, 1, 2)))
    return np.concatenate(out, axis=0)


def _reduce_slab(s: np.ndarray, normal: int, S: int, m: int, reduce) -> np.ndarray:
    """Collapse the ``S·m`` planes stacked along ``normal`` (``m`` per slab, in order) to ``S`` with ``reduce``."""
    shape = list(s.shape)
    shape[normal: normal + 1] = [S, m]
    return reduce(s.reshape(shape), axis=normal + 1).astype(np.float32, copy=False)


def apply_windows(slices_hu: np.ndarray, windows) -> np.ndarray:
    """``[K, H, W]`` HU -> ``[K, C, H, W]`` in [-1, 1], one channel per (centre, width) window."""
    w = np.asarray(windows, dtype=np.float32)
    lo = (w[:, 0] - w[:, 1] / 2).reshape(1, -1, 1, 1)
    width = w[:, 1].reshape(1, -1, 1, 1)
    x = np.clip((slices_hu[:, None] - lo) / width, 0.0, 1.0)
    return (x * 2.0 - 1.0).astype(np.float32)


def preprocess(vol: Volume, cfg: PreprocessConfig) -> np.ndarray:
    """The model input for one scan: ``[3·S, C, image_size, image_size]`` float32."""
    return preprocess_placed(vol, cfg)[0]


def preprocess_placed(vol: Volume, cfg: PreprocessConfig) -> tuple:
    """:func:`preprocess` and the :class:`SlicePlacement` of its slices (one pass over the volume for both)."""
    placement = place_slices(vol, cfg)
    s = cut_slices(vol, cfg, placement)
    if vol.intensity == "unit":   # already windowed: one value, every channel
        x = np.clip(s, 0.0, 1.0)[:, None] * 2.0 - 1.0
        return np.ascontiguousarray(np.broadcast_to(x, (s.shape[0], cfg.channels) + s.shape[1:]),
                                    dtype=np.float32), placement
    return apply_windows(s, cfg.windows), placement
