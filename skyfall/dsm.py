"""Digital surface models of a scene: rendered on a grid of the tile's ENU frame, georeferenced,
written to and read from GeoTIFF.

Two frames meet here:

- the tile's world frame: local ENU metres (x east, y north, z up). Tiles made by ``skyfall prepare``
  record its geodetic origin in ``prepare.json`` (``enu_origin``: lon, lat, alt above the WGS84
  ellipsoid); synthetic tiles have none and stay in their local frame;
- a map grid: a north-up raster in some CRS (the tile's UTM zone for exports, any CRS for a
  ground-truth DSM) holding heights above the WGS84 ellipsoid.

The ENU axes are rotated relative to a UTM grid by the meridian convergence (up to a few degrees)
and scaled by the UTM scale factor, so ENU rasters are never resampled by an offset alone:
``resample_enu_dsm`` maps every map-cell centre to geodetic coordinates (pyproj), then to ENU
(``skyfall.prepare.geodesy.ENUFrame``), samples the ENU raster there and converts the ENU height
back to an ellipsoidal height, iterating on the height because the ellipsoid normal through a cell
centre is tilted from ENU up away from the origin.

rasterio and pyproj are optional (``pip install "skyfall[geo]"``) and imported only where needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skyfall.data.orbits import nadir_grid_camera
from skyfall.errors import MissingDependencyError, TileFormatError
from skyfall.prepare.dense import DenseHeights
from skyfall.prepare.geodesy import ENUFrame
from skyfall.scene import Scene

NODATA = -9999.0
GEO_EXTRA = 'pip install "skyfall[geo]"'


def require_rasterio() -> Any:
    try:
        import rasterio
    except ImportError as e:
        raise MissingDependencyError(f"GeoTIFF DSMs need rasterio: {GEO_EXTRA}") from e
    return rasterio


def require_pyproj() -> Any:
    try:
        import pyproj
    except ImportError as e:
        raise MissingDependencyError(f"georeferenced DSMs need pyproj: {GEO_EXTRA}") from e
    return pyproj


# ------------------------------------------------------------------------------------------ grids


@dataclass(frozen=True)
class DsmGrid:
    """A north-up raster: cell (i, j) has centre ``(x_min + (j + .5) res, y_max - (i + .5) res)``."""

    x_min: float
    y_max: float
    resolution: float
    width: int
    height: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str | Path = "georef") -> DsmGrid:
        try:
            return cls(
                float(d["x_min"]),
                float(d["y_max"]),
                float(d["resolution"]),
                int(d["width"]),
                int(d["height"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TileFormatError(where, str(e).strip("'"), "invalid DSM georeference") from e

    @classmethod
    def covering(cls, x0: float, x1: float, y0: float, y1: float, resolution: float) -> DsmGrid:
        """The smallest grid with edges on multiples of ``resolution`` that contains [x0, x1] x [y0, y1]."""
        xa = math.floor(x0 / resolution + 1e-9) * resolution
        xb = math.ceil(x1 / resolution - 1e-9) * resolution
        ya = math.floor(y0 / resolution + 1e-9) * resolution
        yb = math.ceil(y1 / resolution - 1e-9) * resolution
        w = max(1, int(round((xb - xa) / resolution)))
        h = max(1, int(round((yb - ya) / resolution)))
        return cls(xa, yb, resolution, w, h)

    @property
    def x_max(self) -> float:
        return self.x_min + self.width * self.resolution

    @property
    def y_min(self) -> float:
        return self.y_max - self.height * self.resolution

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell-centre coordinates (x, y), each [height, width]."""
        x = self.x_min + (np.arange(self.width) + 0.5) * self.resolution
        y = self.y_max - (np.arange(self.height) + 0.5) * self.resolution
        return np.meshgrid(x, y, indexing="xy")

    def window(self, row0: int, row1: int, col0: int, col1: int) -> DsmGrid:
        """The sub-grid of rows [row0, row1) and columns [col0, col1)."""
        r = self.resolution
        return DsmGrid(self.x_min + col0 * r, self.y_max - row0 * r, r, col1 - col0, row1 - row0)

    def affine(self) -> tuple[float, float, float, float, float, float]:
        """GDAL/rasterio affine coefficients (a, b, c, d, e, f)."""
        return (self.resolution, 0.0, self.x_min, 0.0, -self.resolution, self.y_max)


# -------------------------------------------------------------------------------------- rendering


def _grid_blocks(g: DsmGrid, block: int) -> Iterator[tuple[int, int, int, int, Any]]:
    """(row0, col0, rows, cols, camera) for each ``block`` x ``block`` tile of the grid: the nadir
    camera whose pixels are exactly those cells (render in bounded memory)."""
    res = g.resolution
    for i0 in range(0, g.height, block):
        for j0 in range(0, g.width, block):
            bh, bw = min(block, g.height - i0), min(block, g.width - j0)
            yield i0, j0, bh, bw, nadir_grid_camera(g.x_min + j0 * res, g.y_max - i0 * res, res, bw, bh)


def _progress(blocks: Iterator, g: DsmGrid, block: int, desc: str, enabled: bool) -> Iterator:
    """``blocks`` behind a tqdm bar (ETA per grid block) when ``enabled``."""
    if not enabled:
        return blocks
    from tqdm import tqdm

    total = -(-g.height // block) * -(-g.width // block)
    return iter(tqdm(blocks, total=total, desc=desc, unit="block", leave=False, dynamic_ncols=True))


@torch.no_grad()
def render_dsm(
    scene: Scene,
    georef: dict | DsmGrid,
    *,
    depth: str = "median",
    alpha_min: float = 0.05,
    block: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Heights (ENU z) on a grid of the world frame from rendered near-vertical depth; NaN where
    (almost) nothing is rendered.

    ``depth="median"`` (default) reads, per cell, the median of the rendered weight distribution
    (the depth at which the accumulated alpha reaches half of the cell's alpha); ``"expected"`` the
    alpha-normalised accumulated depth. The expected depth averages a roof with the ground behind its
    semi-transparent edge splats, which on a dense city puts metres of error on every building edge;
    the median picks one surface. Cells whose alpha is below ``alpha_min`` are empty (NaN), so a
    sparse, half-transparent surface still counts towards the error instead of being dropped. The
    grid is rendered in blocks of ``block`` x ``block`` cells to bound memory; ``progress`` shows a
    tqdm bar over them.
    """
    if depth not in ("median", "expected"):
        raise ValueError(f"depth must be 'median' or 'expected', got {depth!r}")
    g = georef if isinstance(georef, DsmGrid) else DsmGrid.from_json(georef)
    out = np.full((g.height, g.width), np.nan, dtype=np.float32)
    blocks = _progress(_grid_blocks(g, block), g, block, f"DSM ({depth} depth)", progress)
    for i0, j0, bh, bw, cam in blocks:
        cam_z = float(cam.camtoworlds[0, 2, 3])
        if depth == "median":
            med, alpha = scene.render_median_depth(cam, normalized=True)
            d = med[0, ..., 0].double().cpu().numpy()
        else:
            r = scene.render(cam, None, absgrad=False)
            d, alpha = r.expected_depths[0, ..., 0].double().cpu().numpy(), r.alphas
        ok = (alpha[0, ..., 0].cpu().numpy() >= alpha_min) & np.isfinite(d)
        out[i0 : i0 + bh, j0 : j0 + bw] = np.where(ok, cam_z - d, np.nan)
    return out


@torch.no_grad()
def opaque_weight_share(
    scene: Scene,
    georef: dict | DsmGrid,
    *,
    opaque: float = 0.5,
    alpha_min: float = 0.05,
    block: int = 256,
    progress: bool = False,
) -> float:
    """Share of the blended weight, seen straight down on the DSM grid, that comes from near-opaque
    Gaussians (effective opacity >= ``opaque``).

    It is what separates a surface from haze in what a viewer shows: the median depth ignores
    low-weight contributions, alpha blending does not. Each Gaussian is rendered with the colour 1
    if near-opaque and 0 otherwise, so the red channel accumulates their weight and alpha the total,
    over the cells whose alpha reaches ``alpha_min`` (as ``render_dsm``). ``progress``: a tqdm bar
    over the grid blocks.
    """
    from skyfall.render import render

    g = georef if isinstance(georef, DsmGrid) else DsmGrid.from_json(georef)
    m = scene.model
    p = m.params
    _, opac = m.get_scales_opacities_eff()
    ind = (opac.reshape(-1) >= opaque).to(p["means"].dtype)
    rgb = torch.stack([ind, ind, ind], -1)
    num = den = 0.0
    for _, _, bh, bw, cam in _progress(_grid_blocks(g, block), g, block, "DSM opaque share", progress):
        out = render(
            p["means"], p["quats"], p["scales"], p["opacities"], rgb,
            cam.viewmats.to(p["means"].device), cam.Ks.to(p["means"].device), bw, bh,
            filter_3d=m.filter_3d, eps2d=scene.eps2d, absgrad=False,
        )  # fmt: skip
        a = out.alphas[0, ..., 0]
        ok = a >= alpha_min
        num += float(out.colors[0, ..., 0][ok].sum())
        den += float(a[ok].sum())
    return num / den if den > 0 else float("nan")


# ------------------------------------------------------------------------------------ tile frame


@dataclass(frozen=True)
class TileFrame:
    """Where a tile's world frame sits: its geodetic origin (None: a local frame) and its ENU extent.

    ``extent`` = (x_min, x_max, y_min, y_max) in ENU metres: the area the tile's views constrain
    (the ``prepare`` AOI or the synthetic city), or None when the tile does not say.
    ``truth_dsm`` is ``prepare.json``'s ``truth_dsm`` (resolved against the tile folder), if any.
    """

    enu: ENUFrame | None
    extent: tuple[float, float, float, float] | None
    truth_dsm: Path | None = None


def tile_frame(tile: str | Path) -> TileFrame:
    """Read a tile's frame: ``prepare.json`` (``enu_origin``: lon, lat, alt and, for a city's tile,
    ``offset``; ``aoi.size_m``; ``truth_dsm``), else the synthetic ``synth.json`` (``size_m``, centred
    on the origin) or ``gt/dsm.json`` grid."""
    tile = Path(tile)
    prep = tile / "prepare.json"
    if prep.is_file():
        try:
            doc = json.loads(prep.read_text())
        except (OSError, ValueError) as e:
            raise TileFormatError(prep, None, f"cannot read JSON: {e}") from e
        o = doc.get("enu_origin") if isinstance(doc, dict) else None
        if not isinstance(o, dict):
            raise TileFormatError(
                prep, "enu_origin", "missing: need {lon, lat, alt} (written by skyfall prepare)"
            )
        try:
            lon, lat, alt = float(o["lon"]), float(o["lat"]), float(o["alt"])
        except (KeyError, TypeError, ValueError) as e:
            raise TileFormatError(prep, "enu_origin", f"need numbers lon, lat, alt: {e}") from e
        # A city's tile: the city's tangent plane translated to the cell origin (prepare's SharedFrame).
        offset = o.get("offset")
        if offset is not None:
            ok = isinstance(offset, list) and len(offset) == 3
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in offset)
            if not (ok and all(math.isfinite(v) for v in offset)):
                raise TileFormatError(
                    prep, "enu_origin.offset", f"need three finite numbers (east, north, up), got {offset!r}"
                )
        enu = ENUFrame(lon, lat, alt, offset=offset)
        if not (-180 <= enu.lon0 <= 180 and -90 < enu.lat0 < 90):
            raise TileFormatError(prep, "enu_origin", f"lon/lat out of range: {enu.lon0}, {enu.lat0}")
        extent = None
        size = (doc.get("aoi") or {}).get("size_m")
        if size is not None:
            try:
                half = float(size) / 2
            except (TypeError, ValueError) as e:
                raise TileFormatError(prep, "aoi.size_m", f"not a number: {size!r}") from e
            extent = (-half, half, -half, half)
        truth = doc.get("truth_dsm")
        if truth is not None and not isinstance(truth, str):
            raise TileFormatError(prep, "truth_dsm", f"expected a path, got {truth!r}")
        return TileFrame(enu, extent, (tile / truth) if truth else None)
    synth = tile / "synth.json"
    if synth.is_file():
        try:
            half = float(json.loads(synth.read_text())["size_m"]) / 2
            return TileFrame(None, (-half, half, -half, half))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    gj = tile / "gt" / "dsm.json"
    if gj.is_file():
        g = DsmGrid.from_json(json.loads(gj.read_text()), gj)
        return TileFrame(None, (g.x_min, g.x_max, g.y_min, g.y_max))
    return TileFrame(None, None)


def scene_extent(
    scene: Scene, *, alpha_min: float = 0.5, pct: float = 1.0
) -> tuple[float, float, float, float]:
    """ENU (x_min, x_max, y_min, y_max) of the scene's opaque Gaussians (``pct`` .. 100 - ``pct`` percentiles)."""
    p = scene.model.params
    m = p["means"].detach().double().cpu().numpy()
    keep = torch.sigmoid(p["opacities"].detach()).cpu().numpy() >= alpha_min
    m = m[keep] if keep.sum() >= 10 else m
    lo, hi = np.percentile(m[:, :2], pct, axis=0), np.percentile(m[:, :2], 100 - pct, axis=0)
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


# ------------------------------------------------------------------------------- map <-> ENU


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone containing (lon, lat), from the PROJ database."""
    require_pyproj()
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    infos = query_utm_crs_info(
        datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat), contains=True
    )
    # Several zones contain a point on a zone edge; the formula's zone is the conventional one.
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    want = (32600 if lat >= 0 else 32700) + zone
    codes = [int(i.code) for i in infos if i.auth_name == "EPSG"]
    return want if want in codes or not codes else codes[0]


def _to_lonlat(crs: Any) -> Any:
    pyproj = require_pyproj()
    return pyproj.Transformer.from_crs(
        pyproj.CRS.from_user_input(crs), pyproj.CRS.from_epsg(4326), always_xy=True
    )


def map_to_enu(frame: ENUFrame, crs: Any, x: np.ndarray, y: np.ndarray, h: np.ndarray | float) -> np.ndarray:
    """Map coordinates (x, y in ``crs``; h above the WGS84 ellipsoid) -> ENU metres [..., 3]."""
    lon, lat = _to_lonlat(crs).transform(np.asarray(x, np.float64), np.asarray(y, np.float64))
    return frame.from_geodetic(np.asarray(lon), np.asarray(lat), np.broadcast_to(h, np.shape(lon)))


def enu_to_map(frame: ENUFrame, crs: Any, enu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ENU metres [..., 3] -> (x, y in ``crs``, h above the WGS84 ellipsoid)."""
    lon, lat, h = frame.to_geodetic(enu)
    x, y = _to_lonlat(crs).transform(lon, lat, direction="INVERSE")
    return np.asarray(x), np.asarray(y), np.asarray(h)


def sample_bilinear(img: np.ndarray, grid: DsmGrid, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``img`` (on ``grid``) at world points; NaN-aware.

    Empty (NaN) neighbours are left out and the weights of the others renormalised; a point is NaN
    when less than half of its bilinear weight falls on non-empty cells or when it lies outside the
    grid. Within half a cell of the grid's border the border cells are extended.
    """
    u = (np.asarray(x, np.float64) - grid.x_min) / grid.resolution - 0.5
    v = (grid.y_max - np.asarray(y, np.float64)) / grid.resolution - 0.5
    inside = (u >= -0.5) & (u <= grid.width - 0.5) & (v >= -0.5) & (v <= grid.height - 0.5)
    u = np.clip(np.where(inside, u, 0.0), 0.0, grid.width - 1)
    v = np.clip(np.where(inside, v, 0.0), 0.0, grid.height - 1)
    j0 = np.minimum(np.floor(u).astype(np.int64), max(grid.width - 2, 0))
    i0 = np.minimum(np.floor(v).astype(np.int64), max(grid.height - 2, 0))
    fu, fv = u - j0, v - i0
    j1, i1 = np.minimum(j0 + 1, grid.width - 1), np.minimum(i0 + 1, grid.height - 1)
    acc = np.zeros(u.shape)
    wsum = np.zeros(u.shape)
    for ii, jj, wt in (
        (i0, j0, (1 - fv) * (1 - fu)),
        (i0, j1, (1 - fv) * fu),
        (i1, j0, fv * (1 - fu)),
        (i1, j1, fv * fu),
    ):
        val = img[ii, jj].astype(np.float64)
        ok = np.isfinite(val)
        acc += np.where(ok, val, 0.0) * wt
        wsum += np.where(ok, wt, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / wsum
    return np.where(inside & (wsum >= 0.5 - 1e-9), out, np.nan)


def field_grid(field: DenseHeights) -> DsmGrid:
    """The ENU grid of ``skyfall prepare``'s dense heights (the same north-up cell convention)."""
    h, w = field.heights.shape
    return DsmGrid(field.x0, field.y1, field.resolution, w, h)


def field_sampler(field: DenseHeights) -> Callable[[DsmGrid], np.ndarray]:
    """ENU heights of a dense height field on any ENU grid (bilinear; NaN outside the field): the
    ``render_enu`` of ``render_on_map_grid`` and ``score_truth`` for a tile's stereo heights."""
    src = field_grid(field)

    def render(g: DsmGrid) -> np.ndarray:
        x, y = g.centres()
        return sample_bilinear(field.heights, src, x, y)

    return render


def resample_enu_dsm(
    enu_dsm: np.ndarray,
    enu_grid: DsmGrid,
    grid: DsmGrid,
    *,
    frame: ENUFrame | None = None,
    crs: Any = None,
    extent: tuple[float, float, float, float] | None = None,
    iterations: int = 3,
) -> np.ndarray:
    """An ENU-frame DSM (heights = ENU z) resampled onto a map grid.

    With ``frame`` and ``crs``: ``grid`` is in ``crs`` and the result holds heights above the WGS84
    ellipsoid. For each cell centre (x, y) the surface height h solves ``z_enu(x, y, h) =
    dsm(x_enu(x, y, h), y_enu(x, y, h))``: starting from h = origin height, each step samples the ENU
    DSM where the ellipsoid normal at height h pierces it and moves h by the ENU height difference
    (the normal is within 1e-4 rad of ENU up over a tile, so this converges to micrometres in two or
    three steps). Without ``frame``: ``grid`` is in the ENU frame itself and the result holds ENU z.

    Cells whose ENU position falls outside ``extent`` (x_min, x_max, y_min, y_max) are NaN.
    """
    gx, gy = grid.centres()
    if frame is None:
        out = sample_bilinear(enu_dsm, enu_grid, gx, gy)
        ex, ey = gx, gy
    else:
        if crs is None:
            raise ValueError("a geodetic frame needs the grid's crs")
        lon, lat = _to_lonlat(crs).transform(gx, gy)
        lon, lat = np.asarray(lon), np.asarray(lat)
        h = np.full(gx.shape, frame.h0)
        out = np.full(gx.shape, np.nan)
        for _ in range(max(1, iterations)):
            enu = frame.from_geodetic(lon, lat, h)
            z = sample_bilinear(enu_dsm, enu_grid, enu[..., 0], enu[..., 1])
            ok = np.isfinite(z)
            h = np.where(ok, h + (z - enu[..., 2]), h)
            out = np.where(ok, h, np.nan)
        ex, ey = enu[..., 0], enu[..., 1]
    if extent is not None:
        x0, x1, y0, y1 = extent
        out = np.where((ex >= x0) & (ex <= x1) & (ey >= y0) & (ey <= y1), out, np.nan)
    return out


def enu_footprint(
    grid: DsmGrid, frame: ENUFrame | None, crs: Any, h: float | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ENU (x, y) of every cell centre of a map grid (at height ``h``, default the origin height)."""
    gx, gy = grid.centres()
    if frame is None:
        return gx, gy
    enu = map_to_enu(frame, crs, gx, gy, frame.h0 if h is None else h)
    return enu[..., 0], enu[..., 1]


def inside_extent(
    grid: DsmGrid, frame: ENUFrame | None, crs: Any, extent: tuple[float, float, float, float]
) -> np.ndarray:
    """Cells of a map grid whose centres fall inside an ENU extent (x_min, x_max, y_min, y_max): the
    cells a tile covers, for completeness (the corners of a UTM bounding box around a rotated AOI are
    outside it by construction)."""
    fx, fy = enu_footprint(grid, frame, crs)
    x0, x1, y0, y1 = extent
    return (fx >= x0) & (fx <= x1) & (fy >= y0) & (fy <= y1)


def render_on_map_grid(
    render_enu: Callable[[DsmGrid], np.ndarray],
    grid: DsmGrid,
    *,
    frame: ENUFrame | None,
    crs: Any,
    extent: tuple[float, float, float, float] | None,
    oversample: int = 2,
    margin_m: float = 2.0,
) -> tuple[np.ndarray, DsmGrid]:
    """Render an ENU DSM covering ``grid``'s footprint at ``grid.resolution / oversample`` and resample it.

    ``render_enu(enu_grid)`` returns ENU heights on an ENU grid (e.g. ``render_dsm`` of a scene). The
    ENU grid covers the footprint plus ``margin_m`` (the ellipsoid normal drifts a few millimetres
    with height), cut to ``extent`` plus the margin. Returns (heights on ``grid``, the ENU grid).
    """
    fx, fy = enu_footprint(grid, frame, crs)
    x0, x1, y0, y1 = float(fx.min()), float(fx.max()), float(fy.min()), float(fy.max())
    if extent is not None:
        x0, x1 = max(x0, extent[0]), min(x1, extent[1])
        y0, y1 = max(y0, extent[2]), min(y1, extent[3])
    res = grid.resolution / max(1, int(oversample))
    enu_grid = DsmGrid.covering(x0 - margin_m, x1 + margin_m, y0 - margin_m, y1 + margin_m, res)
    enu_dsm = render_enu(enu_grid)
    return resample_enu_dsm(enu_dsm, enu_grid, grid, frame=frame, crs=crs, extent=extent), enu_grid


def utm_grid(
    frame: ENUFrame, extent: tuple[float, float, float, float], resolution: float
) -> tuple[int, DsmGrid]:
    """The tile's UTM zone (EPSG) and the grid, edges on multiples of ``resolution``, covering the ENU extent."""
    epsg = utm_epsg(frame.lon0, frame.lat0)
    x0, x1, y0, y1 = extent
    corners = np.array([[x0, y0, 0.0], [x1, y0, 0.0], [x0, y1, 0.0], [x1, y1, 0.0]])
    e, n, _ = enu_to_map(frame, f"EPSG:{epsg}", corners)
    return epsg, DsmGrid.covering(float(e.min()), float(e.max()), float(n.min()), float(n.max()), resolution)


# ------------------------------------------------------------------------------------- GeoTIFF


@dataclass
class GeoRaster:
    """A single-band DSM raster: heights (NaN = no data), its north-up grid and CRS (WKT; None = local)."""

    heights: np.ndarray
    grid: DsmGrid
    crs: str | None
    path: Path | None = None


def write_geotiff(
    path: str | Path,
    heights: np.ndarray,
    grid: DsmGrid,
    crs: Any = None,
    *,
    tags: dict[str, Any] | None = None,
    description: str = "height",
) -> Path:
    """Float32 GeoTIFF (deflate, nodata -9999). ``crs`` None writes no CRS: coordinates are then the
    tile's local ENU metres."""
    rasterio = require_rasterio()
    from rasterio.transform import Affine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.where(np.isfinite(heights), heights, NODATA).astype(np.float32)
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": 1,
        "dtype": "float32",
        "nodata": NODATA,
        "transform": Affine(*grid.affine()),
        "compress": "deflate",
    }
    if crs is not None:
        profile["crs"] = rasterio.crs.CRS.from_user_input(crs)
    tmp = path.with_name(path.name + ".tmp")
    with rasterio.open(tmp, "w", **profile) as f:
        f.write(data, 1)
        f.set_band_description(1, description)
        if tags:
            f.update_tags(**{k: str(v) for k, v in tags.items()})
    tmp.replace(path)
    return path


def read_geotiff(path: str | Path) -> GeoRaster:
    """Band 1 of a north-up GeoTIFF DSM. No-data (the file's nodata value, non-finite values and
    values below -1000 m, DFC2019's -9999 without a nodata tag) -> NaN.

    Raises:
        TileFormatError: naming the file (and the field) when it is missing, unreadable, rotated,
            or has non-square cells.
    """
    rasterio = require_rasterio()
    path = Path(path)
    if not path.is_file():
        raise TileFormatError(path, None, "DSM GeoTIFF not found")
    try:
        with rasterio.open(path) as f:
            arr = f.read(1).astype(np.float64)
            t, nodata, crs = f.transform, f.nodata, f.crs
    except Exception as e:  # rasterio raises its own error types for unreadable files
        raise TileFormatError(path, None, f"cannot read as a GeoTIFF DSM: {e}") from e
    if abs(t.b) > 1e-12 or abs(t.d) > 1e-12 or t.a <= 0 or t.e >= 0:
        raise TileFormatError(path, "transform", f"need a north-up grid without rotation, got {tuple(t)[:6]}")
    if abs(t.a + t.e) > 1e-9 * abs(t.a):
        raise TileFormatError(path, "transform", f"need square cells, got {t.a} x {-t.e}")
    if nodata is not None:
        arr[arr == nodata] = np.nan
    arr[~np.isfinite(arr) | (arr < -1000)] = np.nan
    if not np.isfinite(arr).any():
        raise TileFormatError(path, None, "no valid height (every cell is no-data)")
    grid = DsmGrid(float(t.c), float(t.f), float(t.a), arr.shape[1], arr.shape[0])
    return GeoRaster(arr, grid, crs.to_wkt() if crs else None, path)


# -------------------------------------------------------------------------------------- previews

# Colour-map anchors (viridis-like for heights, inferno-like for errors), linearly interpolated.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
_INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)
_DIVERGING = np.array(
    [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], np.float64
)


def colorize(values: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """[H, W] floats -> [H, W, 3] uint8 ('viridis', 'inferno' or 'diverging'); NaN -> dark grey."""
    anchors = {"viridis": _VIRIDIS, "inferno": _INFERNO, "diverging": _DIVERGING}[cmap]
    t = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    t = np.where(np.isfinite(values), t, 0.0)
    pos = t * (len(anchors) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    f = (pos - lo)[..., None]
    rgb = anchors[lo] * (1 - f) + anchors[lo + 1] * f
    rgb[~np.isfinite(values)] = 40
    return rgb.astype(np.uint8)


def write_preview(path: str | Path, values: np.ndarray, *, diverging: float | None = None) -> Path:
    """PNG preview of a DSM (colours span its 1st-99th height percentiles) or, with ``diverging``,
    of a difference map (blue -d .. red +d)."""
    from PIL import Image

    fin = np.isfinite(values)
    if diverging is not None:
        rgb = colorize(values, -diverging, diverging, "diverging")
    else:
        lo, hi = (np.percentile(values[fin], 1), np.percentile(values[fin], 99)) if fin.any() else (0.0, 1.0)
        rgb = colorize(values, float(lo), float(hi))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path
