"""``skyfall export RUN --format dsm``: the run's DSM as a GeoTIFF plus a PNG preview.

::

    RUN/dsm/dsm.tif     float32 heights, nodata -9999, deflate
    RUN/dsm/dsm.png     preview (heights coloured over their 1st-99th percentiles)
    RUN/dsm/dsm.json    grid, CRS, vertical datum, ENU origin, completeness, timing

Tiles made by ``skyfall prepare`` (``prepare.json`` with ``enu_origin``): the DSM is on a north-up
grid of the tile's WGS84 UTM zone, cells aligned to multiples of the resolution, covering the AOI;
heights are metres above the WGS84 ellipsoid; cells of the grid's bounding box outside the AOI are
no-data. The ENU DSM is rendered at ``resolution / oversample`` and resampled exactly
(``skyfall.dsm.resample_enu_dsm``). Synthetic tiles (no ``prepare.json``): the DSM is on a grid of
the tile's local ENU frame (x east, y north, metres; heights = ENU z) and the GeoTIFF has no CRS;
``dsm.json`` says ``"crs": "local ENU"``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skyfall.dsm import (
    DsmGrid,
    TileFrame,
    inside_extent,
    render_dsm,
    render_on_map_grid,
    scene_extent,
    tile_frame,
    utm_grid,
    write_geotiff,
    write_preview,
)
from skyfall.errors import ConfigError, SkyfallError
from skyfall.storage.atomic import atomic_write_text
from skyfall.storage.run_dir import RunDir


@dataclass
class DsmExport:
    """What ``export_dsm`` wrote."""

    path: Path
    preview: Path
    meta: Path
    crs: str
    grid: DsmGrid
    completeness: float
    seconds: float


def run_tile(run: str | Path, data: str | Path | None = None) -> Path | None:
    """The run's tile folder: ``data``, else ``data`` in RUN/config.yml; None when neither names one.

    Raises:
        ConfigError: the folder named does not exist.
    """
    if data is not None:
        if not Path(data).is_dir():
            raise ConfigError(f"--data {data}: tile folder not found")
        return Path(data)
    rd = RunDir(run)
    cfg = rd.load_config()
    if not isinstance(cfg, dict) or not cfg.get("data"):
        return None
    tile = rd.tile_dir(cfg)  # the absolute path, else the one relative to the run folder
    if tile is None:
        raise ConfigError(f"{rd.config_path} [data]: tile folder {cfg['data']} not found; pass --data TILE")
    return tile


def export_dsm(
    run: str | Path,
    *,
    data: str | Path | None = None,
    resolution: float = 0.5,
    oversample: int = 2,
    out: str | Path | None = None,
    depth: str = "median",
    alpha_min: float = 0.05,
    progress: bool = False,
) -> DsmExport:
    """Render RUN's latest checkpoint as a DSM GeoTIFF (see the module docstring for the frames).

    Args:
        run: run directory.
        data: tile folder (default: ``data`` in RUN/config.yml); it decides the frame and extent.
        resolution: cell size in metres.
        oversample: ENU render cells per output cell along each axis, for georeferenced tiles.
        out: the GeoTIFF (default RUN/dsm/dsm.tif); the preview and JSON go next to it.
        depth, alpha_min: see ``skyfall.dsm.render_dsm``.
        progress: a tqdm bar over the rendered grid blocks.
    """
    from skyfall.export.run import load_run

    if not resolution > 0:
        raise ConfigError(f"--dsm-resolution must be > 0, got {resolution}")
    if oversample < 1:
        raise ConfigError(f"--dsm-oversample must be >= 1, got {oversample}")
    t0 = time.perf_counter()
    loaded = load_run(run)
    tile = run_tile(run, data)
    frame = tile_frame(tile) if tile is not None else TileFrame(None, None)
    extent = frame.extent or scene_extent(loaded.scene)

    def render(g: DsmGrid) -> np.ndarray:
        return render_dsm(loaded.scene, g, depth=depth, alpha_min=alpha_min, progress=progress).astype(
            np.float64
        )

    if frame.enu is not None:
        epsg, grid = utm_grid(frame.enu, extent, resolution)
        crs: str = f"EPSG:{epsg}"
        heights, _ = render_on_map_grid(
            render, grid, frame=frame.enu, crs=crs, extent=extent, oversample=oversample
        )
        vertical = "metres above the WGS84 ellipsoid"
    else:
        grid = DsmGrid.covering(*extent, resolution)
        heights = render(grid)
        crs = "local ENU"
        vertical = "metres, ENU z of the tile's local frame"
    if not np.isfinite(heights).any():
        raise SkyfallError(
            f"{loaded.checkpoint}: the model renders no height anywhere on the DSM grid (empty or diverged "
            "model); nothing was written"
        )
    path = Path(out) if out is not None else Path(run) / "dsm" / "dsm.tif"
    tags = {"SKYFALL_CRS": crs, "SKYFALL_HEIGHTS": vertical, "SKYFALL_CHECKPOINT": loaded.checkpoint.name}
    if frame.enu is not None:
        tags["SKYFALL_ENU_ORIGIN"] = json.dumps(frame.enu.to_dict())
    write_geotiff(path, heights, grid, None if frame.enu is None else crs, tags=tags)
    preview = write_preview(path.with_suffix(".png"), heights)
    # Completeness over the cells the tile covers: the UTM bounding box's corners outside a rotated
    # AOI are no-data by construction and do not count.
    inside = inside_extent(grid, frame.enu, None if frame.enu is None else crs, extent)
    completeness = float(np.isfinite(heights)[inside].mean()) if inside.any() else 0.0
    seconds = time.perf_counter() - t0
    meta = {
        "file": path.name,
        "crs": crs,
        "heights": vertical,
        "nodata": -9999.0,
        "grid": grid.to_json(),
        "enu_origin": frame.enu.to_dict() if frame.enu is not None else None,
        "enu_extent": list(extent),
        "tile": str(tile) if tile is not None else None,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "depth": depth,
        "alpha_min": alpha_min,
        "oversample": oversample if frame.enu is not None else 1,
        "completeness": completeness,
        "seconds": seconds,
    }
    meta_path = path.with_suffix(".json")
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return DsmExport(path, preview, meta_path, crs, grid, completeness, seconds)
