"""Scoring a scene's DSM against any georeferenced ground-truth DSM GeoTIFF (``--dsm-truth``).

1. read the truth (band 1, north-up; no-data -> NaN) and an optional mask on the same grid
   (non-zero = scored);
2. keep the truth cells whose centres fall inside the tile's ENU extent and crop the truth grid to
   their bounding box (a DFC2019 truth tile is usually larger than the reconstructed AOI);
3. render the scene's DSM on a fine ENU grid (``resolution / oversample``) and resample it exactly
   onto the cropped truth grid (``skyfall.dsm.resample_enu_dsm``: truth CRS -> geodetic -> ENU, heights
   above the WGS84 ellipsoid; a truth without a CRS is read as the tile's local ENU frame);
4. register like the DFC2019 evaluation and EOGS: the integer shift within +-``radius`` cells that
   maximises the NCC with the truth, then the vertical offset mean(truth - shifted prediction);
5. MAE / RMSE / completeness over the overlap (completeness = cells valid in both / valid truth cells).

A constant difference between the truth's vertical datum and the WGS84 ellipsoid (e.g. a geoid
height) is absorbed by the vertical offset and reported as ``dz_m``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skyfall.dsm import (
    DsmGrid,
    GeoRaster,
    TileFrame,
    enu_footprint,
    read_geotiff,
    render_on_map_grid,
    require_rasterio,
)
from skyfall.errors import TileFormatError
from skyfall.eval.geometry import dsm_metrics, shift_image


@dataclass
class TruthScore:
    """Metrics and the rasters behind them, all on the cropped truth grid."""

    metrics: dict
    grid: DsmGrid
    crs: str | None
    truth: np.ndarray
    pred: np.ndarray
    diff: np.ndarray  # registered prediction - truth

    # metrics: dsm_mae_m, dsm_rmse_m, dsm_completeness, dsm_mae_unregistered_m, shift_rows / shift_cols
    # (``shift_image(pred, shift_rows, shift_cols)`` aligns the prediction with the truth), the same
    # shift in metres east / north (shift_e_m, shift_n_m), dz_m (added to the shifted prediction), ncc.


def load_truth(path: str | Path, mask: str | Path | None = None) -> GeoRaster:
    """The truth DSM with cells outside ``mask`` (a GeoTIFF on the same grid, 0 = ignore) set to NaN."""
    truth = read_geotiff(path)
    if mask is not None:
        m = _read_mask(Path(mask))
        if m.grid != truth.grid:
            raise TileFormatError(
                mask, "transform", f"mask grid {m.grid} != truth grid {truth.grid} ({path})"
            )
        truth.heights = np.where(m.heights != 0, truth.heights, np.nan)
    return truth


def _read_mask(path: Path) -> GeoRaster:
    rasterio = require_rasterio()
    if not path.is_file():
        raise TileFormatError(path, None, "mask GeoTIFF not found")
    try:
        with rasterio.open(path) as f:
            arr, t = f.read(1), f.transform
    except Exception as e:  # rasterio raises its own error types for unreadable files
        raise TileFormatError(path, None, f"cannot read as a GeoTIFF mask: {e}") from e
    grid = DsmGrid(float(t.c), float(t.f), float(t.a), arr.shape[1], arr.shape[0])
    return GeoRaster(np.nan_to_num(arr.astype(np.float64)), grid, None, path)


def check_frames(truth: GeoRaster, frame: TileFrame, tile: Path | None) -> None:
    """A georeferenced tile needs a truth with a CRS, a local tile one without."""
    if frame.enu is not None and truth.crs is None:
        raise TileFormatError(
            truth.path or "truth",
            "crs",
            f"no CRS, but the tile {tile} is georeferenced (prepare.json enu_origin)",
        )
    if frame.enu is None and truth.crs is not None:
        raise TileFormatError(
            truth.path or "truth",
            "crs",
            f"has a CRS, but the tile {tile} has no geodetic frame (no prepare.json enu_origin)",
        )


def score_truth(
    render_enu: Callable[[DsmGrid], np.ndarray],
    truth: GeoRaster,
    frame: TileFrame,
    *,
    extent: tuple[float, float, float, float],
    oversample: int = 2,
    radius: int = 5,
) -> TruthScore:
    """Resample the rendered DSM onto the truth grid, crop to the overlap, register and score.

    Args:
        render_enu: ENU heights on an ENU grid (e.g. ``skyfall.dsm.render_dsm`` of a scene).
        truth: the truth raster (``load_truth``).
        frame: the tile's frame (``skyfall.dsm.tile_frame``).
        extent: ENU (x_min, x_max, y_min, y_max) the reconstruction covers.
        oversample: ENU render cells per truth cell along each axis.
        radius: NCC shift search range in cells (single level, exhaustive).
    """
    crs = truth.crs
    fx, fy = enu_footprint(truth.grid, frame.enu, crs)
    x0, x1, y0, y1 = extent
    over = (fx >= x0) & (fx <= x1) & (fy >= y0) & (fy <= y1)
    if not over.any():
        raise TileFormatError(
            truth.path or "truth",
            None,
            f"does not overlap the tile (ENU extent x {x0:g}..{x1:g}, y {y0:g}..{y1:g} m)",
        )
    rows, cols = np.nonzero(over.any(1))[0], np.nonzero(over.any(0))[0]
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    grid = truth.grid.window(r0, r1, c0, c1)
    gt = np.where(over[r0:r1, c0:c1], truth.heights[r0:r1, c0:c1], np.nan)
    if not np.isfinite(gt).any():
        raise TileFormatError(truth.path or "truth", None, "no valid truth height inside the tile's extent")
    pred, _ = render_on_map_grid(
        render_enu, grid, frame=frame.enu, crs=crs, extent=extent, oversample=oversample
    )
    metrics = dsm_metrics(pred, gt, radius=radius, pyramid=False)
    reg = shift_image(pred, int(metrics.get("shift_rows", 0)), int(metrics.get("shift_cols", 0)))
    reg = reg + metrics.get("dz_m", 0.0)
    metrics.update(
        {
            "shift_e_m": float(metrics.get("shift_cols", 0)) * grid.resolution,
            "shift_n_m": -float(metrics.get("shift_rows", 0)) * grid.resolution,
            "n_truth_cells": int(np.isfinite(gt).sum()),
            "resolution_m": grid.resolution,
        }
    )
    return TruthScore(metrics, grid, crs, gt, pred, reg - gt)
