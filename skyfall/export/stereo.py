"""A prepared tile's stereo DSM: its dense heights (``TILE/dense/field.npz``) as georeferenced rasters.

::

    TILE/dense/dsm.tif     float32 heights above the WGS84 ellipsoid, the tile's UTM zone, nodata -9999
    TILE/dense/score.tif   the match score of each cell (better-half NCC, -1..1; below ~0.5 the height
                           was carried in by semi-global matching rather than matched)
    TILE/dense/dsm.png     preview
    TILE/dense/dsm.json    grid, CRS, ENU origin, completeness, and the truth scores when given

The grid and the exact ENU -> UTM resampling of ``skyfall export RUN --format dsm``
(``skyfall.dsm.render_on_map_grid``), so the stereo DSM a tile starts from and the DSM of the splats
trained on it compare cell for cell. ``skyfall prepare`` writes it after the tile (and scores it with
``skyfall.eval.stereo`` when it has a truth DSM); ``skyfall city prepare`` for every cell.

Why: it is the classic product of a satellite stereo pipeline (s2p, ASP), available in a minute, and
the baseline that shows what training adds over matching alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from skyfall.dsm import (
    enu_footprint,
    field_grid,
    field_sampler,
    inside_extent,
    render_on_map_grid,
    tile_frame,
    utm_grid,
    write_geotiff,
    write_preview,
)
from skyfall.errors import TileFormatError
from skyfall.prepare.dense_field import DENSE_DIR, field_path, load_field
from skyfall.storage.atomic import atomic_write_text


def write_stereo_dsm(
    tile: str | Path, *, resolution: float = 0.5, oversample: int = 2, truth_scores: dict | None = None
) -> dict[str, Any]:
    """Write ``TILE/dense/{dsm.tif,score.tif,dsm.png,dsm.json}`` from ``TILE/dense/field.npz``.

    Args:
        tile: a tile made by ``skyfall prepare`` (``prepare.json`` gives the frame and the AOI).
        resolution: DSM cell (metres).
        oversample: ENU samples per DSM cell along each axis before the exact resampling.
        truth_scores: recorded in ``dsm.json`` as ``truth`` (``skyfall.eval.stereo.score_stereo``).

    Returns:
        What ``dsm.json`` holds.

    Raises:
        TileFormatError: no field, or no geodetic frame / AOI in prepare.json (naming the file).
        MissingDependencyError: rasterio / pyproj are not installed.
    """
    t0 = time.perf_counter()
    tile = Path(tile)
    field = load_field(tile)
    if field is None:
        raise TileFormatError(field_path(tile), None, "missing: the tile has no dense heights")
    frame = tile_frame(tile)
    if frame.enu is None or frame.extent is None:
        raise TileFormatError(tile / "prepare.json", "enu_origin", "the tile has no geodetic frame and AOI")
    out = tile / DENSE_DIR
    epsg, grid = utm_grid(frame.enu, frame.extent, resolution)
    crs = f"EPSG:{epsg}"
    heights, _ = render_on_map_grid(
        field_sampler(field), grid, frame=frame.enu, crs=crs, extent=frame.extent, oversample=oversample
    )
    tags = {"SKYFALL_CRS": crs, "SKYFALL_HEIGHTS": "metres above the WGS84 ellipsoid",
            "SKYFALL_SOURCE": "skyfall prepare dense heights", "SKYFALL_ENU_ORIGIN": json.dumps(frame.enu.to_dict())}  # fmt: skip
    write_geotiff(out / "dsm.tif", heights, grid, crs, tags=tags)
    # The score of the ENU cell each map cell's surface point falls in (nearest: a score is not a
    # quantity to interpolate across a roof edge).
    h0 = frame.enu.h0
    ex, ey = enu_footprint(grid, frame.enu, crs, h=np.where(np.isfinite(heights), heights, h0))
    src = field_grid(field)
    col = np.floor((ex - src.x_min) / src.resolution).astype(np.int64)
    row = np.floor((src.y_max - ey) / src.resolution).astype(np.int64)
    ok = np.isfinite(heights) & (col >= 0) & (col < src.width) & (row >= 0) & (row < src.height)
    score = np.full(heights.shape, np.nan)
    score[ok] = field.score[row[ok], col[ok]]
    write_geotiff(out / "score.tif", score, grid, crs, tags={**tags, "SKYFALL_BAND": "match score (NCC)"},
                  description="score")  # fmt: skip
    write_preview(out / "dsm.png", heights)
    inside = inside_extent(grid, frame.enu, crs, frame.extent)
    meta: dict[str, Any] = {
        "file": "dsm.tif",
        "score_file": "score.tif",
        "crs": crs,
        "heights": "metres above the WGS84 ellipsoid",
        "nodata": -9999.0,
        "grid": grid.to_json(),
        "enu_origin": frame.enu.to_dict(),
        "enu_extent": list(frame.extent),
        "field_resolution_m": field.resolution,
        "oversample": oversample,
        "completeness": float(np.isfinite(heights)[inside].mean()) if inside.any() else 0.0,
    }
    if truth_scores is not None:
        meta["truth"] = truth_scores
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(out / "dsm.json", json.dumps(meta, indent=1))
    return meta
