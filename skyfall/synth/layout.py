"""Procedural city layout: a road grid, blocks of box buildings, parks, trees and parked cars.

Everything is plain numpy (float64) so that a layout is cheap to build, exactly reproducible for a
seed (``np.random.default_rng`` / PCG64 is stable across numpy versions) and easy to serialise.

City styles (``STYLES``) are tables of numbers that drive one generator, so that the project can tune
on some kinds of city and judge on others. ``default`` is the original city: it draws exactly the
random numbers it always drew, and its layouts are pinned by checksums in tests. The features that only
other styles have (yawed buildings, L/T/U footprints, garden trees, cars) draw from a second random
stream (``[seed, 5]``), so they can never shift the default city's draws.

Boxes carry a yaw: box ``i`` is the axis-aligned box ``[box_lo[i], box_hi[i]]`` turned by
``box_yaw[i]`` radians (counter-clockwise seen from above, i.e. from east towards north) about the
vertical axis through its centre. Yaw 0 is the plain axis-aligned box.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from skyfall.errors import ConfigError

# Box kinds: the shader picks a material from these.
KIND_GROUND = 0  # the tile slab; its top face carries the road/pavement/grass texture
KIND_BUILDING = 1  # facades get a window grid, the top face a roof material
KIND_EQUIPMENT = 2  # roof AC units / stair houses: plain coloured boxes
KIND_TRUNK = 3  # tree trunks
KIND_CAR = 4  # transient cars: body colour with darker windows

SLAB_DEPTH_M = 2.0  # the ground is a slab [-S/2, S/2]^2 x [-SLAB_DEPTH_M, 0]: its sides are visible obliquely
CAR_SIZE_M = (4.5, 1.8, 1.5)  # nominal length, width, height of a car (each jittered a little)
_STREAM_EXTRAS = 5  # default_rng([seed, 5]): draws of the non-default features (see the module docstring)


_ROOF_PALETTE = np.array(
    [
        [0.62, 0.62, 0.60],  # light concrete
        [0.30, 0.30, 0.32],  # tar
        [0.55, 0.33, 0.26],  # terracotta
        [0.70, 0.70, 0.66],  # white membrane (dimmed to keep contrast moderate)
        [0.42, 0.45, 0.40],  # weathered green-grey
        [0.48, 0.40, 0.34],  # brown gravel
    ]
)
_FACADE_PALETTE = np.array(
    [
        [0.72, 0.66, 0.56],  # sandstone
        [0.60, 0.36, 0.30],  # brick
        [0.70, 0.70, 0.70],  # render
        [0.50, 0.55, 0.60],  # blue-grey cladding
        [0.78, 0.74, 0.64],  # cream
        [0.45, 0.42, 0.40],  # dark stone
    ]
)


_CAR_PALETTE = np.array(
    [
        [0.85, 0.85, 0.83],  # white
        [0.10, 0.10, 0.11],  # black
        [0.62, 0.63, 0.65],  # silver
        [0.38, 0.39, 0.41],  # grey
        [0.60, 0.12, 0.10],  # red
        [0.14, 0.24, 0.46],  # blue
        [0.16, 0.30, 0.20],  # dark green
        [0.70, 0.64, 0.50],  # beige
    ]
)


@dataclass(frozen=True)
class CityStyle:
    """The numbers of one city style. Pairs are ``(low, high)`` ranges of uniform draws.

    Attributes:
        n_dates: acquisition dates of the city (3-5; date 0 is the canonical one).
        first_road_m: distance of the first road centre line from the tile border.
        road_spacing_m: distance between neighbouring parallel roads (a block plus a road).
        four_lane_p: probability that a road has 4 lanes (else 2).
        sidewalk_m: pavement width on each side of every road.
        park_p: probability that a block is a park.
        park_m2_per_tree: park area per park tree.
        lot_side_m: a block is split until no lot side is longer than a draw from this range.
        empty_lot_p: probability that a lot stays empty (open concrete / parking).
        setback_m: gap between a lot's boundary and its building on every side.
        footprint_frac: each footprint side as a fraction of its lot's (after the setback), the
            footprint placed at a random spot of the lot: room for gardens.
        min_side_m: buildings narrower than this (after setback, footprint_frac and yaw fitting) are dropped.
        tower_p: probability that a building is a tower (a podium with a slimmer shaft on top).
        tower_min_side_m: only footprints wider than this can hold a tower.
        tower_h_m: tower height range.
        tower_inset: the shaft's inset from the podium edges, as a fraction of each side.
        h_median_m, h_sigma: lognormal height of the other buildings ...
        h_range_m: ... clipped to this range.
        max_equipment: roof units per roof are drawn from ``0 .. max_equipment - 1``.
        street_tree_p: probability of a street tree at each step along a pavement.
        street_tree_step_m: distance between street tree slots.
        garden_trees: ``(min, max)`` trees planted around each building inside its lot.
        block_yaw_p: probability that all buildings of a block share one yaw ...
        block_yaw_deg: ... drawn in ``±block_yaw_deg``.
        building_yaw_deg: otherwise each building's yaw is drawn in ``±building_yaw_deg`` (0: on the grid).
        compound_p: probability that a building (not a tower) has an L-, T- or U-shaped footprint.
        car_gap_m: free distance between consecutive car slots along a lane; ``(0, 0)``: no cars.
        car_date_p: probability that a car is present on each date (each car is present on >= 1 date).
    """

    n_dates: int = 5
    first_road_m: tuple[float, float] = (30, 60)
    road_spacing_m: tuple[float, float] = (52, 84)
    four_lane_p: float = 0.35
    sidewalk_m: float = 3.0
    park_p: float = 0.18
    park_m2_per_tree: float = 140
    lot_side_m: tuple[float, float] = (22, 36)
    empty_lot_p: float = 0.08
    setback_m: tuple[float, float] = (1.0, 3.0)
    footprint_frac: tuple[float, float] = (1.0, 1.0)
    min_side_m: float = 6
    tower_p: float = 0.14
    tower_min_side_m: float = 14
    tower_h_m: tuple[float, float] = (32, 60)
    tower_inset: tuple[float, float] = (0.15, 0.3)
    h_median_m: float = 13
    h_sigma: float = 0.4
    h_range_m: tuple[float, float] = (5, 28)
    max_equipment: int = 4
    street_tree_p: float = 0.7
    street_tree_step_m: tuple[float, float] = (8, 12)
    garden_trees: tuple[int, int] = (0, 0)
    block_yaw_p: float = 0.0
    block_yaw_deg: float = 0.0
    building_yaw_deg: float = 0.0
    compound_p: float = 0.0
    car_gap_m: tuple[float, float] = (0, 0)
    car_date_p: float = 0.5


# One row per style; "default" is the original city and must not change (its checksums are pinned).
STYLES: dict[str, CityStyle] = {
    "default": CityStyle(),
    # Dense and tall: narrow blocks, towers of 40-80 m on tight lots, wide pavements, few trees.
    "downtown": CityStyle(
        n_dates=4, first_road_m=(20, 40), road_spacing_m=(42, 60), four_lane_p=0.6, sidewalk_m=4.0,
        park_p=0.05, lot_side_m=(18, 28), empty_lot_p=0.03, setback_m=(0.3, 1.2), tower_p=0.55,
        tower_min_side_m=11, tower_h_m=(40, 80), tower_inset=(0.08, 0.18), h_median_m=20, h_sigma=0.35,
        h_range_m=(9, 38), street_tree_p=0.25, block_yaw_p=0.15, block_yaw_deg=15, compound_p=0.3,
        car_gap_m=(4, 22), car_date_p=0.55,
    ),
    # Low-rise houses of 4-10 m on small lots with gardens, wide road spacing, many trees.
    "suburb": CityStyle(
        n_dates=3, road_spacing_m=(64, 92), four_lane_p=0.1, sidewalk_m=2.0, park_p=0.12,
        park_m2_per_tree=100, lot_side_m=(18, 26), empty_lot_p=0.08, setback_m=(1.0, 2.0),
        footprint_frac=(0.55, 0.85), min_side_m=5, tower_p=0.0, h_median_m=6.5, h_sigma=0.25,
        h_range_m=(4, 10), max_equipment=1, street_tree_p=0.9, street_tree_step_m=(7, 10),
        garden_trees=(1, 4), block_yaw_p=0.3, block_yaw_deg=30, compound_p=0.35, car_gap_m=(14, 60),
        car_date_p=0.5,
    ),
    # Irregular: every building yawed (±45°), the widest ranges of block, lot and height, the most
    # L/T/U footprints, gardens and dense traffic.
    "mixed": CityStyle(
        first_road_m=(20, 60), road_spacing_m=(44, 96), four_lane_p=0.4, park_p=0.15,
        lot_side_m=(14, 38), empty_lot_p=0.1, setback_m=(0.5, 3.0), min_side_m=5, tower_p=0.3,
        tower_min_side_m=9, tower_h_m=(30, 75), h_median_m=11, h_sigma=0.55, h_range_m=(4, 36),
        garden_trees=(0, 2), block_yaw_p=0.3, block_yaw_deg=45, building_yaw_deg=45, compound_p=0.45,
        car_gap_m=(4, 30), car_date_p=0.45,
    ),
}  # fmt: skip


def city_style(name: str) -> CityStyle:
    """The style called ``name``; ConfigError (one line for the CLI) for an unknown name."""
    if name not in STYLES:
        raise ConfigError(f"unknown city style {name!r}; choose one of {', '.join(STYLES)}")
    return STYLES[name]


@dataclass
class Road:
    """A straight road across the whole tile. ``axis`` 0: runs north-south at x = centre; 1: east-west at y = centre."""

    axis: int
    centre: float
    half_width: float
    lanes: int


def _empty(*shape: int, dtype: type = np.float64) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


@dataclass
class Transients:
    """Objects that come and go between acquisition dates (cars): yawed boxes with a date set each.

    Attributes:
        lo, hi: [N, 3] boxes before their yaw (see the module docstring).
        yaw: [N] radians.
        albedo: [N, 3] body colours.
        dates: [N, D] bool: car n is present on date d.
    """

    lo: np.ndarray = field(default_factory=lambda: _empty(0, 3))
    hi: np.ndarray = field(default_factory=lambda: _empty(0, 3))
    yaw: np.ndarray = field(default_factory=lambda: _empty(0))
    albedo: np.ndarray = field(default_factory=lambda: _empty(0, 3))
    dates: np.ndarray = field(default_factory=lambda: _empty(0, 0, dtype=bool))

    def __len__(self) -> int:
        return len(self.lo)

    def on(self, date: int) -> np.ndarray:
        """[N] bool: present on ``date`` (dates beyond the table have none)."""
        if date >= self.dates.shape[1]:
            return np.zeros(len(self), dtype=bool)
        return self.dates[:, date]


@dataclass
class Layout:
    """All primitives of a city, in world metres (ENU, ground z = 0).

    Attributes:
        size_m: side of the square tile, centred at the origin.
        box_lo, box_hi: [B, 3] boxes before their yaw (row 0 is the ground slab).
        box_kind: [B] int, one of the ``KIND_*`` codes.
        box_albedo: [B, 3] facade / plain colour.
        box_roof: [B, 3] roof colour (buildings).
        box_params: [B, 4] facade window grid (floor height, window spacing, window width fraction,
            window height fraction); zeros for non-buildings.
        ell_center, ell_radii: [E, 3] tree crowns (axis-aligned ellipsoids).
        ell_albedo: [E, 3] crown colours.
        roads: the road grid (textures only: roads are flat).
        sidewalk_m: pavement width on each side of every road.
        parks: [P, 4] rectangles (x0, y0, x1, y1) covered with grass.
        box_yaw: [B] yaw of each box in radians (None: all 0, the axis-aligned boxes).
        transients: cars, present on some dates only; not part of the boxes above (see ``at_date``).
    """

    size_m: float
    box_lo: np.ndarray
    box_hi: np.ndarray
    box_kind: np.ndarray
    box_albedo: np.ndarray
    box_roof: np.ndarray
    box_params: np.ndarray
    ell_center: np.ndarray
    ell_radii: np.ndarray
    ell_albedo: np.ndarray
    roads: list[Road] = field(default_factory=list)
    sidewalk_m: float = 3.0
    parks: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    box_yaw: np.ndarray | None = None
    transients: Transients = field(default_factory=Transients)

    def __post_init__(self) -> None:
        if self.box_yaw is None:
            self.box_yaw = np.zeros(len(self.box_lo))

    @property
    def max_height(self) -> float:
        tops = [float(self.box_hi[:, 2].max())]
        if len(self.ell_center):
            tops.append(float((self.ell_center[:, 2] + self.ell_radii[:, 2]).max()))
        return max(tops)

    @property
    def oriented(self) -> bool:
        """True when some box has a yaw (renderers take the exact axis-aligned path otherwise)."""
        return bool(np.any(self.box_yaw))

    def checksum(self) -> str:
        """A short hash of all primitive arrays, to check that a rebuilt city is the same one.

        Yaws and transients are hashed only when there are any, so the checksums of axis-aligned
        cities without cars (the default style's) are those of the layouts before yaw existed.
        """
        import hashlib

        h = hashlib.sha256()
        for a in (self.box_lo, self.box_hi, self.box_kind, self.ell_center, self.ell_radii, self.parks):
            h.update(np.ascontiguousarray(np.round(a, 6)).tobytes())
        if self.oriented:
            h.update(np.ascontiguousarray(np.round(self.box_yaw, 6)).tobytes())
        t = self.transients
        if len(t):
            for a in (t.lo, t.hi, t.yaw, t.dates.astype(np.float64)):
                h.update(np.ascontiguousarray(np.round(a, 6)).tobytes())
        return h.hexdigest()[:16]

    def at_date(self, date: int | None) -> Layout:
        """The scene on ``date``: the static city plus the cars present then (``None``: static only).

        The cars are appended after the static boxes (kind ``KIND_CAR``), so primitive indices of the
        static city are the same on every date.
        """
        t = self.transients
        if date is None or not len(t):
            return self
        on = t.on(date)
        n = int(on.sum())
        return dataclasses.replace(
            self,
            box_lo=np.concatenate([self.box_lo, t.lo[on]]),
            box_hi=np.concatenate([self.box_hi, t.hi[on]]),
            box_kind=np.concatenate([self.box_kind, np.full(n, KIND_CAR, dtype=self.box_kind.dtype)]),
            box_albedo=np.concatenate([self.box_albedo, t.albedo[on]]),
            box_roof=np.concatenate([self.box_roof, t.albedo[on]]),
            box_params=np.concatenate([self.box_params, np.zeros((n, self.box_params.shape[1]))]),
            box_yaw=np.concatenate([self.box_yaw, t.yaw[on]]),
            transients=Transients(),
        )


# ---------------------------------------------------------------------------------------------------
# Yawed-box geometry (numpy; the raycaster has its own torch version)


def rotate_xy(x: np.ndarray, y: np.ndarray, yaw: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Turn vectors (x, y) by ``yaw`` radians counter-clockwise (from east towards north)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return c * x - s * y, s * x + c * y


def world_aabb(lo: np.ndarray, hi: np.ndarray, yaw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 3] lower/upper corners of the world bounding boxes of yawed boxes (exact where yaw = 0)."""
    c, h = 0.5 * (lo + hi), 0.5 * (hi - lo)
    ac, as_ = np.abs(np.cos(yaw)), np.abs(np.sin(yaw))
    hx = ac * h[..., 0] + as_ * h[..., 1]
    hy = as_ * h[..., 0] + ac * h[..., 1]
    hw = np.stack([hx, hy, h[..., 2]], -1)
    flat = (np.asarray(yaw) == 0)[..., None]
    return np.where(flat, lo, c - hw), np.where(flat, hi, c + hw)


def in_footprint(x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, yaw: float) -> np.ndarray:
    """Points (x, y) strictly inside the footprint of one yawed box (the DSM's coverage rule)."""
    cx, cy = 0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1])
    u, v = rotate_xy(x - cx, y - cy, -yaw)
    return (np.abs(u) < 0.5 * (hi[0] - lo[0])) & (np.abs(v) < 0.5 * (hi[1] - lo[1]))


def _turn_about(lo: tuple, hi: tuple, pivot: tuple[float, float], yaw: float) -> tuple[tuple, tuple]:
    """The box that ``[lo, hi]`` becomes when turned by ``yaw`` about the vertical axis at ``pivot``,
    written as (lo, hi) before its own yaw: only its centre moves."""
    cx, cy = 0.5 * (lo[0] + hi[0]) - pivot[0], 0.5 * (lo[1] + hi[1]) - pivot[1]
    rx, ry = rotate_xy(cx, cy, yaw)
    dx, dy = rx - cx, ry - cy
    return (lo[0] + dx, lo[1] + dy, lo[2]), (hi[0] + dx, hi[1] + dy, hi[2])


def _fit_turned(rect: tuple, yaw: float) -> tuple:
    """The largest rectangle of ``rect``'s proportions, centred on it, that stays inside it when turned by ``yaw``.

    A w x h rectangle turned by yaw spans (c w + s h) x (s w + c h), with c = |cos|, s = |sin|.
    """
    x0, y0, x1, y1 = rect
    w, h = x1 - x0, y1 - y0
    c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
    k = min(w / (c * w + s * h), h / (s * w + c * h))
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    return cx - 0.5 * k * w, cy - 0.5 * k * h, cx + 0.5 * k * w, cy + 0.5 * k * h


# ---------------------------------------------------------------------------------------------------
# Generator


class _Builder:
    def __init__(self) -> None:
        self.boxes: list[tuple] = []
        self.ells: list[tuple] = []

    def box(self, lo, hi, kind, albedo, roof=(0, 0, 0), params=(0, 0, 0, 0), yaw=0.0) -> None:  # noqa: ANN001
        self.boxes.append((lo, hi, kind, albedo, roof, params, yaw))

    def ellipsoid(self, c, r, albedo) -> None:  # noqa: ANN001
        self.ells.append((c, r, albedo))

    def tree(self, rng: np.random.Generator, x: float, y: float, scale: float = 1.0) -> None:
        rxy = rng.uniform(2.0, 3.6) * scale
        rz = rxy * rng.uniform(0.8, 1.2)
        trunk_h = rng.uniform(1.8, 3.2) * scale
        cz = trunk_h + rz
        green = np.array([0.20, 0.42, 0.16]) * rng.uniform(0.8, 1.15) + rng.uniform(-0.04, 0.04, 3)
        self.ellipsoid((x, y, cz), (rxy, rxy * rng.uniform(0.9, 1.1), rz), np.clip(green, 0.05, 1))
        tw = 0.25 * scale
        self.box((x - tw, y - tw, 0.0), (x + tw, y + tw, cz), KIND_TRUNK, (0.32, 0.24, 0.17))


def _road_positions(rng: np.random.Generator, size: float, style: CityStyle) -> list[float]:
    """Road centre lines across one axis (default: blocks of 48-80 m), none too close to the tile border."""
    half = size / 2
    pos, x = [], -half + rng.uniform(*style.first_road_m)
    while x < half - 25:
        pos.append(x)
        x += rng.uniform(*style.road_spacing_m)
    return pos or [0.0]


def _split_lots(rng: np.random.Generator, rect: tuple, max_side: float) -> list[tuple]:
    """Recursively split a block rectangle along its longer side into lots no longer than ``max_side``."""
    x0, y0, x1, y1 = rect
    w, h = x1 - x0, y1 - y0
    if max(w, h) <= max_side or min(w, h) < 10:
        return [rect]
    f = rng.uniform(0.35, 0.65)
    if w >= h:
        xm = x0 + f * w
        return _split_lots(rng, (x0, y0, xm, y1), max_side) + _split_lots(rng, (xm, y0, x1, y1), max_side)
    ym = y0 + f * h
    return _split_lots(rng, (x0, y0, x1, ym), max_side) + _split_lots(rng, (x0, ym, x1, y1), max_side)


def _building_yaw(xrng: np.random.Generator, style: CityStyle, block_yaw: float | None) -> float:
    """A block-wide yaw when the block has one, else the style's per-building yaw (0 on the grid)."""
    if block_yaw is not None:
        return block_yaw
    if style.building_yaw_deg:
        return math.radians(xrng.uniform(-style.building_yaw_deg, style.building_yaw_deg))
    return 0.0


def _place_in_lot(xrng: np.random.Generator, rect: tuple, frac: tuple[float, float]) -> tuple:
    """A smaller footprint (each side a ``frac`` draw of ``rect``'s) at a random spot inside ``rect``."""
    x0, y0, x1, y1 = rect
    w, h = (x1 - x0) * xrng.uniform(*frac), (y1 - y0) * xrng.uniform(*frac)
    fx, fy = xrng.uniform(0, 1, 2)
    x0, y0 = x0 + fx * (x1 - x0 - w), y0 + fy * (y1 - y0 - h)
    return x0, y0, x0 + w, y0 + h


# Footprints as unions of rectangles in the unit square (u0, v0, u1, v1); a, b are wing proportions.
def _footprint_parts(xrng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """An L, T or U footprint in the unit square, randomly transposed and mirrored; part 0 is the main wing."""
    a, b = xrng.uniform(0.4, 0.6), xrng.uniform(0.35, 0.55)
    shape = xrng.integers(3)
    if shape == 0:  # L: a bar along one side and a wing along another
        parts = [(0.0, 0.0, 1.0, a), (0.0, 0.0, b, 1.0)]
    elif shape == 1:  # T: a bar and a centred stem
        parts = [(0.0, 1.0 - a, 1.0, 1.0), (0.5 - b / 2, 0.0, 0.5 + b / 2, 1.0)]
    else:  # U: a bar and two arms around a courtyard
        arm = b / 2
        parts = [(0.0, 0.0, 1.0, a), (0.0, 0.0, arm, 1.0), (1.0 - arm, 0.0, 1.0, 1.0)]
    if xrng.random() < 0.5:
        parts = [(v0, u0, v1, u1) for u0, v0, u1, v1 in parts]
    if xrng.random() < 0.5:
        parts = [(1.0 - u1, v0, 1.0 - u0, v1) for u0, v0, u1, v1 in parts]
    if xrng.random() < 0.5:
        parts = [(u0, 1.0 - v1, u1, 1.0 - v0) for u0, v0, u1, v1 in parts]
    return parts


def _compound(
    xrng: np.random.Generator, rect: tuple, height: float, min_h: float
) -> list[tuple[tuple, float]]:
    """Rectangles (x0, y0, x1, y1) and heights of an L/T/U building filling ``rect``; wings may be lower
    (down to ``min_h``)."""
    x0, y0, x1, y1 = rect
    w, h = x1 - x0, y1 - y0
    out = []
    for i, (u0, v0, u1, v1) in enumerate(_footprint_parts(xrng)):
        hh = height if i == 0 else max(min_h, height * xrng.uniform(0.6, 1.0))
        out.append(((x0 + u0 * w, y0 + v0 * h, x0 + u1 * w, y0 + v1 * h), hh))
    return out


def _building(
    b: _Builder,
    rng: np.random.Generator,
    lot: tuple,
    style: CityStyle = STYLES["default"],
    xrng: np.random.Generator | None = None,
    block_yaw: float | None = None,
) -> None:
    """One building on ``lot``: a box, a tower (podium + shaft) or an L/T/U compound, with roof units.

    ``rng`` draws what the default city always drew, in the same order; ``xrng`` the rest (yaw,
    compound shapes, gardens). The building is built on the grid, then turned as a whole by its yaw
    about the lot centre, having first been shrunk so that it stays inside its lot when turned.
    """
    x0, y0, x1, y1 = lot
    setback = rng.uniform(*style.setback_m)
    x0, y0, x1, y1 = x0 + setback, y0 + setback, x1 - setback, y1 - setback
    if style.footprint_frac != (1.0, 1.0):
        x0, y0, x1, y1 = _place_in_lot(xrng, (x0, y0, x1, y1), style.footprint_frac)
    yaw = _building_yaw(xrng, style, block_yaw) if xrng is not None else 0.0
    if yaw and x1 > x0 and y1 > y0:
        x0, y0, x1, y1 = _fit_turned((x0, y0, x1, y1), yaw)
    if x1 - x0 < style.min_side_m or y1 - y0 < style.min_side_m:
        return
    pivot = (0.5 * (x0 + x1), 0.5 * (y0 + y1))
    parts: list[tuple] = []  # (lo, hi, kind, albedo, roof, params) on the grid; turned when emitted
    tower = rng.random() < style.tower_p and min(x1 - x0, y1 - y0) > style.tower_min_side_m
    if tower:
        height = rng.uniform(*style.tower_h_m)
    else:
        h = rng.lognormal(np.log(style.h_median_m), style.h_sigma)
        height = float(np.clip(h, *style.h_range_m))
    facade = _FACADE_PALETTE[rng.integers(len(_FACADE_PALETTE))] * rng.uniform(0.9, 1.08)
    roof = _ROOF_PALETTE[rng.integers(len(_ROOF_PALETTE))] * rng.uniform(0.9, 1.08)
    floor_h = rng.uniform(3.0, 3.8)
    params = (floor_h, rng.uniform(2.6, 4.0), rng.uniform(0.45, 0.65), rng.uniform(0.45, 0.6))
    if tower:
        # A podium with a slimmer tower on top: towers get setbacks like real high-rises.
        podium_h = floor_h * rng.integers(2, 5)
        parts.append(((x0, y0, 0.0), (x1, y1, podium_h), KIND_BUILDING, facade, roof, params))
        inset = rng.uniform(*style.tower_inset)
        dx, dy = (x1 - x0) * inset, (y1 - y0) * inset
        x0, y0, x1, y1 = x0 + dx, y0 + dy, x1 - dx, y1 - dy
        facade = _FACADE_PALETTE[rng.integers(len(_FACADE_PALETTE))]
        params = (floor_h, params[1], 0.7, 0.62)
    wings = [((x0, y0, x1, y1), height)]
    if not tower and style.compound_p and min(x1 - x0, y1 - y0) >= 10 and xrng.random() < style.compound_p:
        wings = _compound(xrng, (x0, y0, x1, y1), height, style.h_range_m[0])
        x0, y0, x1, y1 = wings[0][0]  # roof units go on the main wing
    facade, roof = np.clip(facade, 0, 1), np.clip(roof, 0, 1)
    for (wx0, wy0, wx1, wy1), wh in wings:
        parts.append(((wx0, wy0, 0.0), (wx1, wy1, wh), KIND_BUILDING, facade, roof, params))
    # Roof equipment: AC units and a stair house, inset from the parapet.
    w, h = x1 - x0, y1 - y0
    for _ in range(int(rng.integers(0, style.max_equipment)) if min(w, h) > 9 else 0):
        sx, sy, sz = rng.uniform(1.6, 3.5), rng.uniform(1.6, 3.5), rng.uniform(1.0, 2.2)
        ex = rng.uniform(x0 + 1.5, x1 - 1.5 - sx)
        ey = rng.uniform(y0 + 1.5, y1 - 1.5 - sy)
        grey = rng.uniform(0.5, 0.78)
        parts.append(
            ((ex, ey, height), (ex + sx, ey + sy, height + sz), KIND_EQUIPMENT, (grey, grey, grey * 0.97))
        )
    placed = []
    for lo, hi, *rest in parts:
        if yaw:
            lo, hi = _turn_about(lo, hi, pivot, yaw)
        b.box(lo, hi, *rest, yaw=yaw)
        placed.append((lo, hi))
    if style.garden_trees[1] and xrng is not None:
        _garden(b, xrng, lot, style, placed, yaw)


def _garden(
    b: _Builder, xrng: np.random.Generator, lot: tuple, style: CityStyle, boxes: list[tuple], yaw: float
) -> None:
    """A few trees in the lot around its building (``boxes``: (lo, hi) turned by ``yaw``), clear of the
    building's walls and of each other."""
    x0, y0, x1, y1 = lot
    lo = np.array([p[0] for p in boxes], dtype=np.float64)
    hi = np.array([p[1] for p in boxes], dtype=np.float64)
    wlo, whi = world_aabb(lo, hi, np.full(len(lo), yaw))
    placed: list[tuple[float, float]] = []
    want = int(xrng.integers(style.garden_trees[0], style.garden_trees[1] + 1))
    for _ in range(4 * want):
        if len(placed) == want or x1 - x0 < 5 or y1 - y0 < 5:
            break
        x, y = xrng.uniform(x0 + 1.5, x1 - 1.5), xrng.uniform(y0 + 1.5, y1 - 1.5)
        # Distance from (x, y) to each wall's bounding box: 0 inside.
        gap = np.hypot(np.maximum(np.maximum(wlo[:, 0] - x, x - whi[:, 0]), 0),
                       np.maximum(np.maximum(wlo[:, 1] - y, y - whi[:, 1]), 0))  # fmt: skip
        if gap.min() < 1.5 or any(math.hypot(x - px, y - py) < 4.0 for px, py in placed):
            continue
        b.tree(xrng, x, y, xrng.uniform(0.6, 0.95))
        placed.append((x, y))


def _lane_offsets(road: Road) -> list[float]:
    """Signed distances of the lane centre lines from the road centre (3.5 m lanes, half each way)."""
    per_side = road.lanes // 2
    return [side * (1.75 + 3.5 * k) for side in (-1.0, 1.0) for k in range(per_side)]


def _car(xrng: np.random.Generator, road: Road, off: float, mid: float, length: float) -> tuple:
    """One car centred ``mid`` along ``road``, in the lane at ``off``: its (lo, hi, yaw, albedo)."""
    width, height = CAR_SIZE_M[1] * xrng.uniform(0.93, 1.07), CAR_SIZE_M[2] * xrng.uniform(0.9, 1.1)
    c = [0.0, 0.0]
    c[road.axis] = road.centre + off + xrng.uniform(-0.3, 0.3)
    c[1 - road.axis] = mid
    lo = (c[0] - length / 2, c[1] - width / 2, 0.0)
    hi = (c[0] + length / 2, c[1] + width / 2, height)
    # Boxes are long along x: cars on north-south roads (axis 0) are turned by 90 degrees.
    yaw = math.pi / 2 * (road.axis == 0) + xrng.normal(0.0, 0.03)
    albedo = np.clip(_CAR_PALETTE[xrng.integers(len(_CAR_PALETTE))] * xrng.uniform(0.9, 1.1), 0, 1)
    return lo, hi, yaw, albedo


def _cars(xrng: np.random.Generator, roads: list[Road], half: float, style: CityStyle) -> Transients:
    """Cars in the lanes, off the intersections, heading along their road; each on a random set of dates.

    Car slots along a lane are drawn once (so cars never overlap on any date); each slot's car is
    present on each date with ``style.car_date_p`` (at least one date), like traffic and parking
    that change between acquisitions.
    """
    if not style.car_gap_m[1]:
        return Transients()
    cars = []
    for r in roads:
        for off in _lane_offsets(r):
            t = -half + xrng.uniform(2, 12)
            while True:
                length = CAR_SIZE_M[0] * xrng.uniform(0.9, 1.1)
                mid = t + 0.5 * length
                if t + length > half - 2:
                    break
                t += length + xrng.uniform(*style.car_gap_m)
                if any(o.axis != r.axis and abs(mid - o.centre) < o.half_width + 1.0 + length for o in roads):
                    continue  # keep intersections (and the zebra crossings before them) clear
                car = _car(xrng, r, off, mid, length)
                on = xrng.random(style.n_dates) < style.car_date_p
                if not on.any():
                    on[xrng.integers(style.n_dates)] = True
                cars.append((*car, on))
    if not cars:
        return Transients()
    lo, hi, yaw, albedo, on = (np.array(a) for a in zip(*cars, strict=True))
    return Transients(lo, hi, yaw, albedo, on.astype(bool))


def generate_layout(seed: int, size_m: float = 256.0, style: str = "default") -> Layout:
    """Build the city for ``seed`` in ``style`` (see ``STYLES``): deterministic, all primitives inside the tile."""
    st = city_style(style)
    rng = np.random.default_rng(seed)
    # The default style never draws from xrng: its layouts stay those of the original generator.
    xrng = None if style == "default" else np.random.default_rng([seed, _STREAM_EXTRAS])
    half = size_m / 2
    b = _Builder()
    b.box((-half, -half, -SLAB_DEPTH_M), (half, half, 0.0), KIND_GROUND, (0.36, 0.30, 0.24))

    roads: list[Road] = []
    for axis in (0, 1):
        for c in _road_positions(rng, size_m, st):
            lanes = 4 if rng.random() < st.four_lane_p else 2
            roads.append(Road(axis, float(c), 1.75 * lanes + 0.75, lanes))
    sidewalk = st.sidewalk_m

    def cuts(axis: int) -> list[tuple[float, float]]:
        """Free intervals between roads (and pavements) along one axis."""
        rs = sorted((r.centre, r.half_width + sidewalk) for r in roads if r.axis == axis)
        out, start = [], -half
        for c, hw in rs:
            out.append((start, c - hw))
            start = c + hw
        out.append((start, half))
        return [(a, e) for a, e in out if e - a > 8]

    parks = []
    for bx0, bx1 in cuts(0):
        for by0, by1 in cuts(1):
            block = (bx0 + 0.5, by0 + 0.5, bx1 - 0.5, by1 - 0.5)
            if rng.random() < st.park_p:
                parks.append(block)
                area = (bx1 - bx0) * (by1 - by0)
                for _ in range(int(area / st.park_m2_per_tree)):
                    b.tree(
                        rng,
                        rng.uniform(bx0 + 4, bx1 - 4),
                        rng.uniform(by0 + 4, by1 - 4),
                        rng.uniform(0.9, 1.3),
                    )
                continue
            block_yaw = None
            if st.block_yaw_p and xrng.random() < st.block_yaw_p:
                block_yaw = math.radians(xrng.uniform(-st.block_yaw_deg, st.block_yaw_deg))
            for lot in _split_lots(rng, block, max_side=rng.uniform(*st.lot_side_m)):
                if rng.random() < st.empty_lot_p:
                    continue  # an empty lot: open concrete / parking
                _building(b, rng, lot, st, xrng, block_yaw)

    # Street trees on the pavements, skipping intersections.
    for r in roads:
        off = r.half_width + sidewalk * 0.5
        for side in (-1, 1):
            t = -half + rng.uniform(4, 9)
            while t < half - 4:
                p = [0.0, 0.0]
                p[r.axis] = r.centre + side * off
                p[1 - r.axis] = t
                crossing = any(
                    o.axis != r.axis and abs(t - o.centre) < o.half_width + sidewalk + 4 for o in roads
                )
                if not crossing and rng.random() < st.street_tree_p:
                    b.tree(rng, p[0], p[1], 0.8)
                t += rng.uniform(*st.street_tree_step_m)

    cars = _cars(xrng, roads, half, st) if xrng is not None else Transients()
    lo = np.array([x[0] for x in b.boxes], dtype=np.float64)
    hi = np.array([x[1] for x in b.boxes], dtype=np.float64)
    return Layout(
        size_m=float(size_m),
        box_lo=lo,
        box_hi=hi,
        box_kind=np.array([x[2] for x in b.boxes], dtype=np.int64),
        box_albedo=np.array([x[3] for x in b.boxes], dtype=np.float64),
        box_roof=np.array([x[4] for x in b.boxes], dtype=np.float64),
        box_params=np.array([x[5] for x in b.boxes], dtype=np.float64),
        ell_center=np.array([x[0] for x in b.ells], dtype=np.float64).reshape(-1, 3),
        ell_radii=np.array([x[1] for x in b.ells], dtype=np.float64).reshape(-1, 3),
        ell_albedo=np.array([x[2] for x in b.ells], dtype=np.float64).reshape(-1, 3),
        roads=roads,
        sidewalk_m=sidewalk,
        parks=np.array(parks, dtype=np.float64).reshape(-1, 4),
        box_yaw=np.array([x[6] for x in b.boxes], dtype=np.float64),
        transients=cars,
    )
