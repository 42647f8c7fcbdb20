"""RPC products of a synthetic tile: GeoTIFF views whose RPCs are fitted to the exact cameras, and a UTM DSM.

They let ``skyfall prepare`` (RPC images -> tile), Stage 1 and DSM scoring run on data whose truth is
known. The tile's local ENU frame (x east, y north, z up, metres; ground at z = 0) is anchored at
:data:`ANCHOR`, a fixed geodetic point in Jacksonville, FL (the area of the DFC2019 JAX tiles).

Layout written into a synthetic tile folder ``OUT``::

    OUT/rpc/sat_XX.tif   the tile's view images/sat_XX.png (uint8 RGB, nodata 0) with an RPC in
                         GeoTIFF tag 50844; the RPC is the exact camera plus an injected bias
    OUT/rpc/dsm.tif      ground-truth DSM: UTM zone of the anchor, 0.5 m cells, float32 heights above
                         the WGS84 ellipsoid, nodata -9999 outside the tile
    OUT/rpc/rpc.json     anchor, per-view bias and fit errors, RPC fit domain, DSM georeference and
                         the ``skyfall prepare`` options that cover the tile

**RPC fit.** For each view a grid of ENU points over the view's footprint (the bounding box of the
image corners' rays at the lowest and highest fit height, and of the tile) x the height range is
projected with the exact pinhole, converted to (lon, lat, h) and fitted with the 78-coefficient cubic RPC00B model by
linear least squares (see :func:`fit_rpc`). RPC pixel coordinates put pixel centres on integers,
skyfall's cameras at +0.5, so ``col = u - 0.5``.

**Bias.** A satellite's delivered RPC is off by a few pixels; here each view's RPC is
``exact + bias``: ``rpc.project(X) = pinhole(X) - 0.5 + bias`` (col, row), added to the RPC's
sample/line offsets. View 0 has no bias; the others have a bias of random direction and a length
uniform in [bias_px / 2, bias_px]. A relative adjustment that keeps view 0 fixed and adds image
offsets to the other views should find ``offset_k = -bias_k``.

**DSM.** Each UTM cell centre (E, N) is converted to (lon, lat) with pyproj, and its height h is
the one that puts (lon, lat, h) on the city's surface: ``z(lon, lat, h) = city.height_at(x, y)`` in
the ENU frame, solved by fixed-point iteration. That is the exact transform (the ENU axes are
rotated against the UTM grid by the meridian convergence and scaled by the UTM scale factor);
heights are ``ANCHOR.h`` + the city's height + the Earth-curvature drop (< 3 mm over the tile).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from skyfall.dsm import NODATA as DSM_NODATA
from skyfall.dsm import DsmGrid, require_pyproj, require_rasterio, utm_epsg, write_geotiff
from skyfall.errors import ConfigError
from skyfall.prepare.geodesy import ENUFrame
from skyfall.prepare.pinhole import project_pinhole
from skyfall.prepare.rpc import RPCModel, rpc_terms


@dataclass(frozen=True)
class Anchor:
    """The geodetic point where the synthetic tile's ENU origin (tile centre, ground level) sits."""

    lon: float  # degrees
    lat: float  # degrees
    h: float  # metres above the WGS84 ellipsoid
    place: str


# Downtown Jacksonville, FL. The ground there is a few metres above sea level and the geoid about
# 29 m below the WGS84 ellipsoid, so ground level is about -25 m ellipsoidal, like the DFC2019 JAX tiles.
ANCHOR = Anchor(lon=-81.6600, lat=30.3200, h=-25.0, place="Jacksonville, FL (DFC2019 JAX area)")
DSM_RESOLUTION_M = 0.5
FIT_GRID = (21, 21, 11)  # fit points along x, y, z
FIT_Z_MARGIN_M = 5.0  # fit heights reach this far below the ground and above the tallest object
CHECK_POINTS = 2000
RPC_DIR = "rpc"


# ----------------------------------------------------------------------------------------------
# RPC fit


def _normaliser(v: np.ndarray) -> tuple[float, float]:
    lo, hi = float(v.min()), float(v.max())
    return 0.5 * (lo + hi), max(0.5 * (hi - lo), 1e-12)


def fit_rpc(
    lon: np.ndarray,
    lat: np.ndarray,
    h: np.ndarray,
    col: np.ndarray,
    row: np.ndarray,
    h_scale: float | None = None,
) -> RPCModel:
    """The cubic RPC00B model (20 numerator + 19 free denominator coefficients per image axis) that
    maps (lon, lat, h) to (col, row), by linear least squares.

    Offsets are the midpoints of the data ranges and scales their half-widths (normalised
    coordinates in [-1, 1]), except the height scale when ``h_scale`` is given. Each axis solves
    ``num(x) - y * (den(x) - 1) = y`` for the coefficients, then re-solves twice with rows weighted
    by ``1 / den(x)`` so that the minimised residual is the image error, not the algebraic one
    (Tao & Hu's iteration). A perspective camera is a ratio of near-linear functions, so the cubic
    terms are nearly free (the system is rank-deficient up to a common factor of numerator and
    denominator); the SVD solve picks the minimum-norm coefficients, which keeps the denominator
    close to 1 over the whole domain.

    Args:
        lon, lat: [N] degrees; h: [N] metres; col, row: [N] RPC pixels (integer = pixel centre).
        h_scale: height scale to use instead of the half-range.

    Returns:
        The fitted model.
    """
    lon_off, lon_scale = _normaliser(lon)
    lat_off, lat_scale = _normaliser(lat)
    h_off, h_half = _normaliser(h)
    h_scale = h_half if h_scale is None else float(h_scale)
    samp_off, samp_scale = _normaliser(col)
    line_off, line_scale = _normaliser(row)
    t = rpc_terms((lon - lon_off) / lon_scale, (lat - lat_off) / lat_scale, (h - h_off) / h_scale)

    def solve(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.concatenate([t, -y[:, None] * t[:, 1:]], axis=1)
        w = np.ones(len(y))
        for _ in range(3):
            sol = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)[0]
            den = np.r_[1.0, sol[20:]]
            w = 1.0 / np.abs(t @ den)
        return sol[:20], den

    samp_num, samp_den = solve((col - samp_off) / samp_scale)
    line_num, line_den = solve((row - line_off) / line_scale)
    return RPCModel(
        line_num=line_num, line_den=line_den, samp_num=samp_num, samp_den=samp_den,
        lon_off=lon_off, lon_scale=lon_scale, lat_off=lat_off, lat_scale=lat_scale,
        h_off=h_off, h_scale=h_scale, line_off=line_off, line_scale=line_scale,
        samp_off=samp_off, samp_scale=samp_scale,
    )  # fmt: skip


def with_bias(rpc: RPCModel, dcol: float, drow: float) -> RPCModel:
    """``rpc`` with every projection moved by (dcol, drow) pixels, stored in its sample/line offsets.

    Unlike :meth:`RPCModel.shifted` this survives writing the model to a file (files have no shift field).
    """
    return replace(rpc, samp_off=rpc.samp_off + dcol, line_off=rpc.line_off + drow)


def pinhole_rpc_pixels(K: np.ndarray, c2w: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Exact projection of ENU points [N, 3] in RPC pixel coordinates (pixel centre = integer) [N, 2]."""
    return project_pinhole(K, c2w, xyz) - 0.5


def footprint(K: np.ndarray, c2w: np.ndarray, width: int, height: int, z: float) -> np.ndarray:
    """ENU (x, y) [4, 2] where the rays through the image corners meet the plane at height z."""
    uv = np.array([[0.0, 0.0], [width, 0.0], [0.0, height], [width, height]])
    rays = np.c_[(uv[:, 0] - K[0, 2]) / K[0, 0], (uv[:, 1] - K[1, 2]) / K[1, 1], np.ones(4)] @ c2w[:3, :3].T
    s = (z - c2w[2, 3]) / rays[:, 2]
    return c2w[:2, 3] + s[:, None] * rays[:, :2]


@dataclass
class ViewRPC:
    """One view's fitted RPC (with its bias) and how well the unbiased fit reproduces the pinhole."""

    rpc: RPCModel
    bias_px: tuple[float, float]
    fit_rms_px: float  # on the fit grid
    fit_max_px: float
    check_rms_px: float  # on random points of the fit domain
    check_max_px: float
    domain: dict[str, list[float]]


def fit_view_rpc(
    K: np.ndarray,
    c2w: np.ndarray,
    width: int,
    height: int,
    frame: ENUFrame,
    z_range: tuple[float, float],
    tile_half: float,
    bias_px: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
) -> ViewRPC:
    """Fit the RPC of one exact pinhole camera over its footprint x ``z_range`` (module docstring).

    Args:
        K, c2w: the camera (float64, skyfall convention) in ``frame``'s ENU coordinates.
        width, height: image size in pixels.
        frame: the ENU frame of the camera.
        z_range: lowest and highest ENU height of the fit domain.
        tile_half: half side of the tile; the domain covers the tile even where the image does not.
        bias_px: (col, row) added to the fitted model's projections.
        seed: random check points.
    """
    z0, z1 = z_range
    corners = np.concatenate(
        [
            footprint(K, c2w, width, height, z0),
            footprint(K, c2w, width, height, z1),
            [[-tile_half] * 2, [tile_half] * 2],
        ]
    )
    lo, hi = corners.min(0), corners.max(0)
    nx, ny, nz = FIT_GRID
    grid = np.stack(
        np.meshgrid(
            np.linspace(lo[0], hi[0], nx),
            np.linspace(lo[1], hi[1], ny),
            np.linspace(z0, z1, nz),
            indexing="ij",
        ),
        -1,
    ).reshape(-1, 3)
    uv = pinhole_rpc_pixels(K, c2w, grid)
    lon, lat, h = frame.to_geodetic(grid)
    # h_scale = the whole height range, so that h_off +- h_scale / 2 (the default altitude range of
    # `skyfall prepare`) is the fit domain.
    rpc = fit_rpc(lon, lat, h, uv[:, 0], uv[:, 1], h_scale=z1 - z0)
    fit_err = np.linalg.norm(np.stack(rpc.project(lon, lat, h), -1) - uv, axis=1)
    test = np.random.default_rng(seed).uniform([lo[0], lo[1], z0], [hi[0], hi[1], z1], size=(CHECK_POINTS, 3))
    tl, tb, th = frame.to_geodetic(test)
    check_err = np.linalg.norm(
        np.stack(rpc.project(tl, tb, th), -1) - pinhole_rpc_pixels(K, c2w, test), axis=1
    )
    return ViewRPC(
        rpc=with_bias(rpc, *bias_px),
        bias_px=(float(bias_px[0]), float(bias_px[1])),
        fit_rms_px=float(np.sqrt((fit_err**2).mean())),
        fit_max_px=float(fit_err.max()),
        check_rms_px=float(np.sqrt((check_err**2).mean())),
        check_max_px=float(check_err.max()),
        domain={"x": [float(lo[0]), float(hi[0])], "y": [float(lo[1]), float(hi[1])], "z": [z0, z1]},
    )


def draw_biases(rng: np.random.Generator, n: int, bias_px: float) -> np.ndarray:
    """[n, 2] (col, row) biases: view 0 none, the others a random direction and length in [b/2, b]."""
    ang = rng.uniform(0.0, 2.0 * math.pi, n)
    length = rng.uniform(0.5 * bias_px, bias_px, n)
    out = np.stack([length * np.cos(ang), length * np.sin(ang)], -1)
    out[0] = 0.0
    return out


# ----------------------------------------------------------------------------------------------
# files


def write_rpc_geotiff(path: str | Path, rgb: np.ndarray, rpc: RPCModel) -> None:
    """Write an [H, W, 3] uint8 image as a GeoTIFF carrying ``rpc`` (tag 50844, no CRS), nodata 0."""
    rasterio = require_rasterio()
    from rasterio.rpc import RPC

    rpcs = RPC(
        err_bias=-1.0, err_rand=-1.0,  # RPC00B: -1 = unknown
        height_off=rpc.h_off, height_scale=rpc.h_scale, lat_off=rpc.lat_off, lat_scale=rpc.lat_scale,
        long_off=rpc.lon_off, long_scale=rpc.lon_scale, line_off=rpc.line_off, line_scale=rpc.line_scale,
        samp_off=rpc.samp_off, samp_scale=rpc.samp_scale,
        line_num_coeff=rpc.line_num.tolist(), line_den_coeff=rpc.line_den.tolist(),
        samp_num_coeff=rpc.samp_num.tolist(), samp_den_coeff=rpc.samp_den.tolist(),
    )  # fmt: skip
    h, w, c = rgb.shape
    with warnings.catch_warnings():
        # A sensor-geometry image has no geotransform on purpose; its RPC is the georeference.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(
            path, "w", driver="GTiff", width=w, height=h, count=c, dtype="uint8", nodata=0, photometric="RGB"
        ) as dst:
            dst.rpcs = rpcs
            dst.write(np.moveaxis(rgb, -1, 0))


def dsm_heights(city: Any, frame: ENUFrame, lon: np.ndarray, lat: np.ndarray, n_iter: int = 6) -> np.ndarray:
    """Ellipsoidal height of the city's surface above each (lon, lat) [...]; NaN outside the tile.

    Solves ``z(lon, lat, h) = city.height_at(x(lon, lat, h), y(lon, lat, h))`` by fixed-point
    iteration on h (dz/dh = 1 - 1e-9 over a tile, and x, y move by micrometres per metre of h).
    The ellipsoid normal is tilted against the ENU z axis by up to 3e-5 rad, so a cell whose
    normal passes within millimetres of a wall may end on either side of it.
    """
    h = np.full(np.shape(lon), frame.h0)
    for _ in range(n_iter):
        enu = frame.from_geodetic(lon, lat, h)
        surf = city.height_at(enu[..., 0], enu[..., 1])
        h = h - (enu[..., 2] - surf)
    return h


def write_dsm_geotiff(
    path: str | Path, city: Any, frame: ENUFrame, resolution: float = DSM_RESOLUTION_M
) -> dict[str, Any]:
    """Write the city's exact DSM as a UTM GeoTIFF (module docstring); returns its georeference."""
    pyproj = require_pyproj()
    epsg = utm_epsg(frame.lon0, frame.lat0)
    to_utm = pyproj.Transformer.from_crs(4326, epsg, always_xy=True)
    to_geo = pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)
    half = city.size_m / 2
    edge = np.linspace(-half, half, 65)
    ring = np.concatenate([np.c_[edge, -half + 0 * edge], np.c_[edge, half + 0 * edge],
                           np.c_[-half + 0 * edge, edge], np.c_[half + 0 * edge, edge]])  # fmt: skip
    lon, lat, _ = frame.to_geodetic(np.c_[ring, np.zeros(len(ring))])
    e, n = to_utm.transform(lon, lat)
    # Grid aligned to multiples of the resolution, one cell of margin around the tile.
    e0 = math.floor(min(e) / resolution) * resolution - resolution
    n1 = math.ceil(max(n) / resolution) * resolution + resolution
    width = int(math.ceil((max(e) + resolution - e0) / resolution))
    height = int(math.ceil((n1 - (min(n) - resolution)) / resolution))
    grid = DsmGrid(e0, n1, resolution, width, height)
    clon, clat = to_geo.transform(*grid.centres())
    z = dsm_heights(city, frame, np.asarray(clon), np.asarray(clat))
    write_geotiff(path, z, grid, f"EPSG:{epsg}")
    return {
        "file": Path(path).name,
        "epsg": epsg,
        "resolution": resolution,
        "width": width,
        "height": height,
        "origin_utm": [e0, n1],
        "nodata": DSM_NODATA,
        "heights": "metres above the WGS84 ellipsoid",
        "valid_cells": int(np.isfinite(z).sum()),
    }


def check_rpc_options(preset: str | None, n_views: int, bias_px: float) -> None:
    """Raise ConfigError / MissingDependencyError for options ``write_rpc_set`` would refuse.

    ``preset`` (a synthetic preset name) bounds ``n_views`` by its number of satellite views.
    """
    from skyfall.synth.writer import PRESETS

    require_rasterio(), require_pyproj()
    if not (math.isfinite(bias_px) and bias_px >= 0):
        raise ConfigError(f"--rpc-bias-px must be a finite number >= 0, got {bias_px}")
    n_max = PRESETS[preset].n_sat if preset in PRESETS else None
    if n_views < 1 or (n_max is not None and n_views > n_max):
        raise ConfigError(f"--rpc-views must be 1..{n_max or 'the number of satellite views'}, got {n_views}")


def write_rpc_set(tile_dir: str | Path, n_views: int = 5, bias_px: float = 2.0) -> dict[str, Any]:
    """Write ``tile_dir/rpc/`` (module docstring) for a synthetic tile written by ``write_synthetic_tile``.

    Args:
        tile_dir: a synthetic tile folder (``synth.json``, transforms, images).
        n_views: how many satellite views (sat_00, sat_01, ...) get an RPC GeoTIFF.
        bias_px: largest injected bias length in pixels (0: exact RPCs).

    Returns:
        The summary written to ``rpc/rpc.json``.

    Raises:
        ConfigError: bad ``n_views`` / ``bias_px``; TileFormatError: not a synthetic tile.
        MissingDependencyError: rasterio or pyproj is missing.
    """
    from skyfall.data.tile import load_tile
    from skyfall.synth.city import SyntheticCity

    check_rpc_options(None, n_views, bias_px)
    root = Path(tile_dir)
    city = SyntheticCity.from_tile(root)
    tile = load_tile(root)
    views: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for split in (tile.train, tile.test):
        for i, name in enumerate(split.names):
            views[name] = (
                split.cameras.Ks[i].numpy(),
                split.cameras.camtoworlds[i].numpy(),
                split.images[i].numpy(),
            )
    names = sorted(n for n in views if n.startswith("sat_"))
    if not 1 <= n_views <= len(names):
        raise ConfigError(f"--rpc-views must be 1..{len(names)} (the tile's satellite views), got {n_views}")
    names = names[:n_views]
    seed = int(tile.meta.get("seed", 0))
    biases = draw_biases(np.random.default_rng([seed, 4]), n_views, bias_px)
    frame = ENUFrame(ANCHOR.lon, ANCHOR.lat, ANCHOR.h)
    z_range = (-FIT_Z_MARGIN_M, float(math.ceil(city.layout.max_height)) + FIT_Z_MARGIN_M)
    half = city.size_m / 2
    out = root / RPC_DIR
    out.mkdir(exist_ok=True)
    for old in [*out.glob("sat_*.tif"), out / "dsm.tif", out / "rpc.json"]:
        old.unlink(missing_ok=True)  # a previous set may have had more views
    w, h = tile.train.cameras.width, tile.train.cameras.height
    rows = []
    for k, name in enumerate(names):
        K, c2w, rgb = views[name]
        v = fit_view_rpc(K, c2w, w, h, frame, z_range, half, tuple(biases[k]), seed=k)
        write_rpc_geotiff(out / f"{name}.tif", rgb, v.rpc)
        rows.append(
            {
                "name": name,
                "image": f"{name}.tif",
                "tile_image": f"images/{name}.png",
                "bias_px": list(v.bias_px),
                "fit_rms_px": v.fit_rms_px,
                "fit_max_px": v.fit_max_px,
                "check_rms_px": v.check_rms_px,
                "check_max_px": v.check_max_px,
                "fit_domain_enu_m": v.domain,
            }
        )
    dsm = write_dsm_geotiff(out / "dsm.tif", city, frame)
    alt = (ANCHOR.h + z_range[0], ANCHOR.h + z_range[1])
    aoi = f"{ANCHOR.lon:.6f},{ANCHOR.lat:.6f},{city.size_m:g}"
    summary = {
        "anchor": {"lon": ANCHOR.lon, "lat": ANCHOR.lat, "h": ANCHOR.h, "place": ANCHOR.place},
        "enu": "the tile's frame: origin at the anchor (tile centre, ground z = 0), x east, y north, z up",
        "bias_convention": "RPC projection minus exact projection, (col, row) pixels; view 0 unbiased",
        "pixel_convention": "RPC col/row integers are pixel centres: col = u - 0.5 for a tile camera's u",
        "views": rows,
        "dsm": dsm,
        "prepare": {
            "aoi": aoi,
            "alt_range": f"{alt[0]:g},{alt[1]:g}",
            "command": f"skyfall prepare {' '.join(f'{RPC_DIR}/{n}.tif' for n in names)} --out TILE "
            f"--aoi {aoi} --alt-range={alt[0]:g},{alt[1]:g}",
        },
    }
    (out / "rpc.json").write_text(json.dumps(summary, indent=1))
    return summary
