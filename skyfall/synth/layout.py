"""Procedural city layout: a road grid, blocks of box buildings, parks and trees.

Everything is plain numpy (float64) so that a layout is cheap to build, exactly reproducible for a
seed (``np.random.default_rng`` / PCG64 is stable across numpy versions) and easy to serialise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Box kinds: the shader picks a material from these.
KIND_GROUND = 0  # the tile slab; its top face carries the road/pavement/grass texture
KIND_BUILDING = 1  # facades get a window grid, the top face a roof material
KIND_EQUIPMENT = 2  # roof AC units / stair houses: plain coloured boxes
KIND_TRUNK = 3  # tree trunks

SLAB_DEPTH_M = 2.0  # the ground is a slab [-S/2, S/2]^2 x [-SLAB_DEPTH_M, 0]: its sides are visible obliquely

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


@dataclass
class Road:
    """A straight road across the whole tile. ``axis`` 0: runs north-south at x = centre; 1: east-west at y = centre."""

    axis: int
    centre: float
    half_width: float
    lanes: int


@dataclass
class Layout:
    """All primitives of a city, in world metres (ENU, ground z = 0).

    Attributes:
        size_m: side of the square tile, centred at the origin.
        box_lo, box_hi: [B, 3] axis-aligned boxes (row 0 is the ground slab).
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

    @property
    def max_height(self) -> float:
        tops = [float(self.box_hi[:, 2].max())]
        if len(self.ell_center):
            tops.append(float((self.ell_center[:, 2] + self.ell_radii[:, 2]).max()))
        return max(tops)

    def checksum(self) -> str:
        """A short hash of all primitive arrays, to check that a rebuilt city is the same one."""
        import hashlib

        h = hashlib.sha256()
        for a in (self.box_lo, self.box_hi, self.box_kind, self.ell_center, self.ell_radii, self.parks):
            h.update(np.ascontiguousarray(np.round(a, 6)).tobytes())
        return h.hexdigest()[:16]


class _Builder:
    def __init__(self) -> None:
        self.boxes: list[tuple] = []
        self.ells: list[tuple] = []

    def box(self, lo, hi, kind, albedo, roof=(0, 0, 0), params=(0, 0, 0, 0)) -> None:  # noqa: ANN001
        self.boxes.append((lo, hi, kind, albedo, roof, params))

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


def _road_positions(rng: np.random.Generator, size: float) -> list[float]:
    """Road centre lines across one axis: blocks of 48-80 m, none too close to the tile border."""
    half = size / 2
    pos, x = [], -half + rng.uniform(30, 60)
    while x < half - 25:
        pos.append(x)
        x += rng.uniform(52, 84)
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


def _building(b: _Builder, rng: np.random.Generator, lot: tuple) -> None:
    x0, y0, x1, y1 = lot
    setback = rng.uniform(1.0, 3.0)
    x0, y0, x1, y1 = x0 + setback, y0 + setback, x1 - setback, y1 - setback
    if x1 - x0 < 6 or y1 - y0 < 6:
        return
    tower = rng.random() < 0.14 and min(x1 - x0, y1 - y0) > 14
    height = rng.uniform(32, 60) if tower else float(np.clip(rng.lognormal(np.log(13), 0.4), 5, 28))
    facade = _FACADE_PALETTE[rng.integers(len(_FACADE_PALETTE))] * rng.uniform(0.9, 1.08)
    roof = _ROOF_PALETTE[rng.integers(len(_ROOF_PALETTE))] * rng.uniform(0.9, 1.08)
    floor_h = rng.uniform(3.0, 3.8)
    params = (floor_h, rng.uniform(2.6, 4.0), rng.uniform(0.45, 0.65), rng.uniform(0.45, 0.6))
    if tower:
        # A podium with a slimmer tower on top: towers get setbacks like real high-rises.
        podium_h = floor_h * rng.integers(2, 5)
        b.box((x0, y0, 0.0), (x1, y1, podium_h), KIND_BUILDING, facade, roof, params)
        inset = rng.uniform(0.15, 0.3)
        dx, dy = (x1 - x0) * inset, (y1 - y0) * inset
        x0, y0, x1, y1 = x0 + dx, y0 + dy, x1 - dx, y1 - dy
        facade = _FACADE_PALETTE[rng.integers(len(_FACADE_PALETTE))]
        params = (floor_h, params[1], 0.7, 0.62)
    b.box((x0, y0, 0.0), (x1, y1, height), KIND_BUILDING, np.clip(facade, 0, 1), np.clip(roof, 0, 1), params)
    # Roof equipment: AC units and a stair house, inset from the parapet.
    w, h = x1 - x0, y1 - y0
    for _ in range(int(rng.integers(0, 4)) if min(w, h) > 9 else 0):
        sx, sy, sz = rng.uniform(1.6, 3.5), rng.uniform(1.6, 3.5), rng.uniform(1.0, 2.2)
        ex = rng.uniform(x0 + 1.5, x1 - 1.5 - sx)
        ey = rng.uniform(y0 + 1.5, y1 - 1.5 - sy)
        grey = rng.uniform(0.5, 0.78)
        b.box((ex, ey, height), (ex + sx, ey + sy, height + sz), KIND_EQUIPMENT, (grey, grey, grey * 0.97))


def generate_layout(seed: int, size_m: float = 256.0) -> Layout:
    """Build the city for ``seed``: deterministic, all primitives inside the tile."""
    rng = np.random.default_rng(seed)
    half = size_m / 2
    b = _Builder()
    b.box((-half, -half, -SLAB_DEPTH_M), (half, half, 0.0), KIND_GROUND, (0.36, 0.30, 0.24))

    roads: list[Road] = []
    for axis in (0, 1):
        for c in _road_positions(rng, size_m):
            lanes = 4 if rng.random() < 0.35 else 2
            roads.append(Road(axis, float(c), 1.75 * lanes + 0.75, lanes))
    sidewalk = 3.0

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
            if rng.random() < 0.18:
                parks.append(block)
                area = (bx1 - bx0) * (by1 - by0)
                for _ in range(int(area / 140)):
                    b.tree(
                        rng,
                        rng.uniform(bx0 + 4, bx1 - 4),
                        rng.uniform(by0 + 4, by1 - 4),
                        rng.uniform(0.9, 1.3),
                    )
                continue
            for lot in _split_lots(rng, block, max_side=rng.uniform(22, 36)):
                if rng.random() < 0.08:
                    continue  # an empty lot: open concrete / parking
                _building(b, rng, lot)

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
                if not crossing and rng.random() < 0.7:
                    b.tree(rng, p[0], p[1], 0.8)
                t += rng.uniform(8, 12)

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
    )
