"""The city manifest (``city.json``): a grid of cells, each a tile reconstructed on its own.

Frames. All tiles of one city share the orientation of a single local ENU tangent plane of the city
(x east, y north, z up, metres). A tile's frame therefore differs from the city frame by a
translation only: a point ``p`` in the tile frame is ``p + cell.origin`` in the city frame, where
``cell.origin`` is the tile's ENU origin expressed in the city frame. This is exact when every tile
is prepared in the city's tangent plane; if tiles are instead prepared in their own ENU frames, the
frames also differ by a rotation (meridian convergence, tilt of the ellipsoid normal) that grows with
distance from the city origin: about 1.6e-4 rad per km, i.e. a few decimetres of horizontal and
vertical disagreement at a tile edge once the city exceeds roughly 10 km, and the translation-only
model then needs a rotation per tile.

Cells. Each cell owns a *core* rectangle ``[x0, x1] x [y0, y1]`` of the city frame; the cores of a
manifest tile the city's bounding rectangle exactly (no gaps, no overlaps; checked on load). Its
*tile* is the core expanded by ``margin`` metres on every side, clipped to the city bounds, so that
neighbouring tiles overlap by ``2 * margin`` and every Gaussian near a seam is well constrained in
the tile that owns it. Ownership of points on shared core edges is half-open (see
``skyfall.city.merge``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skyfall.errors import TileFormatError

MANIFEST_NAME = "city.json"
VERSION = 1

Bounds = tuple[float, float, float, float]  # x0, x1, y0, y1 (metres)


class CityManifestError(TileFormatError):
    """A ``city.json`` (or a manifest built in code) that does not follow the city format; the
    message names the file and the field."""


@dataclass(frozen=True)
class CityCell:
    """One cell of the city grid.

    ``core`` = (x0, x1, y0, y1) in the city frame: the area this cell owns. ``margin``: metres by
    which the cell's tile extends beyond its core on every side. ``origin``: the tile frame's origin
    in the city frame (tile -> city is ``+ origin``; both frames share the city's ENU axes).
    """

    name: str
    row: int
    col: int
    core: Bounds
    margin: float
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "row": self.row,
            "col": self.col,
            "core": list(self.core),
            "margin": self.margin,
            "origin": list(self.origin),
        }

    def tile_bounds(self, city_bounds: Bounds | None = None) -> Bounds:
        """The tile's extent in the city frame: the core grown by ``margin``, clipped to ``city_bounds``."""
        x0, x1, y0, y1 = self.core
        m = self.margin
        b = (x0 - m, x1 + m, y0 - m, y1 + m)
        if city_bounds is None:
            return b
        cx0, cx1, cy0, cy1 = city_bounds
        return (max(b[0], cx0), min(b[1], cx1), max(b[2], cy0), min(b[3], cy1))

    def tile_bounds_local(self, city_bounds: Bounds | None = None) -> Bounds:
        """``tile_bounds`` expressed in the tile's own frame."""
        x0, x1, y0, y1 = self.tile_bounds(city_bounds)
        ox, oy, _ = self.origin
        return (x0 - ox, x1 - ox, y0 - oy, y1 - oy)


def cells_bounds(cells: list[CityCell] | tuple[CityCell, ...]) -> Bounds:
    """Bounding rectangle of the cells' cores."""
    c = np.array([cell.core for cell in cells], dtype=np.float64)
    return (float(c[:, 0].min()), float(c[:, 1].max()), float(c[:, 2].min()), float(c[:, 3].max()))


@dataclass(frozen=True)
class CityManifest:
    """The cells of a city and how they were laid out.

    ``tile_size_m``: edge length of a regular cell's core. ``overlap_m``: the margin of every tile
    beyond its core (so neighbouring tiles share ``2 * overlap_m``). ``crs``: the city frame's name
    (``"local-enu"`` when it is not georeferenced). ``origin_lon_lat_h``: geodetic origin of the city
    tangent plane (degrees, degrees, metres above the WGS84 ellipsoid), when known.
    """

    cells: tuple[CityCell, ...]
    tile_size_m: float
    overlap_m: float
    crs: str = "local-enu"
    origin_lon_lat_h: tuple[float, float, float] | None = None
    where: str = field(default="<CityManifest>", compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cells", tuple(self.cells))
        _check_manifest(self, self.where)

    @property
    def bounds(self) -> Bounds:
        """The city's extent (x0, x1, y0, y1): the union of the cores, a rectangle."""
        return cells_bounds(self.cells)

    def cell(self, name: str) -> CityCell:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(name)

    def tile_bounds(self, cell: CityCell) -> Bounds:
        """The cell's tile extent in the city frame (core + margin, clipped to the city)."""
        return cell.tile_bounds(self.bounds)

    # ------------------------------------------------------------------------------------ json

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "tile_size_m": self.tile_size_m,
            "overlap_m": self.overlap_m,
            "crs": self.crs,
            "origin_lon_lat_h": None if self.origin_lon_lat_h is None else list(self.origin_lon_lat_h),
            "cells": [c.to_dict() for c in self.cells],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = MANIFEST_NAME) -> CityManifest:
        w = str(where)
        if not isinstance(d, dict):
            raise CityManifestError(w, None, "expected a JSON object")
        version = d.get("version", VERSION)
        if version != VERSION:
            raise CityManifestError(w, "version", f"unsupported version {version!r} (expected {VERSION})")
        tile_size = _number(d, "tile_size_m", w)
        overlap = _number(d, "overlap_m", w)
        crs = d.get("crs", "local-enu")
        if not isinstance(crs, str) or not crs:
            raise CityManifestError(w, "crs", f"expected a non-empty string, got {crs!r}")
        lla = d.get("origin_lon_lat_h")
        if lla is not None:
            lla = _vector(lla, 3, w, "origin_lon_lat_h")
        raw_cells = d.get("cells")
        if not isinstance(raw_cells, list) or not raw_cells:
            raise CityManifestError(w, "cells", "expected a non-empty list of cells")
        cells = tuple(_cell_from_dict(c, w, f"cells[{i}]") for i, c in enumerate(raw_cells))
        return cls(cells, tile_size, overlap, crs, lla, where=w)

    def to_json(self, path: str | Path) -> Path:
        """Write ``city.json`` (``path`` may be the file or its folder); returns the file written."""
        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p = p / MANIFEST_NAME
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    @classmethod
    def from_json(cls, path: str | Path) -> CityManifest:
        """Read ``city.json`` (``path`` may be the file or its folder)."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError as e:
            raise CityManifestError(p, None, "file not found") from e
        except json.JSONDecodeError as e:
            raise CityManifestError(p, None, f"not valid JSON: {e}") from e
        return cls.from_dict(d, p)


def grid(
    n_rows: int,
    n_cols: int,
    tile_size_m: float,
    overlap_m: float,
    origin: tuple[float, float] = (0.0, 0.0),
    crs: str = "local-enu",
    origin_lon_lat_h: tuple[float, float, float] | None = None,
) -> CityManifest:
    """A regular ``n_rows`` x ``n_cols`` grid of square cores of edge ``tile_size_m`` whose
    south-west corner is ``origin`` (city frame). Row 0 is the northern row (as in a north-up
    raster), column 0 the western column. Each tile's frame origin is its core's centre at z = 0.

    Edges are computed once per grid line, so neighbouring cores share bit-identical edges and the
    half-open ownership rule leaves neither gaps nor double ownership.
    """
    if n_rows < 1 or n_cols < 1:
        raise CityManifestError("<grid>", "n_rows" if n_rows < 1 else "n_cols", "must be at least 1")
    xs = [float(origin[0]) + k * float(tile_size_m) for k in range(n_cols + 1)]
    ys = [float(origin[1]) + k * float(tile_size_m) for k in range(n_rows + 1)]
    cells = []
    for r in range(n_rows):
        k = n_rows - 1 - r  # row 0 is the northern one
        y0, y1 = ys[k], ys[k + 1]
        for c in range(n_cols):
            x0, x1 = xs[c], xs[c + 1]
            centre = (0.5 * (x0 + x1), 0.5 * (y0 + y1), 0.0)
            cells.append(CityCell(f"r{r:03d}c{c:03d}", r, c, (x0, x1, y0, y1), float(overlap_m), centre))
    return CityManifest(
        tuple(cells), float(tile_size_m), float(overlap_m), crs, origin_lon_lat_h, where="<grid>"
    )


# ------------------------------------------------------------------------------------ validation


def _number(d: dict, key: str, where: str, field_name: str | None = None) -> float:
    name = field_name or key
    if key not in d:
        raise CityManifestError(where, name, "missing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CityManifestError(where, name, f"expected a finite number, got {v!r}")
    return float(v)


def _vector(v: Any, n: int, where: str, name: str) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise CityManifestError(where, name, f"expected a list of {n} numbers, got {v!r}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise CityManifestError(where, name, f"expected a list of {n} finite numbers, got {v!r}")
        out.append(float(x))
    return tuple(out)


def _cell_from_dict(d: Any, where: str, name: str) -> CityCell:
    if not isinstance(d, dict):
        raise CityManifestError(where, name, "expected a JSON object")
    cname = d.get("name")
    if not isinstance(cname, str) or not cname:
        raise CityManifestError(where, f"{name}.name", f"expected a non-empty string, got {cname!r}")
    idx = []
    for key in ("row", "col"):
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CityManifestError(where, f"{name}.{key}", f"expected an integer >= 0, got {v!r}")
        idx.append(v)
    if "core" not in d:
        raise CityManifestError(where, f"{name}.core", "missing")
    core = _vector(d["core"], 4, where, f"{name}.core")
    margin = _number(d, "margin", where, f"{name}.margin")
    if "origin" not in d:
        raise CityManifestError(where, f"{name}.origin", "missing")
    origin = _vector(d["origin"], 3, where, f"{name}.origin")
    return CityCell(cname, idx[0], idx[1], core, margin, origin)  # type: ignore[arg-type]


def _check_manifest(m: CityManifest, where: str) -> None:
    """Field ranges, unique names and grid positions, and cores that tile their bounding rectangle."""
    if not (math.isfinite(m.tile_size_m) and m.tile_size_m > 0):
        raise CityManifestError(where, "tile_size_m", f"must be > 0, got {m.tile_size_m!r}")
    if not (math.isfinite(m.overlap_m) and m.overlap_m >= 0):
        raise CityManifestError(where, "overlap_m", f"must be >= 0, got {m.overlap_m!r}")
    if not m.cells:
        raise CityManifestError(where, "cells", "no cells")
    names: dict[str, int] = {}
    places: dict[tuple[int, int], int] = {}
    for i, c in enumerate(m.cells):
        f = f"cells[{i}]"
        x0, x1, y0, y1 = c.core
        if not all(math.isfinite(v) for v in c.core) or not (x0 < x1 and y0 < y1):
            raise CityManifestError(
                where, f"{f}.core", f"expected finite x0 < x1 and y0 < y1, got {list(c.core)}"
            )
        if not (math.isfinite(c.margin) and c.margin >= 0):
            raise CityManifestError(where, f"{f}.margin", f"must be >= 0, got {c.margin!r}")
        if len(c.origin) != 3 or not all(math.isfinite(v) for v in c.origin):
            raise CityManifestError(where, f"{f}.origin", f"expected 3 finite numbers, got {c.origin!r}")
        if c.name in names:
            raise CityManifestError(where, f"{f}.name", f"duplicate of cells[{names[c.name]}] ({c.name!r})")
        names[c.name] = i
        if (c.row, c.col) in places:
            raise CityManifestError(
                where, f"{f}.row", f"row/col ({c.row}, {c.col}) duplicate cells[{places[(c.row, c.col)]}]"
            )
        places[(c.row, c.col)] = i
    _check_tiling(m.cells, where)


def _check_tiling(cells: tuple[CityCell, ...], where: str) -> None:
    """Cores must not overlap (positive area) and must cover their bounding rectangle: together these
    make the half-open ownership rule assign every city point to exactly one cell."""
    c = np.array([cell.core for cell in cells], dtype=np.float64)
    bx0, bx1, by0, by1 = c[:, 0].min(), c[:, 1].max(), c[:, 2].min(), c[:, 3].max()
    scale = max(bx1 - bx0, by1 - by0)
    tol = 1e-9 * scale
    wx = np.minimum(c[:, None, 1], c[None, :, 1]) - np.maximum(c[:, None, 0], c[None, :, 0])
    wy = np.minimum(c[:, None, 3], c[None, :, 3]) - np.maximum(c[:, None, 2], c[None, :, 2])
    overlap = (wx > tol) & (wy > tol)
    np.fill_diagonal(overlap, False)
    if overlap.any():
        i, j = (int(v) for v in np.argwhere(overlap)[0])
        raise CityManifestError(where, f"cells[{j}].core", f"overlaps the core of cells[{i}]")
    area = float(((c[:, 1] - c[:, 0]) * (c[:, 3] - c[:, 2])).sum())
    full = float((bx1 - bx0) * (by1 - by0))
    if abs(area - full) > 1e-9 * full:
        raise CityManifestError(
            where,
            "cells",
            f"cores cover {area:.6g} m^2 of their {full:.6g} m^2 bounding rectangle: the city must be tiled without gaps",
        )
