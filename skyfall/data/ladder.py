"""The altitude ladder: co-registered views of look-at targets from street level to 350 m.

AerialMegaDepth (Vuong et al., CVPR 2025) pairs ground photos with renders of the same place from
aerial altitudes; the ladder reproduces that sampling on a tile. ``skyfall export-views`` renders it
from a reconstruction (heights from the rendered DSM) and ``skyfall synth`` renders it as ground
truth (heights from the city's exact DSM): both place cameras with ``place_ladder`` so their views
are the same for the same heights.

The camera rule (world frame: the tile's local ENU, metres, z up; OpenCV cameras, up = +z):

* **Targets**: the cell centres of an N x N grid over the tile's central area (the middle half of
  each axis). A target on a roof or under a tree moves to the nearest open-ground point within
  ``TARGET_SNAP_M`` (when there is one), so that street-level views can see it; its z is the local
  ground height there.
* **Eye**: for altitude ``a`` and azimuth ``phi`` (counter-clockwise from east, the direction from
  the target to the camera), the eye is at horizontal distance ``STANDOFF_M`` from the target,
  ``(x, y) = target + d (cos phi, sin phi)``, and at height ``ground(x, y) + a``. It looks at the
  target, which sits at the image centre. A fixed standoff makes the pitch (the depression angle
  ``atan((z_eye - z_target) / d)``) follow the altitude: about 3 deg at 1.7 m and 9.5 deg at 5 m
  (near-horizontal, looking along the street), 34 deg at 20 m, 59 deg at 50 m, 73 deg at 100 m and
  85 deg at 350 m (oblique to near-nadir): one camera column per target and azimuth, like a drone
  rising above one street corner.
* **Validity**: "ground" is the lowest surface within ``GROUND_RADIUS_M`` (a square neighbourhood
  wider than a city block's buildings; robustly: the 5th percentile of 2 m block medians, so that a
  few cells of a rendered DSM below the true ground do not sink it). A camera of the ground band (below 10 m) is valid only where the
  surface within ``CLEARANCE_RADIUS_M`` of its (x, y) is within ``GROUND_TOLERANCE_M`` of the local
  ground: never inside a building, a tree crown or a wall. An aerial camera needs
  ``AERIAL_CLEARANCE_M`` between that surface and its eye. A ground-band camera also needs a line
  of sight to its target (a street view facing a wall a few metres away shares nothing with the
  aerial views): the surface along the eye-target segment (its last ``SIGHT_END_M`` excluded, where
  the line meets the ground) stays below the line plus ``SIGHT_TOLERANCE_M``. Aerial views see the
  target's surroundings even where a tall building hides the target itself, so they need no sight
  line.
* **Relocation**: an invalid camera moves along its azimuth circle, trying offsets ``+s, -s, +2s,
  -2s, ...`` (``s = AZIMUTH_STEP_DEG``) short of halfway to the neighbouring azimuth; the first valid
  position wins. None valid: the camera is skipped (and reported).
* **Bands**: ``ground`` (a < 10 m), ``low`` (10 <= a < 100 m), ``high`` (a >= 100 m).

Heights come from a raster (``HeightField``): NaN cells are unknown, and a camera over unknown
ground is invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from skyfall.data.cameras import Cameras, intrinsics_from_fov, look_at

# AerialMegaDepth's range: eye height of a pedestrian to a high drone / low aircraft.
DEFAULT_ALTITUDES_M = (1.7, 5.0, 20.0, 50.0, 100.0, 200.0, 350.0)
STANDOFF_M = 30.0
BAND_EDGES_M = (10.0, 100.0)
BANDS = ("ground", "low", "high")
GROUND_RADIUS_M = 20.0
GROUND_PERCENTILE = 5.0
GROUND_CELL_M = 2.0
GROUND_TOLERANCE_M = 0.5
CLEARANCE_RADIUS_M = 1.0
AERIAL_CLEARANCE_M = 2.0
SIGHT_TOLERANCE_M = 1.0
SIGHT_END_M = 3.0
AZIMUTH_STEP_DEG = 5.0
TARGET_SNAP_M = 10.0
CENTRAL_FRACTION = 0.5


def band_of(altitude_m: float) -> str:
    """``ground`` below 10 m, ``low`` below 100 m, ``high`` above."""
    for edge, name in zip(BAND_EDGES_M, BANDS, strict=False):
        if altitude_m < edge:
            return name
    return BANDS[-1]


def altitude_tag(altitude_m: float) -> str:
    """File-name-safe altitude label: 1.7 -> ``1p7m``, 350 -> ``350m`` (no dot before the suffix)."""
    return f"{altitude_m:g}".replace(".", "p") + "m"


def set_name(altitude_m: float) -> str:
    """Ground-truth view-set folder of one rung: ``ladder_1.7m``, ``ladder_350m``."""
    return f"ladder_{altitude_m:g}m"


def view_name(target: int, altitude_m: float, azimuth: int) -> str:
    """``t00_1p7m_az00``: target index, altitude, azimuth index."""
    return f"t{target:02d}_{altitude_tag(altitude_m)}_az{azimuth:02d}"


def check_altitudes(altitudes: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """The altitudes as floats; ValueError for an empty list, a repeat or a value that is not > 0."""
    alts = tuple(float(a) for a in altitudes)
    if not alts:
        raise ValueError("at least one altitude is needed")
    bad = [a for a in alts if not (math.isfinite(a) and a > 0)]
    if bad:
        raise ValueError(f"altitudes must be finite and > 0 m, got {bad[0]:g}")
    if len(set(alts)) != len(alts) or len({altitude_tag(a) for a in alts}) != len(alts):
        raise ValueError("altitudes must not repeat")
    return alts


def target_grid(extent: tuple[float, float, float, float], n: int) -> np.ndarray:
    """[n * n, 2] cell centres of an n x n grid over the central area of ``extent`` (x0, x1, y0, y1),
    row-major from the north-west corner."""
    x0, x1, y0, y1 = extent
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    hw, hh = 0.5 * CENTRAL_FRACTION * (x1 - x0), 0.5 * CENTRAL_FRACTION * (y1 - y0)
    xs = cx - hw + (np.arange(n) + 0.5) * (2 * hw / n)
    ys = cy + hh - (np.arange(n) + 0.5) * (2 * hh / n)
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    return np.stack([gx.reshape(-1), gy.reshape(-1)], -1)


def _disc(radius_cells: float) -> np.ndarray:
    r = int(math.floor(radius_cells))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx**2 + yy**2) <= radius_cells**2 + 1e-9


def _robust_ground(h: np.ndarray, res: float) -> np.ndarray:
    """Local ground: the ``GROUND_PERCENTILE``-th percentile of the surface within a square of
    half-side ``GROUND_RADIUS_M``, computed on ``GROUND_CELL_M`` blocks (their medians).

    Not the plain minimum: a rendered DSM has isolated cells metres below the true ground (floaters,
    holes), and one of them would sink the ground of a whole block. Unknown cells do not count.
    """
    from scipy import ndimage

    b = max(1, int(round(GROUND_CELL_M / res)))
    hh, ww = h.shape
    ph, pw = -hh % b, -ww % b
    padded = np.pad(h, ((0, ph), (0, pw)), constant_values=np.nan)
    blocks = (
        padded.reshape((hh + ph) // b, b, (ww + pw) // b, b)
        .transpose(0, 2, 1, 3)
        .reshape((hh + ph) // b, (ww + pw) // b, b * b)
    )
    known = np.isfinite(blocks).any(-1)
    med = np.full(known.shape, np.inf)
    med[known] = np.nanmedian(blocks[known], axis=-1)
    r = max(1, int(round(GROUND_RADIUS_M / (b * res))))
    low = ndimage.percentile_filter(med, GROUND_PERCENTILE, size=2 * r + 1, mode="nearest")
    low = np.repeat(np.repeat(low, b, 0), b, 1)[:hh, :ww]
    return np.where(np.isfinite(low), low, np.nan)


@dataclass
class HeightField:
    """Surface heights on a north-up raster (cell (i, j) centre: ``(x_min + (j + .5) res, y_max - (i
    + .5) res)``; NaN = unknown) and the two fields the ladder reads from it.

    ``ground``: the local ground (``_robust_ground``: a low percentile of the surface within
    ``GROUND_RADIUS_M``); ``top``: the highest within
    ``CLEARANCE_RADIUS_M`` of any point of a cell (unknown cells count as +inf, so a camera next to a
    hole is not trusted).
    """

    heights: np.ndarray
    x_min: float
    y_max: float
    resolution: float
    ground: np.ndarray = field(init=False, repr=False)
    top: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from scipy import ndimage

        h = np.asarray(self.heights, np.float64)
        self.heights = h
        res = float(self.resolution)
        self.ground = _robust_ground(h, res)
        # Cells are read at the eye's cell: widen the disc by a cell diagonal so that it holds every
        # cell whose centre is within CLEARANCE_RADIUS_M of the eye itself.
        high = ndimage.maximum_filter(
            np.where(np.isfinite(h), h, np.inf),
            footprint=_disc(CLEARANCE_RADIUS_M / res + math.sqrt(2)),
            mode="nearest",
        )
        self.top = np.where(np.isfinite(high), high, np.nan)

    def _index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        j = np.floor((np.asarray(x, np.float64) - self.x_min) / self.resolution).astype(np.int64)
        i = np.floor((self.y_max - np.asarray(y, np.float64)) / self.resolution).astype(np.int64)
        h, w = self.heights.shape
        inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
        return np.clip(i, 0, h - 1), np.clip(j, 0, w - 1), inside

    def sample(self, raster: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Nearest-cell value of ``raster`` (one of heights, ground, top) at world (x, y); NaN outside."""
        i, j, inside = self._index(x, y)
        return np.where(inside, raster[i, j], np.nan)

    def surface_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.sample(self.heights, x, y)

    def ground_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.sample(self.ground, x, y)

    def top_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.sample(self.top, x, y)

    def open_ground(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether nothing stands within ``CLEARANCE_RADIUS_M`` of (x, y): the top there is within
        ``GROUND_TOLERANCE_M`` of the local ground."""
        g, t = self.ground_at(x, y), self.top_at(x, y)
        return np.isfinite(g) & np.isfinite(t) & (t <= g + GROUND_TOLERANCE_M)


@dataclass
class LadderView:
    """One placed camera of the ladder."""

    name: str
    target_index: int
    target: tuple[float, float, float]
    altitude_m: float
    band: str
    azimuth_index: int
    azimuth_deg: float  # where the rule put it (after any relocation)
    requested_azimuth_deg: float
    eye: tuple[float, float, float]
    pitch_deg: float  # depression angle below the horizon

    @property
    def moved(self) -> bool:
        return self.azimuth_deg != self.requested_azimuth_deg


@dataclass
class Ladder:
    """Placed views (``cameras[k]`` is ``views[k]``) and the cameras no valid position was found for."""

    views: list[LadderView]
    cameras: Cameras
    skipped: list[dict]

    @property
    def moved(self) -> int:
        return sum(v.moved for v in self.views)

    def summary(self) -> str:
        n = len(self.views) + len(self.skipped)
        return (
            f"{len(self.views)} of {n} ladder cameras placed, {self.moved} of them moved along their azimuth "
            f"circle; {len(self.skipped)} skipped (no position outside buildings, or at street level none "
            "that sees the target)"
        )


def snap_target(height: HeightField, xy: np.ndarray) -> np.ndarray:
    """The nearest open-ground point within ``TARGET_SNAP_M`` of ``xy`` (``xy`` itself if open or if
    there is none), on the raster's cell centres."""
    x, y = float(xy[0]), float(xy[1])
    if bool(height.open_ground(np.array([x]), np.array([y]))[0]):
        return np.array([x, y])
    res = height.resolution
    r = int(math.ceil(TARGET_SNAP_M / res))
    off = np.arange(-r, r + 1) * res
    ox, oy = np.meshgrid(off, off, indexing="xy")
    d2 = (ox**2 + oy**2).reshape(-1)
    cand = np.stack([x + ox.reshape(-1), y + oy.reshape(-1)], -1)
    ok = (d2 <= TARGET_SNAP_M**2) & height.open_ground(cand[:, 0], cand[:, 1])
    if not ok.any():
        return np.array([x, y])
    k = np.flatnonzero(ok)[np.argmin(d2[ok])]
    return cand[k]


def _sight_clear(height: HeightField, eye: np.ndarray, target: np.ndarray) -> bool:
    horiz = float(np.hypot(*(eye[:2] - target[:2])))
    span = horiz - SIGHT_END_M
    if span <= 0:
        return True
    n = max(2, int(math.ceil(span / (0.5 * height.resolution))))
    s = np.linspace(0.0, span / horiz, n)  # fraction of the way from the eye to the target
    pts = eye[None] + s[:, None] * (target - eye)[None]
    surf = height.surface_at(pts[:, 0], pts[:, 1])
    known = np.isfinite(surf)
    return bool((surf[known] <= pts[known, 2] + SIGHT_TOLERANCE_M).all())


def camera_position(
    height: HeightField, target: np.ndarray, altitude_m: float, azimuth_deg: float, standoff_m: float
) -> tuple[np.ndarray, bool]:
    """The eye of one (target, altitude, azimuth) and whether the rule accepts it there."""
    phi = math.radians(azimuth_deg)
    x = float(target[0]) + standoff_m * math.cos(phi)
    y = float(target[1]) + standoff_m * math.sin(phi)
    g = float(height.ground_at(np.array([x]), np.array([y]))[0])
    if not math.isfinite(g):
        return np.array([x, y, math.nan]), False
    eye = np.array([x, y, g + altitude_m])
    top = float(height.top_at(np.array([x]), np.array([y]))[0])
    if band_of(altitude_m) == "ground":
        ok = math.isfinite(top) and top <= g + GROUND_TOLERANCE_M
        return eye, ok and _sight_clear(height, eye, np.asarray(target, np.float64))
    return eye, math.isfinite(top) and top <= eye[2] - AERIAL_CLEARANCE_M


def azimuth_offsets(n_azimuths: int) -> list[float]:
    """Relocation offsets in degrees, in the order tried: 0, +s, -s, +2s, ... short of halfway to the
    neighbouring azimuth."""
    half = 180.0 / n_azimuths
    out = [0.0]
    k = 1
    while k * AZIMUTH_STEP_DEG < half - 1e-9:
        out += [k * AZIMUTH_STEP_DEG, -k * AZIMUTH_STEP_DEG]
        k += 1
    return out


def place_ladder(
    height: HeightField,
    extent: tuple[float, float, float, float],
    *,
    altitudes: tuple[float, ...] = DEFAULT_ALTITUDES_M,
    n_targets: int = 2,
    n_azimuths: int = 4,
    fov_deg: float = 60.0,
    size: int = 512,
    standoff_m: float = STANDOFF_M,
) -> Ladder:
    """Cameras of the ladder over ``extent`` (x0, x1, y0, y1) by the rule of the module docstring.

    Views are ordered by target, then altitude (low to high), then azimuth; names ``view_name``.
    Intrinsics: ``intrinsics_from_fov(fov_deg, size, size)`` (square, centred principal point).
    """
    alts = check_altitudes(altitudes)
    offsets = azimuth_offsets(n_azimuths)
    views: list[LadderView] = []
    c2ws: list[torch.Tensor] = []
    skipped: list[dict] = []
    for ti, xy in enumerate(target_grid(extent, n_targets)):
        sxy = snap_target(height, xy)
        gz = float(height.ground_at(sxy[:1], sxy[1:])[0])
        target = np.array([sxy[0], sxy[1], gz if math.isfinite(gz) else 0.0])
        for alt in alts:
            for ai in range(n_azimuths):
                base = 360.0 * ai / n_azimuths
                name = view_name(ti, alt, ai)
                for off in offsets:
                    eye, ok = camera_position(height, target, alt, base + off, standoff_m)
                    if ok:
                        break
                if not ok:
                    skipped.append({"name": name, "target_index": ti, "altitude_m": alt, "azimuth_deg": base})
                    continue
                pitch = math.degrees(math.atan2(eye[2] - target[2], standoff_m))
                views.append(
                    LadderView(
                        name=name,
                        target_index=ti,
                        target=(float(target[0]), float(target[1]), float(target[2])),
                        altitude_m=alt,
                        band=band_of(alt),
                        azimuth_index=ai,
                        azimuth_deg=float((base + off) % 360.0),
                        requested_azimuth_deg=base,
                        eye=(float(eye[0]), float(eye[1]), float(eye[2])),
                        pitch_deg=pitch,
                    )
                )
                c2ws.append(look_at(torch.from_numpy(eye), torch.from_numpy(target)))
    k = intrinsics_from_fov(fov_deg, size, size)
    c2w = torch.stack(c2ws) if c2ws else torch.zeros(0, 4, 4, dtype=torch.float64)
    return Ladder(views, Cameras(c2w, k[None].expand(len(c2w), 3, 3).clone(), size, size), skipped)
