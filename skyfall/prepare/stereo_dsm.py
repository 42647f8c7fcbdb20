"""The dense heights of ``skyfall prepare`` as a georeferenced stereo DSM, scored when a truth is known.

::

    TILE/dense/dsm.tif     float32 heights above the WGS84 ellipsoid, the tile's UTM zone, nodata -9999
    TILE/dense/score.tif   the match score of each cell (better-half NCC, -1..1; below ~0.5 the height
                           was carried in by semi-global matching rather than matched)
    TILE/dense/dsm.png     preview
    TILE/dense/dsm.json    grid, CRS, ENU origin, cells, and the truth scores when a truth DSM is known
    TILE/dense/field.npz   the dense heights themselves on their ENU grid (``load_field``), from which
                           ``skyfall eval`` scores the stereo DSM beside the trained one against any truth

The same grid and resampling as ``skyfall export RUN --format dsm`` (``skyfall.dsm.render_on_map_grid``:
the ENU field sampled bilinearly and resampled exactly onto the UTM grid), so the stereo DSM a tile
starts from and the DSM of the splats trained on it compare cell for cell, and ``skyfall eval
--dsm-truth`` and this module score them the same way (``skyfall.eval.truth.score_truth``).

Why write it: it is the classic product of a satellite stereo pipeline (s2p, ASP) and a baseline for
the reconstruction — what Stage 1 adds over matching alone is the difference of the two scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from skyfall.dsm import (
    DsmGrid,
    TileFrame,
    enu_footprint,
    inside_extent,
    render_on_map_grid,
    sample_bilinear,
    utm_grid,
    write_geotiff,
    write_preview,
)
from skyfall.errors import TileFormatError
from skyfall.prepare.dense import DenseHeights
from skyfall.prepare.geodesy import ENUFrame
from skyfall.storage.atomic import atomic_write, atomic_write_text

DSM_DIR = "dense"
FIELD_FILE = "field.npz"


def field_grid(field: DenseHeights) -> DsmGrid:
    """The ENU grid the dense heights are on (the same north-up cell convention as ``DsmGrid``)."""
    h, w = field.heights.shape
    return DsmGrid(field.x0, field.y1, field.resolution, w, h)


def save_field(path: str | Path, field: DenseHeights) -> None:
    """The dense heights on their ENU grid, as ``field.npz`` (atomic)."""
    with atomic_write(path) as f:
        np.savez_compressed(
            f, heights=field.heights.astype(np.float32), score=field.score.astype(np.float32),
            grid=np.array([field.x0, field.y1, field.resolution, field.step], np.float64),
            planes=np.int64(field.planes), lowered=np.float64(field.lowered),
        )  # fmt: skip


def load_field(tile: str | Path) -> DenseHeights | None:
    """``TILE/dense/field.npz`` (None when the tile has none: dense heights off, or an older tile).

    Raises:
        TileFormatError: the file is there but not a field written by ``save_field``.
    """
    path = Path(tile) / DSM_DIR / FIELD_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            x0, y1, res, step = (float(v) for v in z["grid"])
            heights, score = z["heights"].astype(np.float64), z["score"].astype(np.float64)
            planes, lowered = int(z["planes"]), float(z["lowered"])
    except (OSError, ValueError, KeyError) as e:
        raise TileFormatError(path, None, f"not a dense height field: {e}") from e
    if heights.ndim != 2 or score.shape != heights.shape or not res > 0:
        raise TileFormatError(path, "heights", "need 2-D heights and scores of one shape and a cell > 0")
    return DenseHeights(heights, score, x0, y1, res, step, planes, lowered)


def field_sampler(field: DenseHeights) -> Callable[[DsmGrid], np.ndarray]:
    """ENU heights of the field on any ENU grid (bilinear; NaN outside the field), the ``render_enu``
    argument of ``render_on_map_grid`` and ``score_truth``."""
    src = field_grid(field)

    def render(g: DsmGrid) -> np.ndarray:
        x, y = g.centres()
        return sample_bilinear(field.heights, src, x, y)

    return render


def write_stereo_dsm(
    tile: str | Path,
    field: DenseHeights,
    frame: ENUFrame,
    extent: tuple[float, float, float, float],
    *,
    resolution: float = 0.5,
    oversample: int = 2,
    truth: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``TILE/dense/{dsm.tif,score.tif,dsm.png,dsm.json}`` (see the module docstring).

    Args:
        tile: the tile folder.
        field: the dense heights (ENU z) over ``extent``.
        frame: the tile's geodetic frame (``prepare.json`` ``enu_origin``).
        extent: ENU (x_min, x_max, y_min, y_max) of the AOI; cells outside it are no-data.
        resolution: DSM cell (metres).
        oversample: ENU samples per DSM cell along each axis before the exact resampling.
        truth: a ground-truth DSM GeoTIFF (any CRS, ellipsoidal heights); when given, the DSM is scored
            against it like ``skyfall eval --dsm-truth`` (NCC shift within 5 cells, vertical offset).

    Returns:
        What ``dsm.json`` holds (``truth`` with the scores, or the reason they are missing).
    """
    t0 = time.perf_counter()
    out = Path(tile) / DSM_DIR
    save_field(out / FIELD_FILE, field)
    epsg, grid = utm_grid(frame, extent, resolution)
    crs = f"EPSG:{epsg}"
    render = field_sampler(field)
    heights, _ = render_on_map_grid(render, grid, frame=frame, crs=crs, extent=extent, oversample=oversample)
    tags = {"SKYFALL_CRS": crs, "SKYFALL_HEIGHTS": "metres above the WGS84 ellipsoid",
            "SKYFALL_SOURCE": "skyfall prepare dense heights", "SKYFALL_ENU_ORIGIN": json.dumps(frame.to_dict())}  # fmt: skip
    write_geotiff(out / "dsm.tif", heights, grid, crs, tags=tags)
    # The score of the ENU cell each map cell's surface point falls in (nearest: a score is not a
    # quantity to interpolate across a roof edge).
    ex, ey = enu_footprint(grid, frame, crs, h=np.where(np.isfinite(heights), heights, frame.h0))
    src = field_grid(field)
    col = np.floor((ex - src.x_min) / src.resolution).astype(np.int64)
    row = np.floor((src.y_max - ey) / src.resolution).astype(np.int64)
    ok = np.isfinite(heights) & (col >= 0) & (col < src.width) & (row >= 0) & (row < src.height)
    score = np.full(heights.shape, np.nan)
    score[ok] = field.score[row[ok], col[ok]]
    write_geotiff(out / "score.tif", score, grid, crs, tags={**tags, "SKYFALL_BAND": "match score (NCC)"},
                  description="score")  # fmt: skip
    write_preview(out / "dsm.png", heights)
    inside = inside_extent(grid, frame, crs, extent)
    meta: dict[str, Any] = {
        "file": "dsm.tif",
        "score_file": "score.tif",
        "crs": crs,
        "heights": "metres above the WGS84 ellipsoid",
        "nodata": -9999.0,
        "grid": grid.to_json(),
        "enu_origin": frame.to_dict(),
        "enu_extent": list(extent),
        "field_resolution_m": field.resolution,
        "oversample": oversample,
        "completeness": float(np.isfinite(heights)[inside].mean()) if inside.any() else 0.0,
    }
    if truth is not None:
        meta["truth"] = score_against(render, truth, frame, extent)
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(out / "dsm.json", json.dumps(meta, indent=1))
    return meta


def score_against(
    render: Callable[[DsmGrid], np.ndarray],
    truth: str | Path,
    frame: ENUFrame,
    extent: tuple[float, float, float, float],
) -> dict[str, Any]:
    """Scores of an ENU height function against a truth DSM (``skyfall.eval.truth.score_truth``), as
    ``{"file", "dsm_mae_m", ...}``; ``{"file", "error"}`` when the truth cannot be scored (it does not
    overlap the AOI, or cannot be read): the tile is written by then and stays valid."""
    from skyfall.errors import SkyfallError
    from skyfall.eval.truth import load_truth, score_truth

    try:
        s = score_truth(render, load_truth(truth), TileFrame(frame, extent), extent=extent)
    except SkyfallError as e:
        return {"file": str(truth), "error": str(e)}
    keep = ("dsm_mae_m", "dsm_rmse_m", "dsm_completeness", "dsm_mae_unregistered_m", "dz_m", "shift_e_m",
            "shift_n_m", "ncc", "n_truth_cells", "resolution_m")  # fmt: skip
    return {"file": str(truth), **{k: s.metrics[k] for k in keep if k in s.metrics}}
